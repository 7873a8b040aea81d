"""The Optimum peer's own virtual environment, and its export of a diffusers folder with Optimum's exporter.

optimum-onnx pins transformers < 4.58 (and diffusers releases that accept huggingface-hub < 1), which the
project's environment does not have, so it gets benchmarks/.venv-optimum (gitignored):

    python benchmarks/peers/optimum_env.py create                 # once; a few minutes, from PyPI
    benchmarks/.venv-optimum/bin/python benchmarks/peers/optimum_env.py export SRC_DIFFUSERS OUT_DIR

The venv gets torch 2.13.0 from the machine's local CPU wheel (optimum-constraints.txt) and the same
onnxruntime version as the harness, so both ONNX Runtime peers run the same engine. Standard library only.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import logging
import subprocess
import sys
from pathlib import Path

log = logging.getLogger("benchmarks.optimum_env")

HERE = Path(__file__).resolve().parent
DEFAULT_VENV = HERE.parent / ".venv-optimum"
CONSTRAINTS = HERE / "optimum-constraints.txt"
REQUIREMENTS = ("optimum-onnx[onnxruntime]==0.1.0", "diffusers", "torch")


class OptimumEnvError(RuntimeError):
    """The Optimum environment could not be made or used; the message says what to run."""


def venv_python(venv: Path = DEFAULT_VENV) -> Path:
    return venv / "bin" / "python"


def is_ready(venv: Path = DEFAULT_VENV) -> bool:
    python = venv_python(venv)
    if not python.is_file():
        return False
    probe = subprocess.run([str(python), "-c", "import optimum.onnxruntime, diffusers"], capture_output=True)
    return probe.returncode == 0


def create(venv: Path = DEFAULT_VENV, log_file: Path | None = None) -> Path:
    """Make the venv if it is not usable yet; returns its python. Output of pip goes to `log_file`."""
    if is_ready(venv):
        return venv_python(venv)
    onnxruntime = importlib.metadata.version("onnxruntime")  # the harness's: both ORT peers run the same engine
    commands = [
        [sys.executable, "-m", "venv", "--clear", str(venv)],
        [str(venv_python(venv)), "-m", "pip", "install", "-q", "-c", str(CONSTRAINTS), *REQUIREMENTS, f"onnxruntime=={onnxruntime}"],
    ]
    out = open(log_file, "a") if log_file is not None else subprocess.DEVNULL
    try:
        for command in commands:
            log.info("running %s", " ".join(command))
            if subprocess.run(command, stdout=out, stderr=subprocess.STDOUT).returncode != 0:
                where = f"; see {log_file}" if log_file is not None else ""
                raise OptimumEnvError(f"`{' '.join(command)}` failed{where}")
    finally:
        if log_file is not None:
            out.close()
    return venv_python(venv)


def export(source: Path, out: Path) -> None:
    """Optimum's exporter (text-to-image task) on a diffusers folder; run with the venv's python."""
    from optimum.exporters.onnx import main_export

    main_export(str(source), output=str(out), task="text-to-image")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    c = sub.add_parser("create", help="make the venv (no-op when it works already)")
    c.add_argument("--venv", type=Path, default=DEFAULT_VENV)
    e = sub.add_parser("export", help="export a diffusers folder with Optimum (run with the venv's python)")
    e.add_argument("source", type=Path)
    e.add_argument("out", type=Path)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.command == "create":
        print(create(args.venv))
    else:
        export(args.source, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
