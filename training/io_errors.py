"""I/O errors while writing a run's outputs name the output (`RUN/checkpoint`), not the hidden temp file being
written, and keep their errno, so the trainers' one-line error can say what to do (runtime.atomic.explain_os_error).

The renaming of OSErrors is runtime.atomic's (`atomic.naming`; its writers apply it themselves). `naming` here
covers what atomic cannot see: safetensors' own I/O error (not an OSError) inside an atomic write, and the
writes of a run that are not atomic (metrics.jsonl, the write probe of --out)."""

from __future__ import annotations

import contextlib
import os
import re
from collections.abc import Iterator
from pathlib import Path

from safetensors import SafetensorError

from ldm_rt.runtime import atomic


@contextlib.contextmanager
def naming(path: str | Path) -> Iterator[None]:
    """runtime.atomic.naming, and safetensors' own I/O error (worded '... (os error N)') re-raised as an
    OSError of the same errno whose filename is `path`."""
    with atomic.naming(path):
        try:
            yield
        except SafetensorError as e:
            code = re.search(r"\(os error (\d+)\)", str(e))
            if code is None:  # not an I/O error: a bug, keep its traceback
                raise
            raise OSError(int(code.group(1)), os.strerror(int(code.group(1))), str(path)) from None
