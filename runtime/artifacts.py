"""An artifacts folder opened for sampling: manifest read, side files hash-checked, tokenizer and scheduler
config loaded. The ONNX/engine files are checked by the backend that opens them, so each file is hashed
once per load. Every file is read from inside the folder only (Manifest.verify_file / read_file refuse
absolute paths, '..' and symlinks out of it before opening anything), and JSON files only up to a bound.

    <artifacts>/manifest.json, onnx/fp32/*.onnx, onnx/fp16/*.onnx, tokenizer.json, scheduler_config.json
"""

from __future__ import annotations

import hashlib
import importlib.resources
from dataclasses import dataclass
from pathlib import Path

from .manifest import (
    MANIFEST,
    MAX_SCHEDULER_CONFIG_BYTES,
    ArtifactError,
    Manifest,
    json_object,
    utf8_text,
)
from .schedulers import SchedulerConfig, SchedulerConfigError
from .tokenizer import MAX_TOKENIZER_JSON_BYTES, PromptTokenizer


def shipped_model_root() -> Path:
    """engines/default, the shipped default model (package data of ldm_rt.engines): the one place that knows
    where it lives. model/ holds its checkpoint, artifacts/ what export built from it."""
    return Path(str(importlib.resources.files("ldm_rt.engines"))) / "default"


def default_artifacts_dir() -> Path:
    """The shipped default model's artifacts, what `Pipeline.load()` and `ldm-rt sample` use without --model."""
    return shipped_model_root() / "artifacts"


def default_model_dir() -> Path:
    """The shipped default model's checkpoint (an ldm-rt model folder), the source its artifacts are built from."""
    return shipped_model_root() / "model"


def read_scheduler_config(root: Path, manifest: Manifest) -> SchedulerConfig:
    """The artifacts' scheduler config, hash-checked against the manifest and bounded before it is read."""
    data = manifest.read_file(root, manifest.scheduler, MAX_SCHEDULER_CONFIG_BYTES, "scheduler config")
    where = root / manifest.scheduler.file
    try:
        return SchedulerConfig.from_dict(json_object(data, where))
    except SchedulerConfigError as e:
        raise SchedulerConfigError(f"{where}: {e}") from None


@dataclass(frozen=True)
class Artifacts:
    root: Path
    manifest: Manifest
    tokenizer: PromptTokenizer | None
    scheduler_config: SchedulerConfig
    model_hash: str  # sha256 of the source weights (what the PNG metadata names)
    tokenizer_2: PromptTokenizer | None = None  # SDXL's second tokenizer (text_encoder_2's ids)

    @classmethod
    def open(cls, path: str | Path | None = None) -> Artifacts:
        root = Path(path) if path is not None else default_artifacts_dir()
        if path is None and not (root / MANIFEST).is_file():
            raise ArtifactError(
                f"the shipped default model's artifacts are missing ({root}); pass --model DIR "
                "with a folder built by `python export/build_engines.py`"
            )
        if not root.is_dir():
            raise ArtifactError(f"{root} is not a folder; pass --model DIR with a built artifacts folder")
        manifest_bytes = Manifest.read_bytes(root)
        manifest = Manifest.parse(manifest_bytes, root / MANIFEST)
        tokenizers = []
        for entry, component in ((manifest.tokenizer, "text_encoder"), (manifest.tokenizer_2, "text_encoder_2")):
            if entry is not None:
                data = manifest.read_file(root, entry, MAX_TOKENIZER_JSON_BYTES, "tokenizer.json")
                where = root / entry.file
                tokenizers.append(PromptTokenizer.from_str(utf8_text(data, where), str(where)))
            elif component in manifest.components:
                raise ArtifactError(f"{root / MANIFEST} lists {component} but not its tokenizer; rebuild the artifacts")
            else:
                tokenizers.append(None)
        scheduler_config = read_scheduler_config(root, manifest)
        model_hash = manifest.source.get("sha256") or hashlib.sha256(manifest_bytes).hexdigest()
        return cls(root, manifest, tokenizers[0], scheduler_config, model_hash, tokenizers[1])
