"""Reading files someone handed us (an artifacts folder, a download, a config): paths confined to their
folder, sizes bounded before memory is spent, JSON that must be an object.

One owner for every layer. Each caller passes its own error class, a `FileFormatError` subclass
(`ArtifactError`, `CheckpointError`, ...), and the fix its user should make, so the one-line message is
the same wherever a file is bad and only the advice differs.
"""

from __future__ import annotations

import json
import os
import stat
from collections.abc import Callable, Iterable
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any

# Config-sized JSON (model_index.json, config.json, scheduler_config.json, a manifest with sampler tables):
# ours are under 1 MB; callers reading larger kinds (a tokenizer.json) pass their own limit.
MAX_JSON_BYTES = 16 << 20


class FileFormatError(ValueError):
    """A file is missing, too large, not a regular file, not UTF-8, not JSON, or not the JSON it should be."""


def inside(folder: str | Path, rel: str, *, last_link_may_leave: bool = False) -> Path | None:
    """folder/rel if `rel` is a relative POSIX path that stays inside `folder` with symlinks resolved, else None.

    Decided from the names and links alone, before anything is opened, so the answer is the same whether or
    not the target exists. Backslashes and drive letters are refused (they name different files on different
    systems), and NUL (no system opens it). `last_link_may_leave`: only the folders on the way must stay
    inside; the file itself may be a symlink out (a Hugging Face cache snapshot links each file to its blob)."""
    folder = Path(folder)
    if not isinstance(rel, str) or not rel or "\0" in rel or "\\" in rel or PureWindowsPath(rel).drive:
        return None
    pure = PurePosixPath(rel)
    if pure.is_absolute() or ".." in pure.parts:
        return None
    try:
        base = folder.resolve()
        resolved = (base / pure).parent.resolve() if last_link_may_leave else (base / pure).resolve()
    except (OSError, RuntimeError):  # a symlink loop
        return None
    return folder / pure if resolved.is_relative_to(base) else None


def read_bounded(
    path: Path, limit: int, what: str, *, error: type[FileFormatError] = FileFormatError, fix: str = "replace the file"
) -> bytes:
    """The bytes of the regular file `path`, refused without reading it when it is larger than `limit`."""
    try:
        # O_NONBLOCK: opening a FIFO must not wait for a writer; it is refused below like any non-file.
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    except FileNotFoundError:
        raise error(f"{path} is missing; {fix}") from None
    except OSError as e:
        raise error(f"cannot open {path} ({e.strerror}); check its permissions or {fix}") from None
    try:
        # Checked on the bare descriptor: os.fdopen itself raises IsADirectoryError for a folder.
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise error(f"{path} is not a regular file; {fix}")
        if st.st_size > limit:
            raise error(f"{path} is {st.st_size} bytes, more than a {what} may have ({limit}); {fix}")
    except BaseException:
        os.close(fd)
        raise
    with os.fdopen(fd, "rb") as f:
        data = f.read(limit + 1)  # the file may have grown since the stat
    if len(data) > limit:
        raise error(f"{path} is more than {limit} bytes, more than a {what} may have; {fix}")
    return data


_JSON_KINDS = {list: "an array", str: "a string", int: "a number", float: "a number", bool: "a boolean", type(None): "null"}


def utf8_text(data: bytes, path: Path, *, error: type[FileFormatError] = FileFormatError, fix: str = "replace the file") -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise error(f"{path} is not UTF-8 text ({e.reason} at byte {e.start}); {fix}") from None


def json_object(
    data: bytes, path: Path, *, error: type[FileFormatError] = FileFormatError, fix: str = "replace the file"
) -> dict[str, Any]:
    """The JSON object in `data` (read from `path`); anything else is one `error` naming the file."""
    text = utf8_text(data, path, error=error, fix=fix)
    try:
        value = json.loads(text)
    except RecursionError:
        raise error(f"{path} nests JSON too deeply to be ours; {fix}") from None
    except ValueError as e:  # JSONDecodeError, and int() refusing a number of thousands of digits
        raise error(f"{path} is not valid JSON ({e}); {fix}") from None
    if not isinstance(value, dict):
        raise error(f"{path} holds {_JSON_KINDS.get(type(value), 'a value')} where a JSON object is expected; {fix}")
    return value


def read_json_object(
    path: str | Path,
    *,
    error: type[FileFormatError] = FileFormatError,
    fix: str = "replace the file",
    limit: int = MAX_JSON_BYTES,
    what: str = "JSON config",
) -> dict[str, Any]:
    """The JSON object in the regular file `path`, read bounded; anything else is one `error` ending in `fix`."""
    path = Path(path)
    return json_object(read_bounded(path, limit, what, error=error, fix=fix), path, error=error, fix=fix)


# ---- files named on a command line or in an API call, with a value after a colon -----------------------------------
def split_file_arg(text: str, suffixes: Iterable[str]) -> tuple[Path, str | None]:
    """"FILE[:VALUE]" -> (FILE, VALUE or None). VALUE is what follows the last ':' when the part before it names a
    file with one of `suffixes` (so a path with ':' in a folder name still works)."""
    head, sep, tail = text.rpartition(":")
    if sep and head and Path(head).suffix.lower() in tuple(suffixes):
        return Path(head), tail
    return Path(text), None


def file_specs(
    items: Iterable[Any] | None, spec: type, parse: Callable[[str], Any], *, error: type[Exception], noun: str, value: str,
    limit: int, verb: str,
) -> list[Any]:  # fmt: skip
    """What Pipeline.load and the build accept for LoRAs or embeddings: `spec` objects, (file, value) pairs or
    "FILE[:VALUE]" strings (`parse`); at most `limit`. `noun` is "LoRA" or "embedding", as the messages say it."""
    article = "an" if noun[0].lower() in "aeiou" else "a"
    out = []
    for item in items or ():
        if isinstance(item, spec):
            out.append(item)
        elif isinstance(item, tuple) and len(item) == 2:
            out.append(spec(Path(item[0]), item[1]))
        elif isinstance(item, (str, Path)):
            out.append(parse(str(item)))
        else:
            raise error(f"{article} {noun} is a file, FILE:{value.upper()} or a (file, {value}) pair; got {item!r}")
    if len(out) > limit:
        raise error(f"{len(out)} {noun}s given; at most {limit} can be {verb} at once")
    return out
