"""One background CMake build of cpp/ for the C++ tests (the embedding host, the native runtime).

The build runs in a thread while the test prepares its Python side (artifacts); a test waits for the targets
it needs. Skips, with the reason, where cmake or g++ is not installed.

The native tests (test_native_numerics.py, test_native_runtime.py, test_native_sdxl.py) share one build per
session (`native_build`): one configure, the numerics library compiled once, the numerics test driver first
(its file runs first), then the runtime's executables; a session that ends before needing them stops it. The
embedding host's tests (test_controlnet_export_runtime.py, test_embedding_cpp.py, test_sdxl_embedding_cpp.py) share
another (`embedding_build`).
"""

from __future__ import annotations

import atexit
import contextlib
import importlib.util
import os
import signal
import shutil
import subprocess
import sys
import threading
from collections.abc import Iterable, Sequence
from pathlib import Path

import pytest

CPP = Path(__file__).resolve().parents[1] / "cpp"
NUMERICS = CPP / "native" / "numerics"
NUMERICS_TARGETS = ("ldm_rt_numerics_probe",)
RUNTIME_TARGETS = ("ldm-rt-native", "native_generate_many", "native_bench_worker")
# -O1: a third less compile time than Release's -O3 and the same IEEE arithmetic (no fast-math at any level,
# -ffp-contract=off in the targets); inference time is OpenVINO's, whatever this build's level.
TEST_FLAGS = ["-DCMAKE_BUILD_TYPE=Release", "-DCMAKE_CXX_FLAGS_RELEASE=-O1 -DNDEBUG"]


class CMakeBuild(threading.Thread):
    """cmake configure (of `source`, with `options`) + build of each stage of targets in order ([] builds all)
    into `out`; `log` holds every command's output. wait(targets) returns once those are built (or the build
    stopped) and says whether they were."""

    def __init__(self, out: Path, options: Sequence[str] = (), targets: Sequence[str] = (), *,
                 stages: Sequence[Sequence[str]] | None = None, source: Path = CPP) -> None:  # fmt: skip
        super().__init__(daemon=True)
        self.out, self.log = out, ""
        self.stages = [list(s) for s in stages] if stages is not None else [list(targets)]
        self.built: list[list[str]] = []  # the stages that finished, in order
        self.configure = ["cmake", "-S", str(source), "-B", str(out), f"-DPython_EXECUTABLE={sys.executable}", *options]
        self._progress = threading.Condition()
        self.finished = False  # run() returned (built or failed)
        self.stopped = False
        self._proc: subprocess.Popen | None = None

    def _build(self, targets: list[str]) -> list[str]:
        return ["cmake", "--build", str(self.out), "--parallel", "2", *(["--target", *targets] if targets else [])]

    def _run(self, cmd: list[str]) -> bool:
        # Its own process group, so stop() ends the compilers too, not only cmake.
        with self._progress:
            if self.stopped:
                return False
            # Niced: started with the session (start_with_session), it compiles on the cores the tests leave idle.
            nice = ["nice", "-n", "10"] if shutil.which("nice") else []
            self._proc = subprocess.Popen([*nice, *cmd], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
        output, _ = self._proc.communicate()
        self.log += f"$ {' '.join(cmd)}\n{output}"
        return self._proc.returncode == 0

    def stop(self) -> None:
        """Ends the build where it is (a session that needed only its first stage leaves no compiler running)."""
        with self._progress:
            self.stopped = True
            if self._proc is not None and self._proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self._proc.pid, signal.SIGTERM)

    def run(self) -> None:
        try:
            if not self._run(self.configure):
                return
            for stage in self.stages:
                if not self._run(self._build(stage)):
                    return
                with self._progress:
                    self.built.append(stage)
                    self._progress.notify_all()
        finally:
            with self._progress:
                self.finished = True
                self._progress.notify_all()

    @property
    def ok(self) -> bool:
        """Every stage built."""
        return len(self.built) == len(self.stages)

    def has(self, targets: Sequence[str]) -> bool:
        return all(any(t in stage or not stage for stage in self.built) for t in targets)

    def wait(self, targets: Sequence[str] = (), timeout: float = 900) -> bool:
        """Blocks until `targets` (all stages when empty) are built or the build stopped; whether they were."""
        with self._progress:
            self._progress.wait_for(lambda: (self.has(targets) if targets else self.ok) or self.finished, timeout)
        return self.has(targets) if targets else self.ok


def check_tools(what: str) -> None:
    missing = [tool for tool in ("cmake", "g++") if shutil.which(tool) is None]
    if missing:
        pytest.skip(f"{' and '.join(missing)} not installed: {what} cannot be built here")


def start_build(out: Path, what: str, options: Sequence[str] = (), targets: Sequence[str] = ()) -> CMakeBuild:
    """The build started in the background; skips (naming `what` cannot be built) without cmake or g++."""
    check_tools(what)
    build = CMakeBuild(out, options, targets)
    build.start()
    return build


_native: dict[str, CMakeBuild] = {}


def native_build(tmp_path_factory: pytest.TempPathFactory) -> CMakeBuild:
    """The session's one build for the native tests, started by whichever asks first. With OpenVINO (the
    `native` extra): cpp/ with the numerics test driver on, the driver built first, then the runtime's
    executables. Without it: cpp/native/numerics alone (the runtime tests skip). LDM_RT_NATIVE_BUILD_DIR: build
    there (incrementally, kept between sessions) instead of a fresh temp folder."""
    if "build" not in _native:
        check_tools("the native runtime")
        folder = os.environ.get("LDM_RT_NATIVE_BUILD_DIR")
        out = Path(folder) if folder else tmp_path_factory.mktemp("native_build")
        if importlib.util.find_spec("openvino") is not None:
            build = CMakeBuild(out, [*TEST_FLAGS, "-DLDM_RT_EMBEDDING=OFF", "-DLDM_RT_NUMERICS_TESTS=ON"],
                               stages=[NUMERICS_TARGETS, RUNTIME_TARGETS])  # fmt: skip
        else:
            build = CMakeBuild(out, TEST_FLAGS, stages=[NUMERICS_TARGETS], source=NUMERICS)
        build.start()
        atexit.register(build.stop)
        _native["build"] = build
    return _native["build"]


_embedding: dict[str, CMakeBuild] = {}


def embedding_build(tmp_path_factory: pytest.TempPathFactory) -> CMakeBuild:
    """The session's one build of the CPython-embedding host (cpp/ with -DLDM_RT_NATIVE=OFF: the library and its
    `generate` example), started in the background by whichever test file asks first (test_controlnet_export_runtime.py,
    test_embedding_cpp.py, test_sdxl_embedding_cpp.py); skips, naming what, without cmake or g++. TEST_FLAGS: its
    numbers are the Python runtime's, so -O1 only saves compile time (11 s of CPU instead of 17 at -O3, measured)."""
    check_tools("the C++ library")
    if "build" not in _embedding:
        build = CMakeBuild(tmp_path_factory.mktemp("cpp_build"), [*TEST_FLAGS, "-DLDM_RT_NATIVE=OFF"])
        build.start()
        atexit.register(build.stop)
        _embedding["build"] = build
    return _embedding["build"]


def built_probe(build: CMakeBuild) -> Path:
    """The numerics test driver of `build`, waiting for it (the test fails with the build's log if it failed)."""
    assert build.wait(NUMERICS_TARGETS), f"the numerics test driver did not build:\n{build.log[-4000:]}"
    # In the cpp/ build it sits in the numerics subfolder; built from numerics/ alone, at the top.
    found = [p for p in (build.out / "native" / "numerics" / NUMERICS_TARGETS[0], build.out / NUMERICS_TARGETS[0]) if p.is_file()]
    assert found, f"no {NUMERICS_TARGETS[0]} in {build.out}"
    return found[0]


def start_with_session(modules: Iterable[object], tmp_path_factory: pytest.TempPathFactory) -> None:
    """Starts, in the background, the builds the session's test modules use (a module that imported native_build or
    embedding_build), so they compile while the tests before them run instead of when the first test needs them
    (a session of files that need no C++ starts none)."""
    wanted = {id(v) for m in modules for v in vars(m).values()}
    with contextlib.suppress(pytest.skip.Exception):  # no cmake or g++: the tests that need the build skip
        for build in (native_build, embedding_build):
            if id(build) in wanted:
                build(tmp_path_factory)
