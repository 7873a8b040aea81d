"""The machine a benchmark ran on: CPU, cores, RAM and versions, its float32 matmul peak (the roofline), and
the install footprint of each way of running (ldm-rt runtime only, with torch, diffusers)."""

from __future__ import annotations

import importlib.metadata
import os
import platform
import re
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ldm_rt.runtime.backends.base import physical_cores

__all__ = ["install_footprint", "machine_info", "matmul_peak", "physical_cores", "version"]

def version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def machine_info() -> dict[str, Any]:
    """CPU model, cores, RAM, OS and the versions of what the peers run on (read from metadata, not imported)."""
    cpu = platform.processor() or "?"
    flags: list[str] = []
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and cpu in ("?", "x86_64", ""):
                cpu = line.split(":", 1)[1].strip()
            elif line.startswith("flags") and not flags:
                flags = [f for f in line.split(":", 1)[1].split() if f in ("avx2", "fma", "avx512f", "avx512_bf16", "avx512_vnni", "amx_tile")]
    except OSError:
        pass
    ram = None
    try:
        kb = int(re.search(r"MemTotal:\s+(\d+)", Path("/proc/meminfo").read_text()).group(1))
        ram = kb / 1024**2
    except (OSError, AttributeError):
        pass
    versions = {name: version(name) for name in ("ldm-rt", "numpy", "onnxruntime", "torch", "diffusers", "transformers")}
    return {
        "cpu": cpu, "cpu_flags": flags, "logical_cores": os.cpu_count(), "physical_cores": physical_cores(), "ram_gib": ram,
        "os": platform.platform(), "python": platform.python_version(), "versions": {"python": platform.python_version(), **versions},
    }


def matmul_peak(n: int = 2048, repeats: int = 7) -> dict[str, Any]:
    """The machine's float32 matmul roofline: 2 n^3 / best time of numpy's (BLAS) n x n product, all cores."""
    rng = np.random.default_rng(0)
    a, b = rng.standard_normal((n, n), dtype=np.float32), rng.standard_normal((n, n), dtype=np.float32)
    c = np.empty((n, n), np.float32)
    np.matmul(a, b, out=c)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        np.matmul(a, b, out=c)
        best = min(best, time.perf_counter() - t0)
    return {"gflops": 2 * n**3 / best / 1e9, "n": n, "repeats": repeats, "best_s": best}


def _requirement_names(dist: importlib.metadata.Distribution, extras: Sequence[str]) -> list[str]:
    names = []
    for req in dist.requires or []:
        name = re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)", req).group(1)
        marker = req.split(";", 1)[1] if ";" in req else ""
        extra = re.search(r"extra\s*==\s*['\"]([^'\"]+)['\"]", marker)
        if extra is not None:
            if extra.group(1) in extras:
                names.append(name)
        elif not marker or _marker_holds(marker):
            names.append(name)
    return names


def _marker_holds(marker: str) -> bool:
    """An environment marker (python_version, sys_platform, ...) evaluated here; kept when it cannot be."""
    try:
        from packaging.markers import Marker
    except ImportError:  # packaging is not a runtime dependency: count the requirement if it is installed
        return True
    return Marker(marker).evaluate()


def _distribution_bytes(dist: importlib.metadata.Distribution) -> int:
    """Bytes of a distribution's files: the sizes its RECORD states, stat() for entries that state none."""
    total = 0
    for f in dist.files or []:
        if f.size is not None:
            total += f.size
            continue
        try:
            total += dist.locate_file(f).stat().st_size
        except OSError:
            continue
    return total


def _closure(roots: dict[str, Sequence[str]]) -> dict[str, int]:
    """Installed distributions reachable from `roots` (name -> extras), with their on-disk bytes."""
    sizes: dict[str, int] = {}
    todo = list(roots.items())
    while todo:
        name, extras = todo.pop()
        key = re.sub(r"[-_.]+", "-", name).lower()
        if key in sizes:
            continue
        try:
            dist = importlib.metadata.distribution(name)
        except importlib.metadata.PackageNotFoundError:
            continue  # a marker-only dependency of another platform, or not installed here
        sizes[key] = _distribution_bytes(dist)
        todo.extend((n, ()) for n in _requirement_names(dist, extras))
    return sizes


def install_footprint() -> dict[str, Any]:
    """On-disk size of the installed packages each way of running needs (files listed in their metadata,
    dependencies followed): ldm-rt runtime-only, ldm-rt with torch, and diffusers' torch pipeline."""
    setups = {
        "ldm-rt runtime (numpy + onnxruntime)": {"ldm-rt": ()},
        "ldm-rt with torch (reference)": {"ldm-rt": ("torch",)},
        "diffusers + torch + transformers": {"diffusers": (), "torch": (), "transformers": ()},
    }
    out = {}
    for label, roots in setups.items():
        sizes = _closure(roots)
        missing = [r for r in roots if re.sub(r"[-_.]+", "-", r).lower() not in sizes]
        largest = sorted(sizes.items(), key=lambda kv: -kv[1])[:5]
        out[label] = {"mb": sum(sizes.values()) / 1e6, "packages": len(sizes), "has_torch": "torch" in sizes, "missing": missing,
                      "largest_mb": {name: round(size / 1e6, 1) for name, size in largest}}
    return out


