"""A peer's own virtual environment under benchmarks/ (gitignored), made on first use from PyPI with the pins of a
constraints file beside its module: Optimum's (optimum_env.py), OpenVINO GenAI's (openvino_genai_env.py),
stable-diffusion.cpp's (sdcpp_env.py). Peers get their own venvs because their pins clash with the project's
(transformers, diffusers) or with each other's, and so that a peer's process holds only what its users install.

Standard library only: the env modules run inside their own venvs too (for their exports).
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger("benchmarks.peer_env")


class PeerEnvError(RuntimeError):
    """A peer's environment could not be made or used; the message says what failed and where its log is."""


@dataclass(frozen=True)
class PeerEnv:
    """One peer's venv: what pip installs into it (pinned by `constraints`) and the import that proves it works."""

    name: str
    venv: Path
    requirements: tuple[str, ...]
    constraints: Path
    probe: str  # Python source that must run in the venv (its imports)
    pip_env: Mapping[str, str] = field(default_factory=dict)  # extra environment for pip (source builds)
    remove: tuple[str, ...] = ()  # distributions uninstalled after the install (see the env module for why)

    @property
    def python(self) -> Path:
        return self.venv / "bin" / "python"

    def is_ready(self) -> bool:
        if not self.python.is_file():
            return False
        return subprocess.run([str(self.python), "-c", self.probe], capture_output=True).returncode == 0

    def create(self, log_file: Path | None = None, extra: tuple[str, ...] = ()) -> Path:
        """Make the venv unless it works already; returns its python. pip's output goes to `log_file`."""
        if self.is_ready():
            return self.python
        commands = [
            [sys.executable, "-m", "venv", "--clear", str(self.venv)],
            [str(self.python), "-m", "pip", "install", "-q", "-c", str(self.constraints), *self.requirements, *extra],
        ]
        if self.remove:
            commands.append([str(self.python), "-m", "pip", "uninstall", "-y", "-q", *self.remove])
        out = open(log_file, "a") if log_file is not None else subprocess.DEVNULL
        try:
            for command in commands:
                log.info("%s environment: running %s", self.name, " ".join(command))
                done = subprocess.run(command, stdout=out, stderr=subprocess.STDOUT, env={**os.environ, **self.pip_env})
                if done.returncode != 0:
                    where = f"; see {log_file}" if log_file is not None else ""
                    raise PeerEnvError(f"{self.name} environment: `{' '.join(command)}` failed{where}")
        finally:
            if log_file is not None:
                out.close()
        if not self.is_ready():
            raise PeerEnvError(f"{self.name} environment: {self.venv} was made but `{self.probe}` fails in it; delete it and rerun")
        return self.python
