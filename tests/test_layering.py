"""The dependency arrows of the architecture: runtime <- reference <- {export, training} <- benchmarks; nothing
imports export, training or benchmarks; the runtime never imports torch; diffusers is a test-only oracle (and a
benchmark peer)."""

from __future__ import annotations

import ast
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LAYERS = ("runtime", "reference", "training", "export", "engines", "benchmarks")
# For each layer: the layers it may import. `benchmarks` is a folder of the checkout imported as a top-level
# package (benchmarks/__init__.py), the others are ldm_rt's subpackages.
ALLOWED = {
    "runtime": {"runtime"},
    "reference": {"runtime", "reference"},
    "training": {"runtime", "reference", "training"},
    "export": {"runtime", "reference", "export"},
    "engines": {"engines"},
    "benchmarks": {"runtime", "reference", "export", "training", "benchmarks"},
}
FORBIDDEN_THIRD_PARTY = {
    "runtime": {"torch", "transformers", "diffusers", "safetensors", "onnx"},
    "reference": {"diffusers"},
    "training": {"diffusers"},
    "export": {"diffusers"},
    "engines": {"torch", "diffusers"},
    "benchmarks": set(),  # its peers run diffusers and Optimum, each in its own process
}


def imports_of(path: Path) -> set[str]:
    """Absolute module names imported by a file (relative imports resolved within its layer, as `ldm_rt.<layer>`)."""
    layer = path.relative_to(ROOT).parts[0]
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: stays inside the same top-level folder
                names.add(f"ldm_rt.{layer}")
            elif node.module:
                names.add(node.module)
    return names


def layer_files(layer: str) -> list[Path]:
    # Hidden folders are not ours: benchmarks/.venv-optimum is the Optimum peer's virtual environment.
    return sorted(p for p in (ROOT / layer).rglob("*.py") if not any(part.startswith(".") for part in p.relative_to(ROOT).parts))


def layer_of(name: str) -> str | None:
    """The layer an absolute module name belongs to (None: not ours)."""
    top, _, rest = name.partition(".")
    if top == "ldm_rt":
        return rest.split(".")[0] or None
    return "benchmarks" if top == "benchmarks" else None


@pytest.mark.parametrize("layer", LAYERS)
def test_import_arrows(layer):
    bad = []
    for path in layer_files(layer):
        for name in imports_of(path):
            target = layer_of(name)
            if target is not None:
                if target not in ALLOWED[layer]:
                    bad.append(f"{path.relative_to(ROOT)} imports {name}")
            elif name.partition(".")[0] in FORBIDDEN_THIRD_PARTY[layer]:
                bad.append(f"{path.relative_to(ROOT)} imports {name}")
    assert not bad, "\n".join(bad)


def test_checker_sees_a_bad_import(tmp_path):
    # Guard against a checker that passes vacuously.
    fake = ROOT / "runtime" / "_layering_probe_tmp.py"
    fake.write_text("import torch\nfrom ldm_rt.reference import configs\n")
    try:
        found = imports_of(fake)
    finally:
        fake.unlink()
    assert {"torch", "ldm_rt.reference"} <= found


def test_nothing_imports_benchmarks():
    assert all("benchmarks" not in allowed for layer, allowed in ALLOWED.items() if layer != "benchmarks")
    # The checker sees both spellings of a benchmarks import.
    assert layer_of("benchmarks.harness") == layer_of("ldm_rt.benchmarks") == "benchmarks"


def test_runtime_does_not_reach_into_benchmarks_by_path():
    # The runtime once found benchmarks/peers from its own file path (`parents[1] / "benchmarks" / "peers"`).
    found = []
    for path in layer_files("runtime"):
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.Constant) and node.value in ("benchmarks", "peers"):
                found.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    assert not found, found


def test_runtime_import_does_not_load_torch():
    modules = sorted(
        "ldm_rt.runtime." + ".".join(p.relative_to(ROOT / "runtime").with_suffix("").parts)
        for p in layer_files("runtime")
        if p.name != "__init__.py" and not p.name.startswith("_")
    )
    code = (
        "import sys, importlib\n"
        f"for m in {modules!r}:\n"
        "    importlib.import_module(m)\n"
        "heavy = sorted(m for m in ('torch', 'transformers', 'diffusers') if m in sys.modules)\n"
        "print(','.join(heavy))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "", f"importing the runtime loaded: {out.stdout.strip()}"


def test_base_install_has_no_torch():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    base = " ".join(project["dependencies"]).lower()
    assert "torch" not in base and "transformers" not in base
    assert any(d.startswith("torch") for d in project["optional-dependencies"]["torch"])
