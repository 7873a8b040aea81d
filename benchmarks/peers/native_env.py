"""Peer: ldm-rt's native C++ runtime (cpp/native: OpenVINO's C++ API, no Python in the process), as the
`ours-native` row.

Its worker is a C++ executable, `native_bench_worker` (cpp/native/examples/bench_worker.cpp), that speaks
worker_common.py's protocol itself; this module builds it once with CMake into the benchmark's work folder
(Release, OpenVINO from this environment's `openvino` wheel: `pip install 'ldm-rt[native]'`) and says why not
when it cannot. It runs the same artifacts, noise file, prompt, scheduler and steps as ldm-rt's own row, in f32
and without a compile cache, so its cold start includes compiling every graph (the CLI keeps a cache by default).
"""

from __future__ import annotations

import importlib.util
import shutil
import subprocess
import sys
from pathlib import Path

CPP = Path(__file__).resolve().parents[2] / "cpp"
TARGET = "native_bench_worker"
NAME = "ours-native"


def build_worker(work: Path, log_file: Path) -> tuple[Path | None, str | None]:
    """(the built worker, None), or (None, why it cannot run here)."""
    missing = [tool for tool in ("cmake", "g++") if shutil.which(tool) is None]
    if missing:
        return None, f"{' and '.join(missing)} not installed: the native runtime cannot be built here"
    if importlib.util.find_spec("openvino") is None:
        return None, "OpenVINO is not installed: pip install 'ldm-rt[native]'"
    out = work / "native_build"
    commands = [
        ["cmake", "-S", str(CPP), "-B", str(out), f"-DPython_EXECUTABLE={sys.executable}", "-DCMAKE_BUILD_TYPE=Release",
         "-DLDM_RT_EMBEDDING=OFF"],
        ["cmake", "--build", str(out), "--parallel", "2", "--target", TARGET],
    ]  # fmt: skip
    with open(log_file, "w") as log:
        for cmd in commands:
            log.write(f"$ {' '.join(cmd)}\n")
            log.flush()
            if subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT).returncode != 0:
                return None, f"the native runtime did not build; see {log_file}"
    return out / TARGET, None
