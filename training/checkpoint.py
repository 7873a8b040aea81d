"""Training checkpoints that resume exactly: one folder, written atomically (temp folder + rename).

    <out>/checkpoint/
      state.safetensors  every tensor: "<module>/<param>" for models and EMA, "<optimizer>/<param index>/<slot>"
                         for optimizer state (AdamW's step, exp_avg, exp_avg_sq)
      state.json         config, step, data position, optimizer hyper-parameters, RNG states of python /
                         numpy / torch, and anything else the trainer needs (e.g. the latent scale factor)

Nothing is pickled: a checkpoint can be read without trusting it.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from ldm_rt.runtime.atomic import atomic_directory

CHECKPOINT_DIR = "checkpoint"
TENSORS_FILE = "state.safetensors"
META_FILE = "state.json"


class TrainCheckpointError(ValueError):
    """A training checkpoint is missing or does not fit the run; the message says what to do."""


def checkpoint_path(out_dir: str | Path) -> Path:
    return Path(out_dir) / CHECKPOINT_DIR


def has_checkpoint(out_dir: str | Path) -> bool:
    return (checkpoint_path(out_dir) / META_FILE).is_file()


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


def save_checkpoint(out_dir: str | Path, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> Path:
    path = checkpoint_path(out_dir)
    with atomic_directory(path) as tmp:
        save_file(tensors, str(tmp / TENSORS_FILE))
        (tmp / META_FILE).write_text(json.dumps(meta, indent=1) + "\n")
    return path


def load_checkpoint(out_dir: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    path = checkpoint_path(out_dir)
    if not (path / META_FILE).is_file():
        raise TrainCheckpointError(f"no checkpoint in {out_dir} ({path / META_FILE} is missing); drop --resume to start a new run")
    try:
        meta = json.loads((path / META_FILE).read_text())
        tensors = load_file(str(path / TENSORS_FILE))
    except Exception as e:  # json and safetensors raise several types for a damaged file
        raise TrainCheckpointError(f"checkpoint {path} is damaged ({e}); delete it to start over") from None
    return tensors, meta


def step_seed(seed: int, step: int, rank: int) -> int:
    """A seed for everything random in one training step of one process: resuming at `step` replays the
    same noise without saved generator states, and ranks draw different noise."""
    return int(np.random.SeedSequence([seed, step, rank]).generate_state(1, dtype=np.uint64)[0] >> 1)
