"""The model an export starts from: loaded weights, the facts the contracts need, and where it came from.

A source is anything `ldm_rt.reference.checkpoints.load_model` reads: an ldm-rt model folder (the
default is the shipped one, `ldm_rt.engines` default/model), a diffusers folder, or an SD single file.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from pathlib import Path

from ldm_rt.export.errors import SourceError
from ldm_rt.reference.checkpoints import load_model
from ldm_rt.reference.model_folder import LoadedModel
from ldm_rt.runtime.artifacts import default_model_dir
from ldm_rt.runtime.contracts import ModelFacts
from ldm_rt.runtime.manifest import WEIGHT_SUFFIXES
from ldm_rt.runtime.manifest import weights_sha256 as manifest_weights_sha256

log = logging.getLogger(__name__)


@dataclass
class Source:
    loaded: LoadedModel
    facts: ModelFacts
    kind: str  # "ldm-rt", "diffusers" or "single_file"
    path: Path
    sha256: str  # over the weight files only: the same weights give the same hash whatever the configs say
    name: str  # for default output folders: the folder name or the file stem

    def to_manifest(self) -> dict[str, str]:
        return {"kind": self.kind, "path": str(self.path), "sha256": self.sha256, "name": self.name}


def weights_sha256(path: Path) -> str:
    """runtime.manifest.weights_sha256, refusing a folder with no weights in it."""
    if path.is_dir() and not any(p.suffix in WEIGHT_SUFFIXES for p in path.rglob("*") if p.is_file()):
        raise SourceError(f"{path} holds no weight files ({', '.join(WEIGHT_SUFFIXES)}); pass a complete model")
    return manifest_weights_sha256(path)


def source_name(path: str | Path | None) -> str:
    """The name default output folders take: "default" for the shipped model, else the file stem or the
    folder name (known before anything is loaded)."""
    if path is None:
        return "default"
    path = Path(path)
    return path.stem if path.is_file() else path.resolve().name


def load_source(
    path: str | Path | None = None,
    *,
    tokenizer: str | Path | None = None,
    tokenizer_2: str | Path | None = None,
    prediction_type: str | None = None,
) -> Source:
    """Load the model at `path` (default: the shipped default model) in fp32 for export. `tokenizer`, `tokenizer_2`:
    for single files, which carry none (SDXL's second tokenizer pads with its own token); override a folder's own."""
    name = source_name(path)
    if path is None:
        path = default_model_dir()
        if not path.is_dir():
            raise SourceError(
                f"the shipped default model is missing ({path}); pass --model with an ldm-rt model folder, "
                "a diffusers folder or an SD single file"
            )
    path = Path(path)
    if not path.exists():
        raise SourceError(
            f"{path} does not exist; pass --model with an ldm-rt model folder, a diffusers folder or an SD single file"
        )
    try:
        loaded = load_model(path, prediction_type=prediction_type, tokenizer=tokenizer, tokenizer_2=tokenizer_2)
    except (ValueError, OSError) as e:
        # CheckpointError / ConfigError / TokenizerError are ValueErrors with one-line messages already; they name
        # load_model's arguments, which this command takes as --tokenizer / --tokenizer-2.
        text = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        text = re.sub(r"\btokenizer(_2)?=", lambda m: "--tokenizer-2" if m.group(1) else "--tokenizer", text)
        raise SourceError(f"cannot load {path}: {text}") from None
    kind = loaded.info.get("source_kind") or ("single_file" if path.is_file() else "ldm-rt")
    if loaded.model.text_encoder is not None and loaded.tokenizer is None:
        raise SourceError(f"{path} has a text encoder but no tokenizer; pass --tokenizer PATH")
    source = Source(
        loaded=loaded,
        facts=loaded.facts(),
        kind=kind,
        path=path.resolve(),
        sha256=weights_sha256(path),
        name=name,
    )
    log.info("source %s (%s), weights sha256 %s", path, kind, source.sha256[:12])
    return source
