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
import sys
from pathlib import Path

if __package__:
    from .peer_env import PeerEnv, PeerEnvError
else:  # run as a script, inside the Optimum venv (the export)
    from peer_env import PeerEnv, PeerEnvError

log = logging.getLogger("benchmarks.optimum_env")

HERE = Path(__file__).resolve().parent
DEFAULT_VENV = HERE.parent / ".venv-optimum"
CONSTRAINTS = HERE / "optimum-constraints.txt"
REQUIREMENTS = ("optimum-onnx[onnxruntime]==0.1.0", "diffusers", "torch")


class OptimumEnvError(PeerEnvError):
    """The Optimum environment could not be made or used; the message says what to run."""


def env(venv: Path = DEFAULT_VENV) -> PeerEnv:
    return PeerEnv("Optimum", venv, REQUIREMENTS, CONSTRAINTS, probe="import optimum.onnxruntime, diffusers")


def venv_python(venv: Path = DEFAULT_VENV) -> Path:
    return env(venv).python


def is_ready(venv: Path = DEFAULT_VENV) -> bool:
    return env(venv).is_ready()


def create(venv: Path = DEFAULT_VENV, log_file: Path | None = None) -> Path:
    """Make the venv if it is not usable yet; returns its python. Output of pip goes to `log_file`."""
    onnxruntime = importlib.metadata.version("onnxruntime")  # the harness's: both ORT peers run the same engine
    try:
        return env(venv).create(log_file, extra=(f"onnxruntime=={onnxruntime}",))
    except PeerEnvError as e:
        raise OptimumEnvError(str(e)) from None


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
