"""Training checkpoints that resume exactly: one folder, replaced whole (runtime.atomic.atomic_directory).

    <out>/checkpoint/
      state.safetensors  every tensor: "<module>/<param>" for models and EMA, "<optimizer>/<param index>/<slot>"
                         for optimizer state (AdamW's step, exp_avg, exp_avg_sq)
      state.json         config, step, data position, optimizer hyper-parameters, RNG states of python /
                         numpy / torch, and anything else the trainer needs (e.g. the latent scale factor)
      SHA256SUMS         sha256 of the two files (`sha256sum -c` format), written last: a folder with it is complete

Nothing is pickled: a checkpoint can be read without trusting it. Resuming checks the hashes, so a damaged
file is refused rather than trained on. Non-finite weights are never written. A write killed at any moment
leaves a complete checkpoint: `atomic_directory` swaps the new folder in, and where it must use two renames
instead, `load_checkpoint` restores the newest complete folder left beside `checkpoint/`.
"""

from __future__ import annotations

import json
import logging
import os
import random
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from ldm_rt.runtime.atomic import atomic_directory, directory_leftovers
from ldm_rt.runtime.manifest import sha256_file

from .io_errors import naming
from .optim import TrainingDiverged

logger = logging.getLogger(__name__)

CHECKPOINT_DIR = "checkpoint"
TENSORS_FILE = "state.safetensors"
META_FILE = "state.json"
SUMS_FILE = "SHA256SUMS"
HASHED = (TENSORS_FILE, META_FILE)
META_KEYS = {"config": dict, "step": int, "data_position": int, "rng": dict, "optimizer_param_groups": dict}


class TrainCheckpointError(ValueError):
    """A training checkpoint is missing or does not fit the run; the message says what to do."""


def checkpoint_path(out_dir: str | Path) -> Path:
    return Path(out_dir) / CHECKPOINT_DIR


def has_checkpoint(out_dir: str | Path) -> bool:
    """A checkpoint, or a complete one left beside it by an interrupted write (which resuming restores)."""
    path = checkpoint_path(out_dir)
    return (path / META_FILE).is_file() or _best_leftover(path) is not None


def flatten_state(modules: dict[str, torch.nn.Module], optimizers: dict[str, torch.optim.Optimizer]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Module and optimizer states -> (flat tensor dict, JSON-able rest)."""
    tensors: dict[str, torch.Tensor] = {}
    for name, module in modules.items():
        for key, value in module.state_dict().items():
            tensors[f"{name}/{key}"] = value.detach().cpu().contiguous()
    groups = {}
    for name, opt in optimizers.items():
        state = opt.state_dict()
        for index, slots in state["state"].items():
            for slot, value in slots.items():
                if not torch.is_tensor(value):
                    raise TypeError(f"optimizer {name} keeps a non-tensor state {slot!r}; not checkpointable")
                tensors[f"{name}/{index}/{slot}"] = value.detach().cpu().contiguous()
        groups[name] = state["param_groups"]
    return tensors, {"optimizer_param_groups": groups}


def restore_state(
    modules: dict[str, torch.nn.Module],
    optimizers: dict[str, torch.optim.Optimizer],
    tensors: dict[str, torch.Tensor],
    meta: dict[str, Any],
    where: str,
) -> None:
    for name, module in modules.items():
        prefix = f"{name}/"
        state = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
        own = module.state_dict()
        missing = sorted(set(own) - set(state))
        if missing:
            raise TrainCheckpointError(f"{where}: {name} lacks {missing[0]} ({len(missing)} missing); the checkpoint is from another model config")
        try:
            module.load_state_dict(state, strict=True)
        except RuntimeError as e:
            first = str(e).strip().splitlines()
            raise TrainCheckpointError(f"{where}: {name} does not fit ({first[-1].strip() if first else e}); resume with the config the checkpoint was written with") from None
    for name, opt in optimizers.items():
        prefix = f"{name}/"
        per_param: dict[int, dict[str, torch.Tensor]] = {}
        for key, value in tensors.items():
            if key.startswith(prefix) and key[len(prefix):].split("/")[0].isdigit():
                index, slot = key[len(prefix):].split("/", 1)
                per_param.setdefault(int(index), {})[slot] = value
        groups = meta["optimizer_param_groups"][name]
        for group in groups:
            if "betas" in group:
                group["betas"] = tuple(group["betas"])
        opt.load_state_dict({"state": per_param, "param_groups": groups})


def rng_states() -> dict[str, Any]:
    """Global RNG states of python, numpy and torch, as JSON."""
    version, internal, gauss = random.getstate()
    np_state = np.random.get_state()
    return {
        "python": [version, list(internal), gauss],
        "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])],
        "torch": torch.get_rng_state().tolist(),
    }


def set_rng_states(states: dict[str, Any]) -> None:
    version, internal, gauss = states["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = states["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(torch.tensor(states["torch"], dtype=torch.uint8))


def check_finite_state(tensors: dict[str, torch.Tensor], step: Any) -> None:
    """Refuse to save weights or optimizer state holding NaN or infinity: the previous checkpoint stays."""
    for key, value in tensors.items():
        if value.is_floating_point() and not bool(torch.isfinite(value).all()):
            raise TrainingDiverged(
                f"step {step}: {key} holds NaN or infinite values, so no checkpoint was written (the last one is kept); "
                "lower lr or set grad_clip, then resume with --resume or start over"
            )


def save_checkpoint(out_dir: str | Path, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> Path:
    check_finite_state(tensors, meta.get("step"))
    path = checkpoint_path(out_dir)
    with naming(path), atomic_directory(path) as tmp:
        save_file(tensors, str(tmp / TENSORS_FILE))
        (tmp / META_FILE).write_text(json.dumps(meta, indent=1) + "\n")
        (tmp / SUMS_FILE).write_text("".join(f"{sha256_file(tmp / name)}  {name}\n" for name in HASHED))  # last
    for leftover in directory_leftovers(path):  # older than the checkpoint just written
        shutil.rmtree(leftover, ignore_errors=True)
    return path


def _problem(folder: Path) -> str | None:
    """None when `folder` holds a complete checkpoint whose files match SHA256SUMS; else what is wrong."""
    sums = folder / SUMS_FILE
    try:
        lines = sums.read_text(encoding="ascii").splitlines()
    except FileNotFoundError:
        return f"{sums} is missing"
    except (OSError, UnicodeDecodeError) as e:
        return f"{sums} is unreadable ({e})"
    recorded = {name: digest for digest, name in (line.split("  ", 1) for line in lines if "  " in line)}
    if sorted(recorded) != sorted(HASHED):  # only our own file names are ever opened
        return f"{sums} does not list exactly {' and '.join(HASHED)}"
    for name in HASHED:
        try:
            if sha256_file(folder / name) != recorded[name]:
                return f"{folder / name} does not match its sha256 in {SUMS_FILE}"
        except FileNotFoundError:
            return f"{folder / name} is missing"
    return None


def _step_of(folder: Path) -> int | None:
    """The step of a complete checkpoint folder; None if it is not one (checked by hash, or for a folder
    written before checkpoints had SHA256SUMS, one that was a whole checkpoint before it was renamed away)."""
    legacy = folder.suffix == ".old" and not (folder / SUMS_FILE).exists()
    try:
        if not legacy and _problem(folder) is not None:
            return None
        step = json.loads((folder / META_FILE).read_text()).get("step")
    except (OSError, ValueError, AttributeError):
        return None
    return step if isinstance(step, int) else None


def _best_leftover(path: Path) -> tuple[int, Path] | None:
    """The newest complete checkpoint among the folders an interrupted write left beside `path`."""
    found = [(step, p) for p in directory_leftovers(path) if (step := _step_of(p)) is not None]
    return max(found, key=lambda item: item[0]) if found else None


def _restore_leftover(out_dir: str | Path, path: Path) -> None:
    """`path` is missing: a write was killed between its two renames. Put the newest complete folder back."""
    best = _best_leftover(path)
    if best is None:
        if (path / META_FILE).is_file():  # another process of this run restored it meanwhile
            return
        raise TrainCheckpointError(f"no checkpoint in {out_dir} ({path} is missing); drop --resume to start a new run")
    step, folder = best
    try:
        os.rename(folder, path)
    except OSError as e:
        if (path / META_FILE).is_file():
            return
        raise TrainCheckpointError(f"{path} is missing and {folder} (step {step}) cannot be moved there ({e.strerror}); move it by hand, then resume") from None
    logger.warning("%s was missing (a checkpoint write was interrupted); restored the complete checkpoint of step %d from %s", path, step, folder.name)


@dataclass(frozen=True)
class CheckedCheckpoint:
    """A run's checkpoint folder after the SHA256SUMS check (a leftover restored first if need be) and its
    state.json. Hashing reads every byte of the state, so a resume checks once and passes this on: the
    command line reads the config from `meta`, and the trainer loads the tensors of `path`."""

    path: Path
    meta: dict[str, Any]


def check_checkpoint(out_dir: str | Path) -> CheckedCheckpoint:
    """The run's checkpoint, restored and hash-verified as for a resume, without reading its tensors."""
    return CheckedCheckpoint(*_checked(out_dir))


def load_checkpoint(source: str | Path | CheckedCheckpoint) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(tensors, state.json) of the run folder `source`'s checkpoint, or of one already checked (not hashed again)."""
    checked = source if isinstance(source, CheckedCheckpoint) else check_checkpoint(source)
    path, meta = checked.path, checked.meta
    try:
        tensors = load_file(str(path / TENSORS_FILE))
    except Exception as e:  # safetensors raises several types for a damaged file
        raise TrainCheckpointError(f"checkpoint {path} is damaged ({e}); delete it to start over") from None
    return tensors, meta


def _checked(out_dir: str | Path) -> tuple[Path, dict[str, Any]]:
    """The checkpoint folder (a leftover restored when an interrupted write left none) and its state.json,
    after the SHA256SUMS check; TrainCheckpointError naming the problem otherwise."""
    path = checkpoint_path(out_dir)
    if not os.path.lexists(path):
        _restore_leftover(out_dir, path)
    if not (path / META_FILE).is_file():
        raise TrainCheckpointError(f"no checkpoint in {out_dir} ({path / META_FILE} is missing); drop --resume to start a new run")
    if not (path / SUMS_FILE).exists():
        logger.warning("%s has no %s (written by an older ldm-rt): resuming without checking its files", path, SUMS_FILE)
    elif (problem := _problem(path)) is not None:
        older = _best_leftover(path)
        advice = (
            f"an older complete checkpoint (step {older[0]}) is at {older[1]}: move it to {path} to resume from it, or start a new run with another --out"
            if older else f"resume from a copy of {path} if you kept one, or start a new run with another --out"
        )  # fmt: skip
        raise TrainCheckpointError(f"checkpoint damaged: {problem}; {advice}")
    try:
        meta = json.loads((path / META_FILE).read_text())
    except Exception as e:  # json raises several types for a damaged file
        raise TrainCheckpointError(f"checkpoint {path} is damaged ({e}); delete it to start over") from None
    for key, kind in META_KEYS.items():
        if not isinstance(meta, dict) or not isinstance(meta.get(key), kind):
            raise TrainCheckpointError(f"{path / META_FILE} is not a training checkpoint's state ({key!r} is missing or not a {kind.__name__}); resume a run written by these trainers")
    return path, meta


def step_seed(seed: int, step: int, rank: int) -> int:
    """A seed for everything random in one training step of one process: resuming at `step` replays the
    same noise without saved generator states, and ranks draw different noise."""
    return int(np.random.SeedSequence([seed, step, rank]).generate_state(1, dtype=np.uint64)[0] >> 1)
