"""What a build is doing, one line at a time: each phase as it starts, each item it finishes, and when it ends,
with the seconds spent.

A build spends minutes inside a few opaque calls (torch.onnx.export of a UNet, ONNX Runtime on the largest
parity shape, the fp16 search), so a bar per component would sit still for that long. Lines go to the
`ldm_rt.export.progress` logger at INFO; build_engines.py prints that logger to stderr. Plain lines (no
carriage-return bars) read the same in a terminal and in a CI log.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Iterator

log = logging.getLogger(__name__)

# What a long function takes to report each item it finishes (a parity case, an fp16 search round).
ItemCallback = Callable[[str], None]


class Phase:
    """One phase of a build: `item(detail)` after each unit of work logs `label: k/total detail (seconds)`."""

    def __init__(self, label: str, total: int | None, enabled: bool) -> None:
        self.label, self.total, self.enabled = label, total, enabled
        self.done = 0
        self.start = time.monotonic()

    @property
    def elapsed(self) -> float:
        return time.monotonic() - self.start

    def item(self, detail: str = "") -> None:
        self.done += 1
        if self.enabled:
            count = f"{self.done}/{self.total}" if self.total else str(self.done)
            log.info("%s: %s%s (%.1fs)", self.label, count, f" {detail}" if detail else "", self.elapsed)


@contextlib.contextmanager
def phase(label: str, total: int | None = None, enabled: bool = True) -> Iterator[Phase]:
    """Log `label ...` now and `label: done in Ns` when the block finishes (nothing more if it raises: the
    error that follows says why)."""
    p = Phase(label, total, enabled)
    if enabled:
        log.info("%s ...", label)
    yield p
    if enabled:
        log.info("%s: done in %.1fs", label, p.elapsed)


def say(line: str, enabled: bool = True) -> None:
    """One line in the progress stream outside any phase (something the build did differently than asked)."""
    if enabled:
        log.info("%s", line)
