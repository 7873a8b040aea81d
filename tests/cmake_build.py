"""One background CMake build of cpp/ for the C++ tests (the embedding host, the native runtime).

The build runs in a thread while the test prepares its Python side (artifacts); a test joins it before it
needs the executables. Skips, with the reason, where cmake or g++ is not installed.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import threading
from collections.abc import Sequence
from pathlib import Path

import pytest

CPP = Path(__file__).resolve().parents[1] / "cpp"


class CMakeBuild(threading.Thread):
    """cmake configure (with `options`) + build (of `targets`, all when empty) of cpp/ into `out`; `log` holds both
    commands' output, `ok` whether both succeeded."""

    def __init__(self, out: Path, options: Sequence[str] = (), targets: Sequence[str] = ()) -> None:
        super().__init__(daemon=True)
        self.out, self.log, self.ok = out, "", False
        self.commands = [
            ["cmake", "-S", str(CPP), "-B", str(out), f"-DPython_EXECUTABLE={sys.executable}", *options],
            ["cmake", "--build", str(out), "--parallel", "2", *(["--target", *targets] if targets else [])],
        ]

    def run(self) -> None:
        for cmd in self.commands:
            done = subprocess.run(cmd, capture_output=True, text=True)
            self.log += f"$ {' '.join(cmd)}\n{done.stdout}{done.stderr}"
            if done.returncode != 0:
                return
        self.ok = True


def start_build(out: Path, what: str, options: Sequence[str] = (), targets: Sequence[str] = ()) -> CMakeBuild:
    """The build started in the background; skips (naming `what` cannot be built) without cmake or g++."""
    missing = [tool for tool in ("cmake", "g++") if shutil.which(tool) is None]
    if missing:
        pytest.skip(f"{' and '.join(missing)} not installed: {what} cannot be built here")
    build = CMakeBuild(out, options, targets)
    build.start()
    return build
