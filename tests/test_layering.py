"""The dependency arrows of the architecture: runtime <- reference <- {export, training}; nothing imports
export or training; the runtime never imports torch; diffusers is a test-only oracle."""

from __future__ import annotations

import ast
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LAYERS = ("runtime", "reference", "training", "export", "engines")
# For each layer: the ldm_rt layers it may import.
ALLOWED = {
    "runtime": {"runtime"},
    "reference": {"runtime", "reference"},
    "training": {"runtime", "reference", "training"},
    "export": {"runtime", "reference", "export"},
    "engines": {"engines"},
}
FORBIDDEN_THIRD_PARTY = {
    "runtime": {"torch", "transformers", "diffusers", "safetensors", "onnx"},
    "reference": {"diffusers"},
    "training": {"diffusers"},
    "export": {"diffusers"},
    "engines": {"torch", "diffusers"},
}


def imports_of(path: Path) -> set[str]:
    """Absolute module names imported by a file (relative imports resolved within its layer)."""
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
    return sorted((ROOT / layer).rglob("*.py"))


@pytest.mark.parametrize("layer", LAYERS)
def test_import_arrows(layer):
    bad = []
    for path in layer_files(layer):
        for name in imports_of(path):
            top, _, rest = name.partition(".")
            if top == "ldm_rt":
                target = rest.split(".")[0]
                if target and target not in ALLOWED[layer]:
                    bad.append(f"{path.relative_to(ROOT)} imports {name}")
            elif top in FORBIDDEN_THIRD_PARTY[layer]:
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
