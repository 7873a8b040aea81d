"""The artifact manifest: what was built, from what, with which tools, and how well it matches.

Export writes it (last, atomically: a folder without a valid manifest is not a finished build);
the runtime reads it and refuses files whose hash does not match. It is also the language-neutral
description a native port reads: contracts, scheduler, tokenizer, latent facts, guidance convention.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .atomic import atomic_write_text
from .contracts import ComponentContract, ModelFacts, ShapeProfile

FORMAT = "ldm-rt-artifacts"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
# The guidance convention every backend and port follows (one batched UNet call of 2B).
GUIDANCE = {
    "formula": "eps = eps_uncond + guidance * (eps_cond - eps_uncond)",
    "unet_batch_order": ["uncond", "cond"],
    "skip_uncond_when_guidance_is": 1.0,
}


class ArtifactError(ValueError):
    """Artifacts are missing, corrupt, stale or foreign; the message says which file and what to do."""


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


WEIGHT_SUFFIXES = (".safetensors", ".bin", ".ckpt", ".pt", ".pth")


def weights_sha256(path: str | Path) -> str:
    """The hash a manifest records as its source: sha256 of a single weight file; for a folder, sha256 over
    (relative path, file sha256) of every weight file in it, sorted, so renaming or changing any of them
    changes the hash. A folder without weight files hashes to the empty digest; callers that need weights
    check for them."""
    path = Path(path)
    if path.is_file():
        return sha256_file(path)
    h = hashlib.sha256()
    for p in sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in WEIGHT_SUFFIXES):
        h.update(f"{p.relative_to(path).as_posix()}\0{sha256_file(p)}\n".encode())
    return h.hexdigest()


@dataclass
class FileEntry:
    file: str  # relative to the artifacts folder
    sha256: str
    bytes: int

    @classmethod
    def of(cls, root: Path, rel: str) -> FileEntry:
        p = root / rel
        return cls(rel, sha256_file(p), p.stat().st_size)


@dataclass
class OrtVariant:
    """An ONNX Runtime-only rewrite of a precision's ONNX file (contrib ops fused in, export/ort_attention.py),
    parity-checked against the reference like the portable file. It shares the portable file's external
    data, if any. Only the ONNX Runtime backend reads it; TensorRT and ports read the portable file."""

    onnx: FileEntry
    parity: dict[str, Any] = field(default_factory=dict)
    fused: dict[str, int] = field(default_factory=dict)  # contrib op -> node count, e.g. {"MultiHeadAttention": 32}


@dataclass
class PrecisionEntry:
    """One ONNX file of a component at one precision, with its parity against the reference."""

    onnx: FileEntry
    parity: dict[str, Any] = field(default_factory=dict)  # {"shapes": [...], "max_abs_err": [...], "bound": ..., "passed": bool}
    kept_fp32: list[str] = field(default_factory=list)  # nodes/blocks left in fp32 because fp16 overflowed
    external_data: FileEntry | None = None  # <component>.onnx.data when the model passes protobuf's 2 GB
    ort: OrtVariant | None = None  # the ONNX Runtime variant, when the graph had something to fuse


@dataclass
class ComponentEntry:
    contract: ComponentContract
    precisions: dict[str, PrecisionEntry]  # "fp32", "fp16"
    engines: dict[str, Any] = field(default_factory=dict)  # TensorRT engines by cache key


@dataclass
class Manifest:
    facts: ModelFacts
    profile: ShapeProfile
    components: dict[str, ComponentEntry]
    tokenizer: FileEntry | None
    scheduler: FileEntry
    source: dict[str, Any]  # {"kind": ..., "path": ..., "sha256": ...}
    tools: dict[str, str]
    tensorrt: dict[str, Any] = field(default_factory=dict)  # status of the engine build
    created: str = ""
    guidance: dict[str, Any] = field(default_factory=lambda: dict(GUIDANCE))
    sampler_spec: dict[str, Any] = field(default_factory=dict)  # scheduler tables for native ports

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        return {"format": FORMAT, "format_version": FORMAT_VERSION, **d}

    def write(self, folder: str | Path) -> None:
        atomic_write_text(Path(folder) / MANIFEST, json.dumps(self.to_dict(), indent=2, sort_keys=False) + "\n")

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Manifest:
        def entry(e: dict[str, Any] | None) -> FileEntry | None:
            return None if e is None else FileEntry(**e)

        def variant(v: dict[str, Any] | None) -> OrtVariant | None:
            return None if v is None else OrtVariant(FileEntry(**v["onnx"]), v.get("parity", {}), dict(v.get("fused", {})))

        comps = {}
        for name, c in d["components"].items():
            precisions = {
                p: PrecisionEntry(
                    entry(v["onnx"]), v.get("parity", {}), list(v.get("kept_fp32", [])), entry(v.get("external_data")),
                    variant(v.get("ort")),
                )
                for p, v in c["precisions"].items()
            }
            comps[name] = ComponentEntry(ComponentContract.from_dict(c["contract"]), precisions, c.get("engines", {}))
        prof = d["profile"]
        return cls(
            facts=ModelFacts(**d["facts"]),
            profile=ShapeProfile(tuple(prof["batch"]), tuple(prof["height"]), tuple(prof["width"])),
            components=comps,
            tokenizer=entry(d.get("tokenizer")),
            scheduler=entry(d["scheduler"]),
            source=d.get("source", {}),
            tools=d.get("tools", {}),
            tensorrt=d.get("tensorrt", {}),
            created=d.get("created", ""),
            guidance=d.get("guidance", dict(GUIDANCE)),
            sampler_spec=d.get("sampler_spec", {}),
        )

    @classmethod
    def read(cls, folder: str | Path) -> Manifest:
        path = Path(folder) / MANIFEST
        if not path.is_file():
            raise ArtifactError(
                f"{path} not found: {folder} is not a finished artifacts folder; build one with "
                "`python export/build_engines.py --model SRC --out DIR`"
            )
        try:
            d = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise ArtifactError(f"{path} is not valid JSON ({e}); rebuild the artifacts") from None
        if d.get("format") != FORMAT or d.get("format_version") != FORMAT_VERSION:
            raise ArtifactError(
                f"{path}: format {d.get('format')!r} v{d.get('format_version')} is not {FORMAT!r} "
                f"v{FORMAT_VERSION}; rebuild the artifacts with this ldm-rt"
            )
        try:
            return cls.from_dict(d)
        except (KeyError, TypeError, ValueError) as e:
            raise ArtifactError(f"{path} is malformed ({e!r}); rebuild the artifacts") from None

    def verify_file(self, folder: str | Path, entry: FileEntry) -> Path:
        """The file's path, after checking it exists and its size and sha256 match the manifest."""
        path = Path(folder) / entry.file
        if not path.is_file():
            raise ArtifactError(f"{path} is missing; rebuild the artifacts")
        if path.stat().st_size != entry.bytes or sha256_file(path) != entry.sha256:
            raise ArtifactError(f"{path} does not match the manifest's hash (truncated or changed); rebuild the artifacts")
        return path
