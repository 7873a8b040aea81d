"""LoRA adapters (Hu et al. 2021) without torch: file formats, key names, scales, and the weight deltas.

    W' = W + sum over files of  scale * (alpha / rank) * up @ down

A LoRA file is read from a local `.safetensors` (parsed here: numpy has no bf16, so bf16/fp16 tensors are
widened to float32; nothing is ever unpickled; `.pt`/`.ckpt` are refused with the conversion to use). Key
layouts understood, as diffusers' `loaders/lora_conversion_utils.py` and kohya's sd-scripts write them:

- diffusers / PEFT: `unet.<module>.lora_A.weight` (down) / `lora_B.weight` (up), `text_encoder.*`,
  `text_encoder_2.*`; alpha from the file's `lora_adapter_metadata` (`<prefix>.lora_alpha`, `alpha_pattern`,
  `use_rslora`) or `<module>.alpha` keys, else alpha = rank (diffusers' rule); also the older
  `<module>.lora.down.weight` / `lora.up.weight`.
- kohya / A1111: `lora_unet_<flattened module>.lora_down.weight` / `lora_up.weight` / `.alpha`,
  `lora_te_*` (SD 1.x/2.x), `lora_te1_*` / `lora_te2_*` (SDXL); LoCon: a 3x3 (or any kxk) conv down, a 1x1 up.

Module names are resolved against the model's own table of targetable modules (`ModuleTable`: our name ->
the other names the same module goes by, e.g. the UNet's diffusers name), built by reference/lora.py from the
key maps and recorded at export in `lora_targets.json` for the runtime. Kohya's flattened names are ambiguous
about `_` vs `.`, so they are looked up among the flattened real names, never split by guessing. A file whose
keys match nothing, and any key that does not match, is refused in one line naming them.

This module also reads ONNX initializers straight from the protobuf wire format (no `onnx` package in the
runtime), and writes the graph with its weights referring to their bytes in the file, so the backends can patch
the LoRA-targeted weights of artifacts when they open them. Deltas are computed one module at a time, as each
weight is patched (`ModuleDelta`), and `ldm-rt info --lora` describes what a model's LoRAs can touch.
"""

from __future__ import annotations

import hashlib
import json
import math
import mmap
import os
import re
import struct
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .files import FileFormatError, file_specs, inside, read_bounded, read_json_object, split_file_arg
from .manifest import Manifest

SAFETENSORS_SUFFIX = ".safetensors"
PICKLE_SUFFIXES = (".pt", ".pth", ".ckpt", ".bin")
# Bounds before memory is spent. The largest LoRA/LoCon files in circulation are ~2 GB (full-rank SDXL);
# a safetensors header is a few hundred KB even for those.
MAX_LORA_BYTES = 8 << 30
MAX_HEADER_BYTES = 64 << 20
MAX_LORAS = 32  # per pipeline or build; each costs a pass over the targeted weights
MAX_LORA_LISTING = 1000  # files `ldm-rt info --lora` reads (each is read whole to check it)
MAX_SCALE = 1e3  # scales beyond this are typos (A1111's UI goes to +-2; experiments to ~10)
TARGETS_FILE = "lora_targets.json"
TARGETS_FORMAT = "ldm-rt-lora-targets"
TARGETS_VERSION = 1
MAX_TARGETS_BYTES = 64 << 20

# diffusers / kohya prefix -> component of ours
DIFFUSERS_PREFIXES = {"unet.": "unet", "text_encoder.": "text_encoder", "text_encoder_2.": "text_encoder_2"}
KOHYA_PREFIXES = {"lora_unet_": "unet", "lora_te_": "text_encoder", "lora_te1_": "text_encoder", "lora_te2_": "text_encoder_2"}
# suffix -> role of the tensor in its layer
SUFFIXES = {
    ".lora_A.weight": "down", ".lora_B.weight": "up",
    ".lora_down.weight": "down", ".lora_up.weight": "up",
    ".lora.down.weight": "down", ".lora.up.weight": "up",
    ".alpha": "alpha",
}  # fmt: skip
# Adapter kinds we do not apply (LoHa, LoKr, DoRA, full diffs, norms): named in the refusal.
UNSUPPORTED = re.compile(r"\.(hada_|lokr_|dora_scale|lora_magnitude_vector|diff|diff_b|on_input|w_norm|b_norm|lora_mid)")

_DTYPES = {"F32": np.float32, "F16": np.float16, "F64": np.float64, "BF16": "bf16"}


class LoraError(FileFormatError):
    """A LoRA file or argument cannot be used; the one-line message names the file, the problem and the fix."""


# ---- arguments ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class LoraSpec:
    """One LoRA to apply: its file and its scale (the strength, A1111's `<lora:name:scale>`)."""

    path: Path
    scale: float = 1.0

    def __post_init__(self) -> None:
        object.__setattr__(self, "path", Path(self.path))
        scale = self.scale
        if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale) or abs(scale) > MAX_SCALE:
            raise LoraError(f"LoRA scale for {self.path.name} must be a finite number within +-{MAX_SCALE:g}, got {scale!r}")
        object.__setattr__(self, "scale", float(scale))


def parse_lora_arg(text: str) -> LoraSpec:
    """"FILE[:SCALE]" -> LoraSpec (runtime/files.py split_file_arg); the scale must be a number."""
    path, tail = split_file_arg(text, (SAFETENSORS_SUFFIX, *PICKLE_SUFFIXES))
    if tail is None:
        return LoraSpec(path, 1.0)
    try:
        scale = float(tail)
    except ValueError:
        raise LoraError(f"--lora {text}: scale {tail!r} is not a number; use FILE or FILE:SCALE, e.g. style.safetensors:0.8") from None
    return LoraSpec(path, scale)


def as_specs(loras: Iterable[LoraSpec | tuple[str | Path, float] | str | Path] | None) -> list[LoraSpec]:
    """What Pipeline.load(loras=...) and the build accept: LoraSpec, (file, scale) pairs, or "FILE[:SCALE]"."""
    return file_specs(loras, LoraSpec, parse_lora_arg, error=LoraError, noun="LoRA", value="scale", limit=MAX_LORAS, verb="applied")


# ---- files ---------------------------------------------------------------------------------------------------
@dataclass
class LoraFile:
    path: Path
    sha256: str
    tensors: dict[str, np.ndarray]  # float32
    metadata: dict[str, str] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return self.path.name

    def record(self, scale: float) -> dict[str, Any]:
        """What manifests and image metadata say about this LoRA."""
        return {"file": self.name, "sha256": self.sha256, "scale": scale}


def _bf16_to_f32(raw: np.ndarray) -> np.ndarray:
    return (raw.astype(np.uint32) << 16).view(np.float32)


def read_safetensors(
    path: Path, limit: int = MAX_LORA_BYTES, *, kind: str = "LoRA", error: type[FileFormatError] = LoraError
) -> tuple[dict[str, np.ndarray], dict[str, str], str]:
    """(tensors as float32, the header's __metadata__, sha256 of the file) from a .safetensors file, every
    offset and size checked against the file before anything is read. float32/float16/bfloat16/float64 only.
    `kind` names the file in errors ("LoRA", "embedding"), raised as `error`."""
    fix = "download the file again or convert it to .safetensors"
    # Bounded, regular file only (a FIFO is refused, not waited on): runtime/files.py, the one owner.
    data = read_bounded(path, limit, f"{kind} file", error=error, fix=f"pass {'an' if kind[0] in 'aeiou' else 'a'} {kind} .safetensors file")
    if len(data) < 8:
        raise error(f"{kind} {path} is truncated ({len(data)} bytes); {fix}")
    size = len(data)
    (n,) = struct.unpack("<Q", data[:8])
    if n > MAX_HEADER_BYTES or 8 + n > size:
        raise error(f"{kind} {path} is truncated or not a safetensors file (header of {n} bytes in a {size}-byte file); {fix}")
    try:
        header = json.loads(data[8 : 8 + n].decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        raise error(f"{kind} {path} has a corrupt safetensors header; {fix}") from None
    if not isinstance(header, dict):
        raise error(f"{kind} {path} has a corrupt safetensors header; {fix}")
    meta = header.pop("__metadata__", None) or {}
    if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
        raise error(f"{kind} {path}: __metadata__ must map strings to strings; {fix}")
    base = 8 + n
    tensors: dict[str, np.ndarray] = {}
    for key, info in header.items():
        try:
            dtype, shape, (start, end) = info["dtype"], [int(d) for d in info["shape"]], info["data_offsets"]
        except (TypeError, KeyError, ValueError):
            raise error(f"{kind} {path}: tensor {key!r} has a malformed header entry; {fix}") from None
        if dtype not in _DTYPES:
            raise error(f"{kind} {path}: tensor {key!r} is {dtype}; {kind} tensors must be F32, F16, BF16 or F64")
        itemsize = 2 if dtype in ("F16", "BF16") else np.dtype(_DTYPES[dtype]).itemsize
        count = math.prod(shape)
        if any(d < 0 for d in shape) or not (0 <= start <= end) or end - start != count * itemsize:
            raise error(f"{kind} {path}: tensor {key!r} has inconsistent offsets; {fix}")
        if base + end > size:
            raise error(f"{kind} {path} is truncated: tensor {key!r} ends at byte {base + end} of {size}; {fix}")
        raw = data[base + start : base + end]
        if dtype == "BF16":
            arr = _bf16_to_f32(np.frombuffer(raw, np.uint16))
        else:
            arr = np.frombuffer(raw, _DTYPES[dtype]).astype(np.float32)
        tensors[key] = arr.reshape(shape)
    return tensors, dict(meta), hashlib.sha256(data).hexdigest()


def read_lora(path: str | Path) -> LoraFile:
    """A LoRA .safetensors file (the runtime's only format: pickles are refused, not opened)."""
    path = Path(path)
    if path.suffix.lower() in PICKLE_SUFFIXES:
        raise LoraError(
            f"LoRA {path} is a pickle ({path.suffix}), which the runtime never loads; convert it to .safetensors "
            "(python -c \"import torch, safetensors.torch as s; s.save_file(torch.load('IN', weights_only=True), 'OUT.safetensors')\")"
        )
    if path.suffix.lower() != SAFETENSORS_SUFFIX:
        raise LoraError(f"LoRA {path}: unknown file type {path.suffix!r}; pass a .safetensors file")
    tensors, meta, digest = read_safetensors(path)
    if not tensors:
        raise LoraError(f"LoRA {path} holds no tensors")
    return LoraFile(path, digest, tensors, meta)


# ---- layers and names ------------------------------------------------------------------------------------------
@dataclass
class LoraLayer:
    """One adapted module of a file: its name as the file writes it (prefix included), down, up, alpha."""

    key: str
    down: np.ndarray | None = None  # (rank, in) or (rank, in, kh, kw)
    up: np.ndarray | None = None  # (out, rank) or (out, rank, 1, 1)
    alpha: float | None = None

    @property
    def rank(self) -> int:
        assert self.down is not None
        return int(self.down.shape[0])

    def delta(self) -> np.ndarray:
        """(alpha / rank) * up @ down, flattened to (out, in * kh * kw) in float32 (the caller reshapes)."""
        assert self.down is not None and self.up is not None
        rank = self.rank
        up = self.up.reshape(self.up.shape[0], -1)
        if up.shape[1] != rank:
            raise LoraError(f"{self.key}: up {tuple(self.up.shape)} and down {tuple(self.down.shape)} disagree on the rank")
        alpha = rank if self.alpha is None else self.alpha
        return (up @ self.down.reshape(rank, -1)) * np.float32(alpha / rank)


def _peft_alphas(meta: Mapping[str, str], path: Path) -> dict[str, dict[str, Any]]:
    """Per prefix ("unet", "text_encoder", ...): the PEFT config diffusers stored in the file's metadata."""
    raw = meta.get("lora_adapter_metadata")
    if not raw:
        return {}
    try:
        cfg = json.loads(raw)
    except ValueError:
        raise LoraError(f"LoRA {path}: lora_adapter_metadata is not JSON; fix or drop the metadata") from None
    if not isinstance(cfg, dict):
        raise LoraError(f"LoRA {path}: lora_adapter_metadata must be a JSON object")
    out: dict[str, dict[str, Any]] = {}
    for key, value in cfg.items():
        prefix, _, name = key.partition(".")
        if name:
            out.setdefault(prefix, {})[name] = value
        else:  # a PEFT config saved for one model, without prefixes
            out.setdefault("", {})[key] = value
    return out


def _pattern_value(patterns: Mapping[str, Any], module: str) -> Any:
    """PEFT's alpha_pattern lookup: a key matches a module whose name ends with it (or is a regex of it)."""
    for pattern, value in patterns.items():
        if module == pattern or module.endswith("." + pattern) or re.fullmatch(rf"(.*\.)?{pattern}", module):
            return value
    return None


def split_layers(lora: LoraFile) -> tuple[dict[str, LoraLayer], list[str]]:
    """The file's layers by key (prefix + module as written), and the keys that belong to no LoRA layer."""
    layers: dict[str, LoraLayer] = {}
    unknown: list[str] = []
    for key, value in lora.tensors.items():
        if UNSUPPORTED.search(key):
            unknown.append(key)
            continue
        for suffix, role in SUFFIXES.items():
            if key.endswith(suffix):
                layer = layers.setdefault(key[: -len(suffix)], LoraLayer(key[: -len(suffix)]))
                if role == "alpha":
                    if value.size != 1:
                        raise LoraError(f"LoRA {lora.path}: {key} must be one number, has shape {tuple(value.shape)}")
                    layer.alpha = float(value.reshape(()))
                else:
                    if value.ndim not in (2, 4):
                        raise LoraError(f"LoRA {lora.path}: {key} has shape {tuple(value.shape)}; LoRA matrices are 2-D (Linear) or 4-D (Conv)")
                    setattr(layer, role, value)
                break
        else:
            unknown.append(key)
    incomplete = [k for k, layer in layers.items() if layer.down is None or layer.up is None]
    unknown += [f"{k} (no {'down' if layers[k].down is None else 'up'} matrix)" for k in incomplete]
    for k in incomplete:
        del layers[k]
    peft = _peft_alphas(lora.metadata, lora.path)
    for key, layer in layers.items():
        if layer.alpha is not None:
            continue
        prefix, _, module = key.partition(".")
        cfg = peft.get(prefix) or peft.get("", {})
        if not cfg:
            continue
        if cfg.get("use_dora"):
            raise LoraError(f"LoRA {lora.path} is a DoRA adapter (use_dora), which ldm-rt does not apply")
        alpha = _pattern_value(cfg.get("alpha_pattern") or {}, module)
        if alpha is None:
            alpha = cfg.get("lora_alpha")
        if alpha is not None:
            alpha = float(alpha)
            if cfg.get("use_rslora"):  # rsLoRA scales by alpha / sqrt(rank): the same as alpha' / rank
                alpha = alpha * math.sqrt(layer.rank)
            layer.alpha = alpha
    return layers, unknown


@dataclass(frozen=True)
class ModuleInfo:
    """A module LoRA may target: its weight's shape, and the other names the same module goes by."""

    shape: tuple[int, ...]
    aliases: tuple[str, ...] = ()


ModuleTable = Mapping[str, Mapping[str, ModuleInfo]]  # component -> our module name -> info


def _lookups(table: ModuleTable) -> tuple[dict[str, dict[str, str]], dict[str, dict[str, str | None]]]:
    """Per component: dotted name -> module, and flattened (kohya) name -> module (None when ambiguous)."""
    dotted: dict[str, dict[str, str]] = {}
    flat: dict[str, dict[str, str | None]] = {}
    for component, modules in table.items():
        d, f = dotted.setdefault(component, {}), flat.setdefault(component, {})
        for module, info in modules.items():
            for name in (module, *info.aliases):
                d[name] = module
                key = name.replace(".", "_")
                f[key] = module if f.get(key, module) == module else None
    return dotted, flat


def _resolve(key: str, dotted: Mapping[str, Mapping[str, str]], flat: Mapping[str, Mapping[str, str | None]]) -> tuple[str, str | None, str]:
    """(component, module or None, why not) of a layer key."""
    for prefix, component in sorted(KOHYA_PREFIXES.items(), key=lambda kv: -len(kv[0])):
        if key.startswith(prefix):
            if component not in flat:
                return component, None, f"this model has no {component}"
            module = flat[component].get(key[len(prefix):], "")
            return component, module or None, "ambiguous flattened name" if module is None else "no such module"
    for prefix, component in DIFFUSERS_PREFIXES.items():
        if key.startswith(prefix):
            if component not in dotted:
                return component, None, f"this model has no {component}"
            return component, dotted[component].get(key[len(prefix):]), "no such module"
    # A bare PEFT state dict of a UNet (diffusers' oldest layout has no prefix).
    return "unet", dotted.get("unet", {}).get(key), "no such module"


def _examples(keys: Sequence[str], n: int = 3) -> str:
    shown = ", ".join(keys[:n])
    return shown + (f" and {len(keys) - n} more" if len(keys) > n else "")


def file_layers(lora: LoraFile, table: ModuleTable) -> dict[str, dict[str, LoraLayer]]:
    """component -> our module name -> the file's layer adapting it, every layer's delta shape checked against
    the module's weight (no delta is computed). A LoraError when no key matches (another architecture), or
    naming every key that does not."""
    layers, unknown = split_layers(lora)
    dotted, flat = _lookups(table)
    out: dict[str, dict[str, LoraLayer]] = {}
    unmatched: list[str] = []
    missing_components: set[str] = set()
    for key, layer in layers.items():
        component, module, why = _resolve(key, dotted, flat)
        if module is None:
            unmatched.append(key)
            if why.startswith("this model has no"):
                missing_components.add(component)
            continue
        shape = table[component][module].shape
        assert layer.down is not None and layer.up is not None
        if layer.up.reshape(layer.up.shape[0], -1).shape[1] != layer.rank:
            raise LoraError(f"LoRA {lora.path}: {key}: up {tuple(layer.up.shape)} and down {tuple(layer.down.shape)} disagree on the rank")
        made = (layer.up.shape[0], math.prod(layer.down.shape[1:]))  # the delta's (out, in * kh * kw)
        if math.prod(made) != math.prod(shape):
            out_in = f"({', '.join(map(str, shape))})"
            raise LoraError(
                f"LoRA {lora.path}: {key} makes a {made} delta for {component} {module} of shape {out_in}: "
                "a LoRA for another architecture (e.g. SD 2.x vs 1.x vs SDXL)?"
            )
        if module in out.get(component, {}):
            raise LoraError(f"LoRA {lora.path}: {component} {module} is adapted twice (e.g. as {key}); the file is inconsistent")
        out.setdefault(component, {})[module] = layer
    total = len(lora.tensors)
    if not out and not unknown:
        hint = f" (keys for {', '.join(sorted(missing_components))}, which this model lacks)" if missing_components else ""
        raise LoraError(
            f"LoRA {lora.path}: none of its {total} keys names a module of this model{hint}, e.g. "
            f"{_examples(sorted(lora.tensors))}: a LoRA for another architecture?"
        )
    bad = sorted(unmatched) + sorted(unknown)
    if bad:
        raise LoraError(
            f"LoRA {lora.path}: {len(bad)} of its layers/keys match no module of this model or are of an unsupported kind "
            f"(LoHa, LoKr, DoRA, ...): {_examples(bad, 5)}; use a LoRA made for this model"
        )
    return out


def file_deltas(lora: LoraFile, table: ModuleTable) -> dict[str, dict[str, np.ndarray]]:
    """component -> our module name -> (alpha / rank) * up @ down shaped as the module's weight, for one file
    (scale 1). A LoraError as file_layers says."""
    return {c: {m: layer.delta().reshape(table[c][m].shape) for m, layer in ms.items()} for c, ms in file_layers(lora, table).items()}


@dataclass(frozen=True)
class ModuleDelta:
    """What the LoRAs add to one module's weight, computed when asked (`array`): a backend patching weights one
    at a time then holds one delta, not all of them (an SD UNet's adapted weights in float32 are ~1 GB)."""

    parts: tuple[tuple[LoraLayer, float], ...]  # each file's layer for the module, and that file's scale
    shape: tuple[int, ...]

    def array(self) -> np.ndarray:
        """sum over files of scale * (alpha / rank) * up @ down, float32, the module's shape."""
        total = None
        for layer, scale in self.parts:
            scaled = layer.delta().reshape(self.shape) * np.float32(scale)
            total = scaled if total is None else total + scaled
        assert total is not None
        return total


def lazy_deltas(loras: Sequence[tuple[LoraFile, float]], table: ModuleTable) -> dict[str, dict[str, ModuleDelta]]:
    """component -> module -> ModuleDelta over every file (each checked whole first, file_layers): every
    refusal comes before any weight is touched, and no delta is computed yet."""
    parts: dict[str, dict[str, list[tuple[LoraLayer, float]]]] = {}
    for lora, scale in loras:
        for component, layers in file_layers(lora, table).items():
            for module, layer in layers.items():
                parts.setdefault(component, {}).setdefault(module, []).append((layer, scale))
    return {c: {m: ModuleDelta(tuple(p), tuple(table[c][m].shape)) for m, p in ms.items()} for c, ms in parts.items()}


# ---- ONNX initializers, read from the protobuf wire format --------------------------------------------------------
# ModelProto.graph = 7; GraphProto.initializer = 5; TensorProto: dims 1, data_type 2, name 8, raw_data 9,
# external_data 13 (key 1, value 2), data_location 14. (onnx/onnx.proto3)
ONNX_DTYPES = {1: np.float32, 10: np.float16, 11: np.float64}


def _varint(buf: memoryview | bytes, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        if pos >= len(buf):
            raise LoraError("truncated protobuf varint")
        b = buf[pos]
        pos += 1
        result |= (b & 0x7F) << shift
        if not b & 0x80:
            return result, pos
        shift += 7
        if shift > 63:
            raise LoraError("malformed protobuf varint")


def _fields(buf: memoryview, start: int, end: int) -> Iterable[tuple[int, int, Any]]:
    """(field number, wire type, value) over one message: varints as int, length-delimited as (start, end)."""
    pos = start
    while pos < end:
        tag, pos = _varint(buf, pos)
        number, wire = tag >> 3, tag & 7
        if wire == 0:
            value, pos = _varint(buf, pos)
        elif wire == 2:
            n, pos = _varint(buf, pos)
            if pos + n > end:
                raise LoraError("protobuf field runs past its message")
            value, pos = (pos, pos + n), pos + n
        elif wire == 1:
            value, pos = None, pos + 8
        elif wire == 5:
            value, pos = None, pos + 4
        else:
            raise LoraError(f"unsupported protobuf wire type {wire}")
        yield number, wire, value


@dataclass(frozen=True)
class Initializer:
    name: str
    dtype: Any
    shape: tuple[int, ...]
    raw: tuple[int, int] | None  # span of raw_data in the .onnx file
    external: dict[str, str] | None  # location/offset/length in a .data file


def _map(path: Path) -> memoryview:
    """The file's bytes, memory-mapped read-only (closed when the last view of it goes)."""
    with open(path, "rb") as f:
        if os.fstat(f.fileno()).st_size == 0:
            raise LoraError(f"{path} is empty; rebuild the artifacts")
        return memoryview(mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ))


def _scan(buf: memoryview, path: Path, names: set[str]) -> dict[str, Initializer]:
    found: dict[str, Initializer] = {}
    for number, wire, value in _fields(buf, 0, len(buf)):
        if number != 7 or wire != 2:
            continue
        for gnum, gwire, gval in _fields(buf, *value):
            if gnum == 5 and gwire == 2:
                init = _tensor(buf, *gval)
                if init.name in names:
                    found[init.name] = init
    missing = sorted(names - set(found))
    if missing:
        raise LoraError(f"{path} has no initializer {_examples(missing)}; rebuild the artifacts with this ldm-rt")
    bad = sorted(n for n, i in found.items() if i.dtype is None)
    if bad:
        raise LoraError(f"{path}: initializer {_examples(bad)} is not float32/float16; rebuild the artifacts")
    return found


def initializer_table(path: Path) -> dict[str, Initializer]:
    """Every initializer of the ONNX file at `path` by name: its dtype (None if not float), shape and where its data
    is (nothing of the data is read)."""
    buf = _map(path)
    out: dict[str, Initializer] = {}
    for number, wire, value in _fields(buf, 0, len(buf)):
        if number == 7 and wire == 2:
            for gnum, gwire, gval in _fields(buf, *value):
                if gnum == 5 and gwire == 2:
                    init = _tensor(buf, *gval)
                    out[init.name] = init
    return out


def iter_initializers(path: Path, names: set[str]) -> Iterator[tuple[str, np.ndarray]]:
    """(name, array) for each initializer of `names` in the ONNX file at `path` (its stored dtype and shape), raw
    or in external data files beside it (confined to its folder), read one at a time into its own array, so a
    caller patching them holds one base weight at a time. A LoraError when one is missing."""
    buf = _map(path)  # only the protobuf framing is read through the map; the weights are read with pread
    found = _scan(buf, path, names)
    with open(path, "rb") as f:
        for name, init in found.items():
            count = math.prod(init.shape)
            if init.raw is not None:
                a, b = init.raw
                if b - a != count * np.dtype(init.dtype).itemsize:
                    raise LoraError(f"{path}: initializer {name} has {b - a} bytes for shape {init.shape}; rebuild the artifacts")
                arr = np.frombuffer(os.pread(f.fileno(), b - a, a), init.dtype, count=count)
            else:
                arr = _external(path, init, count)
            yield name, arr.reshape(init.shape)


def onnx_initializers(path: Path, names: set[str]) -> dict[str, np.ndarray]:
    """The initializers `names` of the ONNX file at `path` as numpy arrays (iter_initializers)."""
    return dict(iter_initializers(path, names))


# Initializers up to this size keep their data in the graph: shape constants among them, whose values graph
# optimisers read (weights are far larger).
INLINE_BYTES = 1024


def _encode_varint(n: int) -> bytes:
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def _delimited(number: int, payload: bytes) -> bytes:
    return _encode_varint(number << 3 | 2) + _encode_varint(len(payload)) + payload


def _field_spans(buf: memoryview, start: int, end: int) -> Iterable[tuple[int, int, Any, int, int]]:
    """_fields, with each field's whole span (tag included): (number, wire, value, field start, field end)."""
    pos = start
    for number, wire, value in _fields(buf, start, end):
        field_start = pos
        if wire == 2:
            pos = value[1]
        elif wire == 0:
            _, pos = _varint(buf, _varint(buf, pos)[1])
        else:
            pos = _varint(buf, pos)[1] + (8 if wire == 1 else 4)
        yield number, wire, value, field_start, pos


def _externalised(
    buf: memoryview, start: int, end: int, location: str, patched: set[str], shapes: Mapping[str, Sequence[int]] | None = None
) -> bytes:
    """One TensorProto: if it holds raw data over INLINE_BYTES, or is to be patched, the same tensor with that
    data referenced in place (external data: `location`, the data's offset and length) instead of copied; with
    its dims replaced by `shapes[name]` when given (a patched tensor of another shape)."""
    fields = list(_field_spans(buf, start, end))
    raw = next((v for n, w, v, _, _ in fields if n == 9 and w == 2), None)
    name = next((bytes(buf[v[0] : v[1]]).decode("utf-8", "replace") for n, w, v, _, _ in fields if n == 8 and w == 2), "")
    dims = shapes.get(name) if shapes else None
    # ONNX Runtime refuses a replacement whose dims differ from the graph's: TensorProto.dims (1) rewritten.
    new_dims = b"" if dims is None else b"".join(_encode_varint(1 << 3) + _encode_varint(int(d)) for d in dims)
    resized = (1,) if dims is not None else ()
    if raw is None or (raw[1] - raw[0] <= INLINE_BYTES and name not in patched):
        return bytes(buf[start:end]) if dims is None else new_dims + b"".join(bytes(buf[a:b]) for n, _, _, a, b in fields if n not in resized)
    kept = new_dims + b"".join(bytes(buf[a:b]) for n, _, _, a, b in fields if n not in (9, 13, 14, *resized))
    entries = [("location", location), ("offset", str(raw[0])), ("length", str(raw[1] - raw[0]))]
    external = b"".join(_delimited(13, _delimited(1, k.encode()) + _delimited(2, v.encode())) for k, v in entries)
    return kept + external + _encode_varint(14 << 3) + _encode_varint(1)  # data_location = EXTERNAL


def external_model_bytes(path: Path, patched: set[str], shapes: Mapping[str, Sequence[int]] | None = None) -> bytes:
    """The ONNX file's protobuf with the data of every initializer over INLINE_BYTES, and of every one named in
    `patched`, left in the file: each refers to its own bytes there as external data (location: the file's
    name), so ONNX Runtime, loading these bytes with the file's folder as the external data folder, reads the
    weights from the file as it would from its path, and the patched ones can replace them before any graph
    optimisation sees them (SessionOptions.add_external_initializers takes external initializers only). `shapes`:
    new dims for patched initializers whose replacement is of another shape (a token table with added rows).
    The result is the graph's structure and small constants: kilobytes to a few megabytes, not a copy of the
    weights. Initializers already in external data stay as they are."""
    buf = _map(path)
    _scan(buf, path, patched)  # every patched one exists (a LoraError naming any that does not)
    out = []
    for number, wire, value, a, b in _field_spans(buf, 0, len(buf)):
        if number != 7 or wire != 2:
            out.append(bytes(buf[a:b]))
            continue
        graph = []
        for gnum, gwire, gval, ga, gb in _field_spans(buf, *value):
            graph.append(_delimited(5, _externalised(buf, *gval, path.name, patched, shapes)) if gnum == 5 and gwire == 2 else bytes(buf[ga:gb]))
        out.append(_delimited(7, b"".join(graph)))
    return b"".join(out)


def _tensor(buf: memoryview, start: int, end: int) -> Initializer:
    dims: list[int] = []
    dtype = name = raw = None
    external: dict[str, str] = {}
    location = 0
    for number, wire, value in _fields(buf, start, end):
        if number == 1:
            if wire == 0:
                dims.append(value)
            else:  # packed
                pos, stop = value
                while pos < stop:
                    d, pos = _varint(buf, pos)
                    dims.append(d)
        elif number == 2:
            dtype = ONNX_DTYPES.get(value)
        elif number == 8:
            name = bytes(buf[value[0] : value[1]]).decode("utf-8", "replace")
        elif number == 9:
            raw = value
        elif number == 13:  # StringStringEntryProto: key = 1, value = 2
            entry = {k: bytes(buf[v[0] : v[1]]).decode("utf-8", "replace") for k, w, v in _fields(buf, *value) if w == 2}
            if 1 in entry:
                external[entry[1]] = entry.get(2, "")
        elif number == 14:
            location = value
    if location == 1 and "location" not in external:
        raise LoraError(f"initializer {name!r} has external data but no location; rebuild the artifacts")
    return Initializer(name or "", dtype, tuple(dims), raw if location != 1 else None, external if location == 1 else None)


def _external(path: Path, init: Initializer, count: int) -> np.ndarray:
    info = init.external or {}
    target = inside(path.parent, info.get("location", ""))
    if target is None:
        raise LoraError(f"{path}: initializer {init.name} points outside its folder; rebuild the artifacts")
    offset, length = int(info.get("offset", 0)), int(info.get("length", count * np.dtype(init.dtype).itemsize))
    if length != count * np.dtype(init.dtype).itemsize:
        raise LoraError(f"{path}: initializer {init.name} has inconsistent external data; rebuild the artifacts")
    with open(target, "rb") as f:
        f.seek(offset)
        data = f.read(length)
    if len(data) != length:
        raise LoraError(f"{target} is truncated; rebuild the artifacts")
    return np.frombuffer(data, init.dtype)


# ---- the targets an export recorded ------------------------------------------------------------------------------
@dataclass(frozen=True)
class Target:
    """Where one module's weight lives in one ONNX file: the initializer and whether it is stored transposed
    (a Linear exported as MatMul holds W^T)."""

    initializer: str
    transposed: bool


@dataclass
class LoraTargets:
    """lora_targets.json of an artifacts folder: the module table, and per ONNX file (by its path relative to
    the folder and its sha256) which initializer holds each module's weight."""

    modules: dict[str, dict[str, ModuleInfo]]
    # rel path -> {"sha256": ..., "component": ..., "targets": {module: Target}, "unused": [module, ...]}: unused
    # modules are those the file's outputs do not depend on (export/lora_targets.py), so a LoRA on them changes nothing.
    files: dict[str, dict[str, Any]]

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": TARGETS_FORMAT,
            "version": TARGETS_VERSION,
            "modules": {c: {m: {"shape": list(i.shape), "aliases": list(i.aliases)} for m, i in ms.items()} for c, ms in self.modules.items()},
            "files": {
                rel: {"sha256": f["sha256"], "component": f["component"],
                      "targets": {m: [t.initializer, "T" if t.transposed else "W"] for m, t in f["targets"].items()},
                      **({"unused": sorted(f["unused"])} if f.get("unused") else {})}
                for rel, f in self.files.items()
            },
        }  # fmt: skip

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], where: Path) -> LoraTargets:
        if d.get("format") != TARGETS_FORMAT or d.get("version") != TARGETS_VERSION:
            raise LoraError(f"{where} is not an ldm-rt LoRA targets file of version {TARGETS_VERSION}; rebuild the artifacts")
        try:
            modules = {
                str(c): {str(m): ModuleInfo(tuple(int(s) for s in i["shape"]), tuple(str(a) for a in i["aliases"])) for m, i in ms.items()}
                for c, ms in d["modules"].items()
            }
            files = {}
            for rel, f in d["files"].items():
                targets = {}
                for m, (init, layout) in f["targets"].items():
                    if layout not in ("W", "T"):
                        raise ValueError(layout)
                    targets[str(m)] = Target(str(init), layout == "T")
                unused = f.get("unused", [])  # optional: files written before it was recorded have none
                if not isinstance(unused, list):
                    raise ValueError(unused)
                files[str(rel)] = {"sha256": str(f["sha256"]), "component": str(f["component"]), "targets": targets,
                                   "unused": [str(m) for m in unused]}  # fmt: skip
        except (KeyError, TypeError, ValueError, AttributeError):
            raise LoraError(f"{where} is malformed; rebuild the artifacts") from None
        return cls(modules, files)

    @classmethod
    def read(cls, folder: Path, manifest: Manifest | None = None) -> LoraTargets:
        """The folder's lora_targets.json as its manifest lists it (confined, size and sha256 checked); the
        manifest is read from the folder unless given."""
        manifest = Manifest.read(folder) if manifest is None else manifest
        if manifest.lora_targets is None:
            raise LoraError(f"{folder} records no LoRA targets ({TARGETS_FILE}): it was built before LoRA support; rebuild it with this ldm-rt")
        path = manifest.verify_file(folder, manifest.lora_targets)
        d = read_json_object(path, error=LoraError, fix="rebuild the artifacts", limit=MAX_TARGETS_BYTES, what="LoRA targets file")
        return cls.from_dict(d, path)


def patched_initializers(
    onnx_path: Path, rel: str, sha256: str, targets: LoraTargets, deltas: Mapping[str, Mapping[str, ModuleDelta | np.ndarray]]
) -> dict[str, np.ndarray]:
    """initializer name -> patched weight (the file's dtype and layout) for the ONNX file `rel` of an artifacts
    folder: base weight read from the file plus the delta of every module the LoRAs touch in its component
    (a ModuleDelta is computed here, one at a time)."""
    entry = targets.files.get(rel)
    if entry is None or entry["sha256"] != sha256:
        raise LoraError(f"{rel} is not described by {TARGETS_FILE} (rebuilt since?); rebuild the artifacts")
    unused = set(entry.get("unused", ()))
    wanted = {m: d for m, d in deltas.get(entry["component"], {}).items() if m not in unused}
    if not wanted:
        return {}
    missing = sorted(m for m in wanted if m not in entry["targets"])
    if missing:
        raise LoraError(
            f"{rel}: the LoRA adapts {entry['component']} modules whose weights the export could not locate "
            f"({_examples(missing)}); fuse the LoRA at export instead (--lora)"
        )
    names = {entry["targets"][m].initializer: m for m in wanted}
    out = {}
    for init, w in iter_initializers(onnx_path, set(names)):
        module = names[init]
        t = entry["targets"][module]
        d = wanted[module]
        d = d.array() if isinstance(d, ModuleDelta) else d
        if t.transposed:
            d = d.reshape(d.shape[0], -1).T
        if w.shape != d.shape and w.size == d.size:
            d = d.reshape(w.shape)
        if w.shape != d.shape:
            raise LoraError(f"{rel}: initializer {init} has shape {w.shape}, the LoRA delta of {module} {d.shape}; rebuild the artifacts")
        patched = w.astype(np.float32)  # a copy: the base is read-only
        patched += d
        out[init] = patched if patched.dtype == w.dtype else patched.astype(w.dtype)
    return out


def run_time_deltas(
    artifacts_dir: Path, manifest: Manifest, loras: Sequence[tuple[LoraFile, float]]
) -> tuple[LoraTargets, dict[str, dict[str, ModuleDelta]]]:
    """What a backend applying `loras` as it opens an artifacts folder needs: the folder's LoRA targets and the
    deltas (computed as each weight is patched), every file checked first; a LoRA adapting a component the
    folder has no file for (a refiner's missing first text encoder) is refused here, before anything opens."""
    targets = LoraTargets.read(artifacts_dir, manifest)
    deltas = lazy_deltas(loras, targets.modules)
    missing = sorted(set(deltas) - set(manifest.components))
    if missing:
        raise LoraError(f"the LoRA adapts {', '.join(missing)}, which {artifacts_dir} has no ONNX file for; rebuild the artifacts")
    return targets, deltas


def load_loras(specs: Sequence[LoraSpec]) -> list[tuple[LoraFile, float]]:
    """Read every file once (a file given twice is read twice: its scales then add up, as diffusers' do)."""
    return [(read_lora(s.path), s.scale) for s in specs]


def records(loras: Sequence[tuple[LoraFile, float]]) -> list[dict[str, Any]]:
    return [lora.record(scale) for lora, scale in loras]


# ---- what a folder's LoRAs can touch (ldm-rt info) ----------------------------------------------------------------
def _kinds(table: Mapping[str, ModuleInfo], modules: Iterable[str]) -> str:
    """"N linear, M conv (K k x k: LoCon)" for the modules named."""
    shapes = [table[m].shape for m in modules]
    conv = [s for s in shapes if len(s) == 4]
    locon = sum(1 for s in conv if s[2:] != (1, 1))
    parts = [f"{len(shapes) - len(conv)} linear"] if len(shapes) > len(conv) else []
    parts += [f"{len(conv)} conv" + (f" ({locon} k x k: LoCon)" if locon else "")] if conv else []
    return ", ".join(parts)


def describe_targets(targets: LoraTargets) -> list[str]:
    """Per component: how many modules a LoRA may adapt, how many each run-time backend can patch (located in
    every ONNX file of the component), and how many the outputs do not depend on (a LoRA there changes nothing)."""
    lines = []
    for component, table in targets.modules.items():
        files = [f for f in targets.files.values() if f["component"] == component]
        if not files:
            continue
        unused = set.intersection(*(set(f.get("unused", ())) for f in files))
        patchable = [m for m in table if all(m in f["targets"] for f in files)]
        fixed = len(table) - len(patchable) - len(unused - set(patchable))
        line = f"  {component}: {len(table)} modules ({_kinds(table, table)}); at run time {len(patchable)} patchable"
        line += f", {len(unused)} unused by the outputs (a LoRA there changes nothing)" if unused else ""
        line += f", {fixed} only when fused at export (--lora at build)" if fixed else ""
        lines.append(line)
    return lines


def describe_lora(path: Path, targets: LoraTargets) -> str:
    """One line: what the LoRA file at `path` adapts in this model (per component, modules and kinds), or the
    one-line reason it cannot be applied."""
    try:
        layers = file_layers(read_lora(path), targets.modules)
    except LoraError as e:
        return f"  {path.name}: cannot be applied: {e}"
    parts = [f"{c} {len(ms)} ({_kinds(targets.modules[c], ms)})" for c, ms in layers.items()]
    blocked = sorted(
        m for c, ms in layers.items() for f in targets.files.values() if f["component"] == c
        for m in ms if m not in f["targets"] and m not in f.get("unused", ())
    )  # fmt: skip
    where = f"; fuse it at export: {len(set(blocked))} of its modules cannot be patched at run time" if blocked else "; applies at run time"
    return f"  {path.name}: adapts {', '.join(parts)}{where}"


def lora_files(paths: Sequence[Path]) -> list[Path]:
    """The LoRA files named: files as given, folders as their .safetensors files (sorted), at most MAX_LORA_LISTING."""
    out: list[Path] = []
    for p in paths:
        if not p.exists():
            raise LoraError(f"{p} does not exist; name a LoRA file or a folder of them")
        out += sorted(q for q in p.iterdir() if q.suffix.lower() == SAFETENSORS_SUFFIX) if p.is_dir() else [p]
    if len(out) > MAX_LORA_LISTING:
        raise LoraError(f"{len(out)} LoRA files named; at most {MAX_LORA_LISTING} are described at once: name fewer or a smaller folder")
    return out
