"""An artifacts folder opened for sampling: manifest read, side files hash-checked, tokenizer and scheduler
config loaded. The ONNX/engine files are checked by the backend that opens them, so each file is hashed
once per load.

    <artifacts>/manifest.json, onnx/fp32/*.onnx, onnx/fp16/*.onnx, tokenizer.json, scheduler_config.json
"""

from __future__ import annotations

import importlib.resources
from dataclasses import dataclass
from pathlib import Path

from .manifest import MANIFEST, ArtifactError, Manifest, sha256_file
from .schedulers import SchedulerConfig
from .tokenizer import PromptTokenizer


def default_artifacts_dir() -> Path:
    """The shipped default model's artifacts (package data of ldm_rt.engines)."""
    return Path(str(importlib.resources.files("ldm_rt.engines"))) / "default" / "artifacts"


@dataclass(frozen=True)
class Artifacts:
    root: Path
    manifest: Manifest
    tokenizer: PromptTokenizer | None
    scheduler_config: SchedulerConfig
    model_hash: str  # sha256 of the source weights (what the PNG metadata names)

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
        manifest = Manifest.read(root)
        tokenizer = None
        if manifest.tokenizer is not None:
            tokenizer = PromptTokenizer.from_file(manifest.verify_file(root, manifest.tokenizer))
        elif "text_encoder" in manifest.components:
            raise ArtifactError(f"{root / MANIFEST} lists a text encoder but no tokenizer; rebuild the artifacts")
        scheduler_config = SchedulerConfig.from_json(manifest.verify_file(root, manifest.scheduler))
        model_hash = manifest.source.get("sha256") or sha256_file(root / MANIFEST)
        return cls(root, manifest, tokenizer, scheduler_config, model_hash)
