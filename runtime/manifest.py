"""The artifact manifest: what was built, from what, with which tools, and how well it matches.

Export writes it (last, atomically: a folder without a valid manifest is not a finished build);
the runtime reads it and refuses files whose hash does not match. It is also the language-neutral
description a native port reads: contracts, scheduler, tokenizer, latent facts, guidance convention.
"""

from __future__ import annotations

import hashlib
import json
import typing
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from . import files
from .atomic import atomic_write_text
from .contracts import ComponentContract, ModelFacts, ShapeProfile
from .files import FileFormatError, inside

FORMAT = "ldm-rt-artifacts"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
# The guidance convention every backend and port follows (one batched UNet call of 2B).
GUIDANCE = {
    "formula": "eps = eps_uncond + guidance * (eps_cond - eps_uncond)",
    "unet_batch_order": ["uncond", "cond"],
    # guidance <= 1 runs the conditional half only (eps_cond), as diffusers (`guidance_scale > 1` enables CFG):
    # SDXL-Turbo and SD-Turbo sample at guidance 0.
    "skip_uncond_when_guidance_at_most": 1.0,
}


# Upper bounds on the JSON files of an artifacts folder, checked before they are read into memory. Ours are far
# smaller (the default model's manifest is 0.2 MB with its sampler tables, SD's CLIP tokenizer.json 2 MB, a
# scheduler config under 30 kB even with 1000 trained betas); the tokenizer's bound is runtime/tokenizer.py's.
MAX_MANIFEST_BYTES = 16 << 20
MAX_SCHEDULER_CONFIG_BYTES = 1 << 20


class ArtifactError(FileFormatError):
    """Artifacts are missing, corrupt, stale or foreign; the message says which file and what to do."""


REBUILD = "rebuild the artifacts"


def confined(folder: str | Path, rel: str, named_by: str | Path) -> Path:
    """folder/rel, or one ArtifactError (the same whether or not the target exists) if it leaves `folder`;
    `named_by` is the file that named `rel`, for the message."""
    path = inside(folder, rel)
    if path is None:
        raise ArtifactError(
            f"{named_by} names the file {rel!r}, which lies outside the artifacts folder {folder} (an absolute path, "
            "'..', a backslash or drive, or a symlink out of it); refusing to read it; rebuild the artifacts"
        )
    return path


def read_bounded(path: Path, limit: int, what: str) -> bytes:
    return files.read_bounded(path, limit, what, error=ArtifactError, fix=REBUILD)


def utf8_text(data: bytes, path: Path) -> str:
    return files.utf8_text(data, path, error=ArtifactError, fix=REBUILD)


def json_object(data: bytes, path: Path) -> dict[str, Any]:
    """The JSON object in `data` (read from `path`); anything else is one ArtifactError naming the file."""
    return files.json_object(data, path, error=ArtifactError, fix=REBUILD)


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
    file: str  # relative to the artifacts folder; Manifest.verify_file refuses anything that leaves it
    sha256: str
    bytes: int

    def __post_init__(self) -> None:
        # A manifest is read from disk: wrong types here would surface later as a TypeError deep in a backend.
        if not isinstance(self.file, str) or not isinstance(self.sha256, str):
            raise TypeError(f"file and sha256 must be strings, got {self.file!r}, {self.sha256!r}")
        if isinstance(self.bytes, bool) or not isinstance(self.bytes, int) or self.bytes < 0:
            raise TypeError(f"bytes must be a non-negative integer, got {self.bytes!r} for {self.file!r}")

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
    # How its export went: peak resident memory of the export process while this component was exported
    # (`peak_rss_bytes`, sampled) and the process's peak so far (`process_peak_rss_bytes`); export/memory.RssWatch.
    export: dict[str, Any] = field(default_factory=dict)


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
    tokenizer_2: FileEntry | None = None  # SDXL's second tokenizer (text_encoder_2's ids; its own pad token)
    lora_targets: FileEntry | None = None  # where each LoRA-adaptable weight sits in the ONNX files (runtime/lora.py)
    # The --scheduler name the source folder's own scheduler maps to (runtime/scheduler_choice.py); "" in
    # builds that predate it, which sample with ddim unless told otherwise.
    default_scheduler: str = ""
    # The latent -> RGB map of fast step previews, fitted at export (runtime/previews.py); None in older builds.
    preview_factors: FileEntry | None = None

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        return {"format": FORMAT, "format_version": FORMAT_VERSION, **d}

    def bf16_failure(self, precision: str) -> tuple[str, bool] | None:
        """(why, measured) for the first component of the `precision` files whose bf16 parity failed at export
        (export/bf16.py), in one line; `measured`: OpenVINO's own bf16 failed (refuse bf16), else only the emulation
        did (warn). None when all passed or were built before bf16 parity existed."""
        for name, entry in self.components.items():
            pe = entry.precisions.get(precision)
            bf16 = pe.parity.get("bf16") if pe is not None else None
            if isinstance(bf16, dict) and bf16.get("passed") is False:
                measured = isinstance(bf16.get("openvino"), dict)
                r = bf16.get("openvino" if measured else "emulated")
                if isinstance(r, dict) and r.get("max_abs_err") and r.get("bound"):
                    err, bound = max(zip(r["max_abs_err"], r["bound"]), key=lambda eb: eb[0] - eb[1])
                    return f"{name} failed bf16 parity at export ({r.get('backend')}: max abs error {err:.3g} > bound {bound:.3g})", measured
                return f"{name} failed bf16 parity at export", measured
        return None

    def write(self, folder: str | Path) -> None:
        atomic_write_text(Path(folder) / MANIFEST, json.dumps(self.to_dict(), indent=2, sort_keys=False) + "\n")

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Manifest:
        """The manifest in `d`; a missing key or a value of the wrong JSON kind raises KeyError, TypeError or
        ValueError (Manifest.parse turns them into one ArtifactError naming the file)."""

        def obj(value: Any, what: str) -> dict[str, Any]:
            if not isinstance(value, dict):
                raise TypeError(f"{what} must be a JSON object, got {type(value).__name__}")
            return value

        def entry(e: Any, what: str) -> FileEntry:
            return FileEntry(**obj(e, what))

        def optional(e: Any, what: str) -> FileEntry | None:
            return None if e is None else entry(e, what)

        def variant(v: Any, what: str) -> OrtVariant | None:
            if v is None:
                return None
            v = obj(v, what)
            return OrtVariant(entry(v["onnx"], f"{what}.onnx"), obj(v.get("parity", {}), f"{what}.parity"), dict(obj(v.get("fused", {}), f"{what}.fused")))

        comps = {}
        for name, c in obj(d["components"], "components").items():
            c = obj(c, f"components.{name}")
            precisions = {}
            for p, v in obj(c["precisions"], f"components.{name}.precisions").items():
                at = f"components.{name}.precisions.{p}"
                v = obj(v, at)
                precisions[p] = PrecisionEntry(
                    entry(v["onnx"], f"{at}.onnx"), obj(v.get("parity", {}), f"{at}.parity"), list(v.get("kept_fp32", [])),
                    optional(v.get("external_data"), f"{at}.external_data"), variant(v.get("ort"), f"{at}.ort"),
                )
            engines = obj(c.get("engines", {}), f"components.{name}.engines")
            comps[name] = ComponentEntry(
                ComponentContract.from_dict(obj(c["contract"], f"components.{name}.contract")), precisions, engines,
                obj(c.get("export", {}), f"components.{name}.export"),
            )
        prof = obj(d["profile"], "profile")
        source = obj(d.get("source", {}), "source")
        if not isinstance(source.get("sha256", ""), str):  # the model hash every PNG and HTTP response names
            raise TypeError(f"source.sha256 must be a string, got {source['sha256']!r}")
        return cls(
            facts=_checked(ModelFacts, obj(d["facts"], "facts")),
            profile=ShapeProfile(
                *(_range(prof[k], f"profile.{k}") for k in ("batch", "height", "width")), _chunks(prof.get("prompt_chunks", 1))
            ),
            components=comps,
            tokenizer=optional(d.get("tokenizer"), "tokenizer"),
            scheduler=entry(d["scheduler"], "scheduler"),
            source=source,
            tools=obj(d.get("tools", {}), "tools"),
            tensorrt=obj(d.get("tensorrt", {}), "tensorrt"),
            created=d.get("created", ""),
            guidance=obj(d.get("guidance", dict(GUIDANCE)), "guidance"),
            sampler_spec=obj(d.get("sampler_spec", {}), "sampler_spec"),
            tokenizer_2=optional(d.get("tokenizer_2"), "tokenizer_2"),
            lora_targets=optional(d.get("lora_targets"), "lora_targets"),
            default_scheduler=_default_scheduler(d.get("default_scheduler", "")),
            preview_factors=optional(d.get("preview_factors"), "preview_factors"),
        )

    @classmethod
    def read(cls, folder: str | Path) -> Manifest:
        return cls.parse(cls.read_bytes(folder), Path(folder) / MANIFEST)

    @staticmethod
    def read_bytes(folder: str | Path) -> bytes:
        """The manifest's bytes (bounded, and only from a regular file inside `folder`)."""
        path = confined(folder, MANIFEST, folder)
        if not path.is_file():
            raise ArtifactError(
                f"{path} not found: {folder} is not a finished artifacts folder; build one with "
                "`python export/build_engines.py --model SRC --out DIR`"
            )
        return read_bounded(path, MAX_MANIFEST_BYTES, "manifest")

    @classmethod
    def parse(cls, data: bytes, path: Path) -> Manifest:
        d = json_object(data, path)
        if d.get("format") != FORMAT or d.get("format_version") != FORMAT_VERSION:
            raise ArtifactError(
                f"{path}: format {d.get('format')!r} v{d.get('format_version')} is not {FORMAT!r} "
                f"v{FORMAT_VERSION}; rebuild the artifacts with this ldm-rt"
            )
        try:
            return cls.from_dict(d)
        except (KeyError, TypeError, ValueError, AttributeError) as e:  # AttributeError: a list where a dict belongs
            raise ArtifactError(f"{path} is malformed ({e!r}); rebuild the artifacts") from None

    def verify_file(self, folder: str | Path, entry: FileEntry) -> Path:
        """The file's path, after checking it lies inside `folder`, exists, and its size and sha256 match the manifest."""
        path = confined(folder, entry.file, Path(folder) / MANIFEST)
        if not path.is_file():
            raise ArtifactError(f"{path} is missing; rebuild the artifacts")
        if path.stat().st_size != entry.bytes or sha256_file(path) != entry.sha256:
            raise ArtifactError(f"{path} does not match the manifest's hash (truncated or changed); rebuild the artifacts")
        return path

    def read_file(self, folder: str | Path, entry: FileEntry, limit: int, what: str) -> bytes:
        """The bytes of a small side file (tokenizer, scheduler config), read once, bounded, and checked against
        the manifest's size and hash: what is parsed is exactly what was verified."""
        path = confined(folder, entry.file, Path(folder) / MANIFEST)
        if entry.bytes > limit:  # refused before the file is touched
            raise ArtifactError(f"{Path(folder) / MANIFEST} lists {entry.file} at {entry.bytes} bytes, more than a {what} may have ({limit}); rebuild the artifacts")
        data = read_bounded(path, limit, what)
        if len(data) != entry.bytes or hashlib.sha256(data).hexdigest() != entry.sha256:
            raise ArtifactError(f"{path} does not match the manifest's hash (truncated or changed); rebuild the artifacts")
        return data


def _default_scheduler(value: Any) -> str:
    from .scheduler_choice import check_scheduler_name  # the scheduler registry, only when a manifest names one

    return "" if value == "" else check_scheduler_name(value, "default_scheduler")


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _range(value: Any, what: str) -> tuple[int, int, int]:
    """A profile range [min, opt, max] of positive integers."""
    if not (isinstance(value, list) and len(value) == 3 and all(_is_int(v) for v in value) and 0 < value[0] <= value[1] <= value[2]):
        raise ValueError(f"{what} must be [min, opt, max] with 0 < min <= opt <= max, got {value!r}")
    return (value[0], value[1], value[2])


def _chunks(value: Any) -> int:
    """profile.prompt_chunks: a positive integer (absent in builds that predate it: 1)."""
    if not _is_int(value) or value < 1:
        raise ValueError(f"profile.prompt_chunks must be a positive integer, got {value!r}")
    return value


def _matches(value: Any, t: Any) -> bool:
    if t is type(None):
        return value is None
    if t is int:
        return _is_int(value)
    if t is float:  # JSON writes 1.0 as 1 in some tools
        return _is_int(value) or isinstance(value, float)
    return isinstance(value, t)


def _checked(cls: type, data: dict[str, Any]) -> Any:
    """cls(**data) after checking each value against its field's type (int, float, str or X | None): the
    runtime does arithmetic with these facts, where a string would fail far from the manifest."""
    hints = typing.get_type_hints(cls)
    for key, value in data.items():
        if key in hints and not any(_matches(value, t) for t in typing.get_args(hints[key]) or (hints[key],)):
            raise TypeError(f"{cls.__name__} field {key} has the wrong type: {value!r}")
    return cls(**data)
