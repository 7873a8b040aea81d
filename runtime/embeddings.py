"""Textual-inversion embeddings (Gal et al. 2022, "An Image is Worth One Word"): words whose input vectors were
learned, brought as the files diffusers' training, A1111 and Civitai write, applied without torch.

Formats, read bounded (runtime/files.py) and validated; nothing is unpickled beyond a tensor:
- diffusers `learned_embeds.safetensors` (or the `.bin` pickle): one key, the trigger word -> (D,) or (N, D);
- A1111 `.pt` (torch's zip format): {"string_to_param": {"*": (N, D)}, "name": ..., ...}; A1111 `.safetensors`:
  `emb_params` (N, D);
- SDXL (A1111, Civitai): `clip_l` (N, 768) for text_encoder and `clip_g` (N, 1280) for text_encoder_2.

A `.pt`/`.bin` is read by `read_torch_zip`: the zip's data.pkl through an Unpickler whose find_class knows only the
few names a tensor needs (torch._utils._rebuild_tensor_v2, _rebuild_parameter, collections.OrderedDict, the
float storage types), each mapped to a numpy builder; tensor bytes come from the zip's data/N entries, each size
checked against what the pickle claims before it is read. Anything else (os.system, a module, an old non-zip
torch file) is refused in one line, before it runs, with the conversion to .safetensors.

The trigger word: FILE:TOKEN's token, else diffusers' key, else the file stem (A1111 uses the file name). An
N-vector embedding adds N tokens (ids after the vocabulary, in file order) and a prompt's trigger stands for all N,
as diffusers' load_textual_inversion + maybe_convert_prompt do (PromptTokenizer.with_added_tokens, whose
tokenizer.json carries it all). Each text encoder's token table gains the rows as its component opens
(`TokenRows`: ONNX Runtime replaces the initializer, OpenVINO the Constant, the torch backend its reference table).
TensorRT engines cannot grow a table: export bakes embeddings in (build_engines.py --embedding;
reference/embeddings.bake_embeddings), the same tokenizer and rows; `baked_rows` finds them again for the torch backend.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import io
import math
import pickle
import re
import zipfile
from collections import OrderedDict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .artifacts import Artifacts
from .files import FileFormatError, file_specs, read_bounded, split_file_arg
from .lora import _bf16_to_f32, initializer_table, iter_initializers, read_safetensors
from .tokenizer import PromptTokenizer, TokenizerError

SAFETENSORS_SUFFIX = ".safetensors"
TORCH_SUFFIXES = (".pt", ".bin")
SUFFIXES = (SAFETENSORS_SUFFIX, *TORCH_SUFFIXES)
# Bounds before memory is spent. A 75-vector SDXL embedding is 0.6 MB; A1111 files add a few strings.
MAX_EMBEDDING_BYTES = 32 << 20
MAX_PICKLE_BYTES = 1 << 20
MAX_VECTORS = 75  # A1111's limit: the vectors must fit one chunk of CLIP's 77 with its start and end token
MAX_WIDTH = 8192
MAX_EMBEDDINGS = 64  # per pipeline
MAX_TOKEN_CHARS = 128
# Which encoder reads which vectors: SD 1.x/2.x files hold one table (slot ""), SDXL files one per encoder.
SDXL_SLOTS = {"text_encoder": "clip_l", "text_encoder_2": "clip_g"}
SINGLE = ""
CONVERT = "convert it to .safetensors"


class EmbeddingError(FileFormatError):
    """A textual-inversion file or argument cannot be used; the one-line message names the file and the fix."""


# ---- arguments ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class EmbeddingSpec:
    """One embedding to load: its file and the trigger word to use (None: the file's own, or its stem)."""

    path: Path
    token: str | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "path", Path(self.path))
        if self.token is not None:
            check_token(self.token, self.path)


def check_token(token: str, path: Path) -> str:
    if not isinstance(token, str) or not token or len(token) > MAX_TOKEN_CHARS or any(c.isspace() or not c.isprintable() for c in token):
        raise EmbeddingError(
            f"embedding {path.name}: trigger {token!r} must be 1 to {MAX_TOKEN_CHARS} printable characters without spaces; "
            "pass another one as FILE:TOKEN"
        )
    return token


def parse_embedding_arg(text: str) -> EmbeddingSpec:
    """"FILE[:TOKEN]" -> EmbeddingSpec (runtime/files.py split_file_arg)."""
    return EmbeddingSpec(*split_file_arg(text, SUFFIXES))


def as_specs(embeddings: Iterable[EmbeddingSpec | tuple[str | Path, str | None] | str | Path] | None) -> list[EmbeddingSpec]:
    """What Pipeline.load(embeddings=...) accepts: EmbeddingSpec, (file, token) pairs, or "FILE[:TOKEN]"."""
    return file_specs(
        embeddings, EmbeddingSpec, parse_embedding_arg, error=EmbeddingError, noun="embedding", value="token", limit=MAX_EMBEDDINGS, verb="loaded"
    )


# ---- torch's zip format, restricted ---------------------------------------------------------------------------------
class _StorageType:
    """What a `torch.<X>Storage` global stands for: the dtype of the bytes a persistent id names."""

    def __init__(self, dtype: Any, itemsize: int) -> None:
        self.dtype, self.itemsize = dtype, itemsize


_STORAGES = {
    "FloatStorage": _StorageType(np.float32, 4),
    "HalfStorage": _StorageType(np.float16, 2),
    "BFloat16Storage": _StorageType("bf16", 2),
    "DoubleStorage": _StorageType(np.float64, 8),
}


class _Forbidden(Exception):
    pass


def _ints(values: Any, what: str) -> tuple[int, ...]:
    if not isinstance(values, tuple) or len(values) > 4 or not all(type(v) is int and v >= 0 for v in values):
        raise ValueError(f"tensor {what} {values!r}")
    return values


def _rebuild_tensor(storage: Any, offset: Any, size: Any, stride: Any, *_: Any) -> np.ndarray:
    """torch._utils._rebuild_tensor_v2(storage, offset, size, stride, requires_grad, hooks[, metadata]) in numpy,
    every index checked to lie inside the storage."""
    if not isinstance(storage, np.ndarray) or type(offset) is not int or offset < 0:
        raise ValueError("tensor storage")
    size, stride = _ints(size, "size"), _ints(stride, "stride")
    if len(size) != len(stride) or math.prod(size) > MAX_VECTORS * MAX_WIDTH:
        raise ValueError("tensor shape")
    if math.prod(size) == 0:
        return np.zeros(size, storage.dtype)
    last = offset + sum((n - 1) * s for n, s in zip(size, stride))
    if last >= storage.size:
        raise ValueError("tensor past its storage")
    view = np.lib.stride_tricks.as_strided(storage[offset:], shape=size, strides=[s * storage.itemsize for s in stride])
    return np.array(view)  # a copy: the view must not outlive the checks


def _rebuild_parameter(data: Any, *_: Any) -> np.ndarray:
    """torch._utils._rebuild_parameter(data, requires_grad, hooks): the tensor."""
    if not isinstance(data, np.ndarray):
        raise ValueError("parameter data")
    return data


def _globals() -> dict[tuple[str, str], Any]:
    """What find_class may answer, fresh for each file: a pickle can set attributes on what it is given (BUILD), and
    must not reach anything another file's reading uses."""
    return {
        ("torch._utils", "_rebuild_tensor_v2"): functools.partial(_rebuild_tensor),
        ("torch._utils", "_rebuild_parameter"): functools.partial(_rebuild_parameter),
        ("collections", "OrderedDict"): OrderedDict,  # a tensor's (empty) backward hooks; a built-in type, immutable
        **{("torch", name): _StorageType(s.dtype, s.itemsize) for name, s in _STORAGES.items()},
    }


class _TensorUnpickler(pickle.Unpickler):
    """data.pkl of a torch zip file, with tensors only: find_class answers _globals() and refuses the rest."""

    def __init__(self, data: bytes, archive: zipfile.ZipFile, prefix: str) -> None:
        super().__init__(io.BytesIO(data))
        self.archive, self.prefix = archive, prefix
        self.storages: dict[str, np.ndarray] = {}
        self.budget = MAX_EMBEDDING_BYTES
        self.allowed = _globals()

    def find_class(self, module: str, name: str) -> Any:
        found = self.allowed.get((module, name))
        if found is None:
            raise _Forbidden(f"{module}.{name}")
        return found

    def persistent_load(self, pid: Any) -> np.ndarray:
        """('storage', storage type, key, location, numel) -> the storage's elements, a 1-D array."""
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage" and isinstance(pid[1], _StorageType)):
            raise ValueError("persistent id")
        kind, key, numel = pid[1], pid[2], pid[4]
        if not isinstance(key, str) or not re.fullmatch(r"\d{1,9}", key) or type(numel) is not int or numel < 0:
            raise ValueError("storage key")
        if key not in self.storages:
            try:
                info = self.archive.getinfo(f"{self.prefix}data/{key}")
            except KeyError:
                raise ValueError(f"storage {key} missing") from None
            nbytes = numel * kind.itemsize
            if info.file_size != nbytes or nbytes > self.budget:
                raise ValueError(f"storage {key} size")
            self.budget -= nbytes
            raw = self.archive.read(info)
            if kind.dtype == "bf16":
                self.storages[key] = _bf16_to_f32(np.frombuffer(raw, np.uint16))
            else:
                self.storages[key] = np.frombuffer(raw, kind.dtype)
        return self.storages[key]


def read_torch_zip(path: Path, data: bytes) -> Any:
    """The object torch.save wrote to `path` (its bytes `data`), with tensors as numpy arrays; an EmbeddingError for
    anything that is not plain data and tensors."""
    unsafe = f"embedding {path} is not a textual-inversion file we can read safely"
    if not zipfile.is_zipfile(io.BytesIO(data)):
        raise EmbeddingError(f"{unsafe} (not torch's zip format: an old torch file, or not torch at all); {CONVERT}")
    try:
        archive = zipfile.ZipFile(io.BytesIO(data))
        pickles = [n for n in archive.namelist() if n.endswith("data.pkl") and n.count("/") == 1]
        if len(pickles) != 1:
            raise ValueError("no data.pkl")
        prefix = pickles[0][: -len("data.pkl")]
        order = f"{prefix}byteorder"
        if order in archive.namelist() and archive.read(order).strip() != b"little":
            raise ValueError("big-endian tensors")
        info = archive.getinfo(pickles[0])
        if info.file_size > MAX_PICKLE_BYTES:
            raise ValueError(f"data.pkl of {info.file_size} bytes")
        return _TensorUnpickler(archive.read(info), archive, prefix).load()
    except _Forbidden as e:
        raise EmbeddingError(f"{unsafe}: it asks for {e}, which is not part of a tensor (refused, nothing ran); {CONVERT}") from None
    except (pickle.UnpicklingError, zipfile.BadZipFile, EOFError, ValueError, TypeError, KeyError, IndexError, AttributeError,
            RecursionError, OverflowError, MemoryError, UnicodeDecodeError) as e:  # fmt: skip
        raise EmbeddingError(f"{unsafe} ({type(e).__name__}: {str(e)[:80]}); download it again or {CONVERT}") from None


# ---- files ---------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Embedding:
    """One textual-inversion file: its trigger word and its vectors per slot ("" for SD 1.x/2.x, "clip_l" and
    "clip_g" for SDXL), each (N, D) float32 with the same N."""

    path: Path
    sha256: str
    token: str
    vectors: Mapping[str, np.ndarray]

    @property
    def count(self) -> int:
        return int(next(iter(self.vectors.values())).shape[0])

    def record(self) -> dict[str, Any]:
        """What image metadata says about this embedding."""
        return {"file": self.path.name, "sha256": self.sha256, "token": self.token, "vectors": self.count}


def _as_vectors(value: Any, key: str, path: Path) -> np.ndarray:
    """(N, D) float32 from a (D,) or (N, D) array, bounded and finite."""
    if not isinstance(value, np.ndarray) or value.dtype.kind != "f" or value.ndim not in (1, 2) or value.size == 0:
        what = f"of shape {tuple(value.shape)}" if isinstance(value, np.ndarray) else f"a {type(value).__name__}"
        raise EmbeddingError(f"embedding {path}: {key} is {what}, not a vector (D,) or vectors (N, D) of floats")
    vectors = value.reshape(-1, value.shape[-1]).astype(np.float32)
    n, d = vectors.shape
    if not 1 <= n <= MAX_VECTORS or not 1 <= d <= MAX_WIDTH:
        raise EmbeddingError(f"embedding {path}: {key} holds {n} vectors of width {d}; textual inversion has 1 to {MAX_VECTORS} vectors of at most {MAX_WIDTH}")
    if not np.all(np.isfinite(vectors)):
        raise EmbeddingError(f"embedding {path}: {key} holds NaN or Inf; download it again")
    return vectors


def _layout(obj: Any, path: Path) -> tuple[dict[str, np.ndarray], str | None]:
    """(vectors per slot, the trigger the file names or None) of a loaded file's top-level object."""
    if not isinstance(obj, dict):
        raise EmbeddingError(f"embedding {path} holds a {type(obj).__name__}, not a dict of tensors; pass a textual-inversion file")
    if "string_to_param" in obj:  # A1111 .pt
        params = obj["string_to_param"]
        if not isinstance(params, dict) or len(params) != 1:
            raise EmbeddingError(f"embedding {path}: string_to_param must hold exactly one tensor; pass a textual-inversion file")
        return {SINGLE: _as_vectors(next(iter(params.values())), "string_to_param", path)}, None
    if "clip_l" in obj or "clip_g" in obj:  # SDXL (A1111, Civitai)
        slots = {slot: _as_vectors(obj[slot], slot, path) for slot in SDXL_SLOTS.values() if slot in obj}
        if len({v.shape[0] for v in slots.values()}) != 1:
            raise EmbeddingError(f"embedding {path}: clip_l and clip_g hold different numbers of vectors; download it again")
        return slots, None
    if "emb_params" in obj:  # A1111 .safetensors
        return {SINGLE: _as_vectors(obj["emb_params"], "emb_params", path)}, None
    arrays = [k for k, v in obj.items() if isinstance(v, np.ndarray)]
    if len(obj) == 1 and arrays:  # diffusers: {token: vector(s)}
        return {SINGLE: _as_vectors(obj[arrays[0]], repr(arrays[0]), path)}, str(arrays[0])
    keys = ", ".join(map(repr, list(obj)[:5]))
    raise EmbeddingError(
        f"embedding {path} holds {keys}: not a textual-inversion layout (diffusers' one key, A1111's string_to_param or "
        "emb_params, SDXL's clip_l + clip_g); a LoRA or a checkpoint?"
    )


def read_embedding(path: str | Path, token: str | None = None) -> Embedding:
    """The textual-inversion file at `path` (a format above), its trigger `token` or the one it names."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix == SAFETENSORS_SUFFIX:
        tensors, _, digest = read_safetensors(path, MAX_EMBEDDING_BYTES, kind="embedding", error=EmbeddingError)
        obj: Any = tensors
    elif suffix in TORCH_SUFFIXES:
        data = read_bounded(path, MAX_EMBEDDING_BYTES, "textual-inversion file", error=EmbeddingError, fix=f"pass an embedding file or {CONVERT}")
        obj, digest = read_torch_zip(path, data), hashlib.sha256(data).hexdigest()
    else:
        raise EmbeddingError(f"embedding {path}: unknown file type {path.suffix!r}; pass a .safetensors, .pt or .bin textual-inversion file")
    vectors, named = _layout(obj, path)
    trigger = check_token(token if token is not None else named if named is not None else path.stem, path)
    return Embedding(path, digest, trigger, vectors)


def load_embeddings(specs: Sequence[EmbeddingSpec]) -> list[Embedding]:
    return [read_embedding(s.path, s.token) for s in specs]


def records(embeddings: Sequence[Embedding]) -> list[dict[str, Any]]:
    return [e.record() for e in embeddings]


# ---- applying them ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class TokenRows:
    """What one text encoder's token-embedding table gains: `rows` (K, D) float32 for ids first_id, first_id + 1, ..."""

    first_id: int
    rows: np.ndarray


def encoder_slots(encoders: Sequence[str]) -> dict[str, str]:
    """Which vectors of a file each text encoder of a model reads: SDXL's (a refiner: the second alone) clip_l / clip_g,
    SD 1.x/2.x's one encoder the file's one table."""
    if "text_encoder_2" in encoders:
        return {name: SDXL_SLOTS[name] for name in encoders}
    return {name: SINGLE for name in encoders}


def _describe(embedding: Embedding) -> str:
    return " + ".join(f"{slot or 'one table'} of width {v.shape[1]}" for slot, v in embedding.vectors.items())


def prepare(
    embeddings: Sequence[Embedding], tokenizers: Mapping[str, PromptTokenizer], widths: Mapping[str, int]
) -> tuple[dict[str, PromptTokenizer], dict[str, TokenRows]]:
    """Per text encoder (`tokenizers` and `widths`, its token vectors' width, by component name): the tokenizer that
    knows the embeddings' tokens, and the rows its table gains; a file that does not fit is refused before anything opens."""
    if not embeddings:
        return dict(tokenizers), {}
    slots = encoder_slots(list(tokenizers))
    seen: dict[str, Path] = {}
    for e in embeddings:
        if e.token in seen:
            raise EmbeddingError(f"embeddings {seen[e.token].name} and {e.path.name} both use the trigger {e.token!r}; give one another (FILE:TOKEN)")
        seen[e.token] = e.path
    new_tokenizers, tables = {}, {}
    for name, tokenizer in tokenizers.items():
        slot, width = slots[name], widths[name]
        for e in embeddings:
            if slot not in e.vectors:
                reads = f"this SDXL model's {name} reads its {slot} vectors (SDXL files hold clip_l (768) and clip_g (1280))" if slot else (
                    f"this SD 1.x/2.x model's {name} reads one table of vectors")
                raise EmbeddingError(f"embedding {e.path.name} holds {_describe(e)}; {reads}: use an embedding made for this model")
            if e.vectors[slot].shape[1] != width:
                raise EmbeddingError(
                    f"embedding {e.path.name}: its {slot or 'vectors'} are {e.vectors[slot].shape[1]} wide, {name}'s tokens {width} "
                    "(SD 1.x: 768, SD 2.x: 1024, SDXL: 768 + 1280): use an embedding made for this model"
                )
            if tokenizer.token_id(e.token) is not None:  # diffusers refuses these too: the word would lose its meaning
                raise EmbeddingError(f"embedding {e.path.name}: {e.token!r} is already a token of the model's vocabulary; pass another trigger (FILE:TOKEN)")
        try:
            grown, ids = tokenizer.with_added_tokens([(e.token, e.count) for e in embeddings])
        except TokenizerError as err:
            raise EmbeddingError(f"embeddings: {err}") from None
        new_tokenizers[name] = grown
        tables[name] = TokenRows(ids[0][0], np.concatenate([e.vectors[slot] for e in embeddings]))
    return new_tokenizers, tables


def baked_rows(embeddings: Sequence[Embedding], tokenizers: Mapping[str, PromptTokenizer]) -> dict[str, TokenRows]:
    """Per text encoder, the rows an export baked (`embeddings`, in export order) at the ids its tokenizer.json gives
    their triggers (`tokenizers`: the artifacts', which learned them): what a backend rebuilding the weights from the
    source adds back. The ids must be the ones prepare numbered, one run after the other; else the folder is refused."""
    slots = encoder_slots(list(tokenizers))
    tables = {}
    for name, tokenizer in tokenizers.items():
        ids = tokenizer.token_ids([e.token for e in embeddings])
        first = ids[0][0] if ids and ids[0] else -1
        if [i for group in ids for i in group] != list(range(first, first + sum(e.count for e in embeddings))) or [len(g) for g in ids] != [e.count for e in embeddings]:
            raise EmbeddingError(f"the tokenizer of {name} does not hold the baked embeddings' tokens as the manifest records them; rebuild the artifacts")
        tables[name] = TokenRows(first, np.concatenate([e.vectors[slots[name]] for e in embeddings]))
    return tables


def token_table(path: Path, rows: TokenRows) -> tuple[str, np.ndarray]:
    """(initializer name, table with `rows` added, in the file's dtype) of the text encoder ONNX file at `path`: the
    initializer the export names `...token_embedding.weight`, else the one 2-D float table of the tokenizer's size."""
    width = rows.rows.shape[1]
    table = {n: i for n, i in initializer_table(path).items() if i.dtype is not None and len(i.shape) == 2 and i.shape[1] == width}
    found = [n for n in table if n.endswith("token_embedding.weight")] or [n for n, i in table.items() if i.shape[0] == rows.first_id]
    if len(found) != 1:
        raise EmbeddingError(f"{path}: cannot tell which initializer is the token-embedding table ({len(found)} candidates); rebuild the artifacts with this ldm-rt")
    ((name, base),) = iter_initializers(path, set(found))
    return name, grown_table(base, rows)


def grown_table(base: np.ndarray, rows: TokenRows) -> np.ndarray:
    """The token table (V, D) `base` with `rows` at their ids, in its dtype (a copy, grown as needed). A table may have
    rows past the vocabulary (ids no tokenizer produces): the new rows go at their ids all the same."""
    k = len(rows.rows)
    grown = np.zeros((max(base.shape[0], rows.first_id + k), base.shape[1]), base.dtype)
    grown[: base.shape[0]] = base
    grown[rows.first_id : rows.first_id + k] = rows.rows.astype(base.dtype)
    return grown


def unsupported(backend: str) -> str:
    """Why `backend` refuses embeddings, and what to do instead."""
    if backend == "tensorrt":
        return ("TensorRT engines cannot add textual-inversion tokens at run time (their token table is built in): bake the "
                "embedding in at export (python export/build_engines.py --embedding FILE[:TOKEN]) or use --backend onnxruntime")  # fmt: skip
    return (f"backend {backend!r} cannot add textual-inversion tokens at run time; use --backend onnxruntime, openvino or torch, "
            "or bake the embedding in at export (python export/build_engines.py --embedding FILE[:TOKEN])")  # fmt: skip


def with_embeddings(artifacts: Artifacts, embeddings: Sequence[Embedding]) -> tuple[Artifacts, dict[str, TokenRows]]:
    """`artifacts` with tokenizers that know the embeddings' tokens, and per text encoder the rows its table gains
    (`prepare`, with each encoder's token width read from its contract)."""
    if not embeddings:
        return artifacts, {}
    present = {"text_encoder": artifacts.tokenizer, "text_encoder_2": artifacts.tokenizer_2}
    tokenizers = {name: t for name, t in present.items() if t is not None and name in artifacts.manifest.components}
    if not tokenizers:
        raise EmbeddingError(f"{artifacts.root} has no text encoder: textual-inversion embeddings need a text-conditioned model")
    widths = {}
    for name in tokenizers:
        states = next(t for t in artifacts.manifest.components[name].contract.outputs if t.name == "last_hidden_state")
        widths[name] = int(states.shape[-1])
    grown, tables = prepare(embeddings, tokenizers, widths)
    return dataclasses.replace(artifacts, tokenizer=grown.get("text_encoder"), tokenizer_2=grown.get("text_encoder_2")), tables
