"""Issue 5: a plain, non-editable install (a wheel) samples from any working directory with no torch and no download.

One wheel is built with `pip wheel --no-deps --no-build-isolation` from a clean copy of the sources the build
reads (pyproject.toml, its readme and the package folders it maps): setuptools builds in place under
./build and never removes what it copied there before, so a build inside the repo could ship deleted files.
It is installed into a fresh venv without system site packages, with --no-deps, next to the runtime's base
dependencies (the wheel's own Requires-Dist without extras) pinned to the versions of this environment, so
pip takes them from its cache. The commands then run from an unrelated folder with every proxy pointing
at a closed port, so anything that tried to download would fail.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import re
import shutil
import subprocess
import sys
import tomllib
import urllib.error
import urllib.request
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
PROMPT = "a red circle on a white background"
DEFAULT = "ldm_rt/engines/default"
CLOSED_PORT = "http://127.0.0.1:9"
PYPI = "https://pypi.org/simple/"
PACKAGE_DATA = "check [tool.setuptools.package-data] in pyproject.toml"
BUILD_JUNK = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info", "build", "dist")


def run(cmd: list[str], timeout: float = 300, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=timeout, **kw)


def source_copy(dest: Path) -> Path:
    """What setuptools reads to build the wheel: pyproject.toml, the readme and each mapped package folder."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    dest.mkdir()
    readme = project["project"].get("readme")
    for name in ("pyproject.toml", readme if isinstance(readme, str) else None, "MANIFEST.in", "setup.py", "setup.cfg", "LICENSE"):
        if name and (ROOT / name).is_file():
            shutil.copy2(ROOT / name, dest / name)
    for folder in set(project["tool"]["setuptools"]["package-dir"].values()):
        shutil.copytree(ROOT / folder, dest / folder, ignore=BUILD_JUNK)
    return dest


def base_requirements(wheel: Path) -> list[str]:
    """The wheel's Requires-Dist without an extra, pinned to this environment's installed versions."""
    with zipfile.ZipFile(wheel) as zf:
        metadata = next(n for n in zf.namelist() if n.endswith(".dist-info/METADATA"))
        lines = zf.read(metadata).decode().splitlines()
    names = [re.match(r"[A-Za-z0-9_.\-]+", line.split(":", 1)[1].strip()).group(0)
             for line in lines if line.startswith("Requires-Dist:") and "extra ==" not in line]
    return [f"{name}=={importlib.metadata.version(name)}" for name in names]


def index_unreachable() -> str | None:
    """Why the package index cannot be reached, or None when it can."""
    try:
        urllib.request.urlopen(PYPI, timeout=15).close()
    except (urllib.error.URLError, OSError) as e:
        return f"the package index {PYPI} cannot be reached ({e})"
    return None


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("wheel")
    src = source_copy(tmp / "src")
    done = run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-input", "-q", "-w", tmp / "dist", "."], cwd=src)
    assert done.returncode == 0, done.stderr[-3000:]
    (found,) = (tmp / "dist").glob("ldm_rt-*.whl")
    return found


@pytest.fixture(scope="module")
def venv(wheel, tmp_path_factory) -> Path:
    """A venv without system site packages holding the wheel and the runtime's pinned base dependencies."""
    tmp = tmp_path_factory.mktemp("venv")
    env = tmp / "env"
    done = run([sys.executable, "-m", "venv", "--without-pip", env])
    assert done.returncode == 0, done.stderr
    python = env / "bin" / "python"
    # Transitive dependencies are pinned to this environment too: the install is the tested one, from cache.
    constraints = tmp / "constraints.txt"
    constraints.write_text("".join(f"{d.metadata['Name']}=={d.version}\n" for d in importlib.metadata.distributions() if d.metadata["Name"]))
    pip = [sys.executable, "-m", "pip", "--python", python, "install", "--no-input", "--no-compile", "-q"]
    for args in (["-c", constraints, *base_requirements(wheel)], ["--no-deps", wheel]):
        done = run(pip + args, timeout=600)
        if done.returncode != 0 and (reason := index_unreachable()):
            pytest.skip(reason)
        assert done.returncode == 0, done.stderr[-3000:]
    return env


def offline_env(venv: Path) -> dict[str, str]:
    """The venv's environment, with nothing of the editable install leaking in and no way to download."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
    for proxy in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy"):
        env[proxy] = CLOSED_PORT
    env.pop("NO_PROXY", None)
    env.pop("no_proxy", None)
    return env | {"VIRTUAL_ENV": str(venv), "PATH": f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}"}


@pytest.fixture
def elsewhere(tmp_path) -> Path:
    """A working directory that holds nothing of the project."""
    cwd = tmp_path / "elsewhere"
    cwd.mkdir()
    return cwd


def test_the_wheel_ships_the_default_model_and_nothing_from_tests_or_training_state(wheel):
    with zipfile.ZipFile(wheel) as zf:
        names = set(zf.namelist())
        assert f"{DEFAULT}/artifacts/manifest.json" in names, f"{PACKAGE_DATA}: the wheel has no {DEFAULT}/artifacts/manifest.json"
        manifest = json.loads(zf.read(f"{DEFAULT}/artifacts/manifest.json"))
    listed = [manifest["scheduler"]["file"], manifest["tokenizer"]["file"]]
    listed += [pe["onnx"]["file"] for c in manifest["components"].values() for pe in c["precisions"].values()]
    assert {f"onnx/fp32/{c}.onnx" for c in ("text_encoder", "unet", "vae_decoder", "vae_encoder")} <= set(listed)
    missing = [f for f in listed if f"{DEFAULT}/artifacts/{f}" not in names]
    assert not missing, f"{PACKAGE_DATA}: the wheel lacks shipped artifacts {missing}"
    assert {f"{DEFAULT}/model/{f}" for f in ("ldm_rt_model.json", "unet.safetensors", "autoencoder.safetensors")} <= names
    top = {n.split("/")[0] for n in names} - {"ldm_rt"}
    assert len(top) == 1 and top.pop().endswith(".dist-info"), "the wheel installs something besides ldm_rt"
    strays = [n for n in names if n.startswith(f"{DEFAULT}/") and n.split("/")[3] not in ("model", "artifacts", "README.md")]
    strays += [n for n in names if "/checkpoints/" in n or n.startswith("ldm_rt/engines/build/") or "__pycache__" in n]
    assert not strays, f"the wheel ships files it should not: {sorted(strays)[:10]}"


def test_a_plain_install_samples_without_torch_from_any_folder(venv, elsewhere):
    env = offline_env(venv)
    python, cli = venv / "bin" / "python", venv / "bin" / "ldm-rt"
    done = run([python, "-c", "import importlib.util, sys; sys.exit(importlib.util.find_spec('torch') is not None)"], cwd=elsewhere, env=env)
    assert done.returncode == 0, "torch is importable in the runtime-only venv"

    out = elsewhere / "OUT.png"
    done = run([cli, "sample", "--prompt", PROMPT, "--steps", "4", "--seed", "0", "--out", "OUT.png"], cwd=elsewhere, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    image = np.asarray(Image.open(out))
    assert image.ndim == 3 and image.shape[2] == 3 and image.std() > 0

    done = run([cli, "info"], cwd=elsewhere, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    shown = Path(done.stdout.splitlines()[0].removeprefix("artifacts: "))
    assert shown.is_relative_to(venv), f"`ldm-rt info` read {shown}, not the installed package data"

    script = (
        "import sys\n"
        "import ldm_rt.runtime\n"
        "from ldm_rt.runtime.pipeline import Pipeline\n"
        "assert ldm_rt.runtime.__file__.startswith(sys.prefix), ldm_rt.runtime.__file__\n"
        f"result = Pipeline.load().generate({PROMPT!r}, steps=4, seed=0)\n"
        "assert result.images.ndim == 4 and result.images.dtype.name == 'uint8', result.images.shape\n"
        "assert 'torch' not in sys.modules, 'the runtime imported torch'\n"
        "print(result.images.shape)\n"
    )
    done = run([python, "-c", script], cwd=elsewhere, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
