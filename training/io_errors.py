"""I/O errors while writing a run's outputs name the output (`RUN/checkpoint`), not the hidden temp file being
written, and keep their errno, so the trainers' one-line error can say what to do (runtime.atomic.explain_os_error)."""

from __future__ import annotations

import contextlib
import os
import re
from collections.abc import Iterator
from pathlib import Path

from safetensors import SafetensorError


@contextlib.contextmanager
def naming(path: str | Path) -> Iterator[None]:
    """Re-raise an OSError (or safetensors' own I/O error, which it words as '... (os error N)') as an
    OSError of the same errno whose filename is `path`."""
    try:
        yield
    except SafetensorError as e:
        code = re.search(r"\(os error (\d+)\)", str(e))
        if code is None:  # not an I/O error: a bug, keep its traceback
            raise
        raise OSError(int(code.group(1)), os.strerror(int(code.group(1))), str(path)) from None
    except OSError as e:
        if e.errno is None:  # ours (NotAFileTarget, NotAFolderTarget): the message already names the path
            raise
        raise OSError(e.errno, e.strerror, str(path)) from None
