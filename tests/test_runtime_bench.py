"""`ldm-rt bench`: our own pipeline timed in this process (load, first image, per image, per UNet step, peak
memory); no peers, no README rendering (those are benchmarks/, which the runtime never imports)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from test_runtime_cli import run_cli
from test_runtime_fixtures import synthetic

from ldm_rt.runtime import bench

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory):
    return synthetic(tmp_path_factory)[0]


def test_bench_times_our_pipeline(artifacts, capsys):
    argv = ["bench", "--model", artifacts, "--steps", 3, "--runs", 2, "--height", 16, "--width", 16, "--batch", 2, "--prompt", "a red cube"]
    code, out, err = run_cli([*argv, "--json"], capsys)
    assert code == 0, err
    got = json.loads(out)
    assert got["runs"] == 2 and got["batch"] == 2 and got["steps"] == 3
    assert got["load_s"] > 0 and got["first_image_s"] > 0 and 0 < got["unet_step_s"] < got["image_s"] * got["batch"]
    assert got["peak_rss_mb"] > 10 and got["params"]["width"] == 16 and got["params"]["prompts"] == ["a red cube"]
    assert "peers" not in got and "vs_ours" not in out
    code, out, _ = run_cli(argv, capsys)
    assert code == 0 and "UNet step: " in out and "peak RSS: " in out and "16x16, batch 2, 3 UNet calls" in out


def with_default_scheduler(artifacts: Path, folder: Path, name: str) -> Path:
    """A copy of `artifacts` whose manifest names `name` as the model's own scheduler (as export records it)."""
    import shutil

    from ldm_rt.runtime.manifest import Manifest

    copy = Path(shutil.copytree(artifacts, folder))
    manifest = Manifest.read(copy)
    manifest.default_scheduler = name
    manifest.write(copy)
    return copy


def test_bench_samples_with_the_models_own_scheduler_unless_told(artifacts, tmp_path, capsys):
    """Before: `ldm-rt bench --scheduler` defaulted to ddim whatever the model; now to the model's own (the
    manifest's default_scheduler), as `ldm-rt sample`, and --help says so."""
    model = with_default_scheduler(artifacts, tmp_path / "euler_model", "euler")
    argv = ["bench", "--model", model, "--steps", 2, "--runs", 1, "--height", 16, "--width", 16, "--json"]
    code, out, err = run_cli(argv, capsys)
    assert code == 0, err
    assert json.loads(out)["params"]["scheduler"] == "euler"
    code, out, err = run_cli([*argv, "--scheduler", "ddim"], capsys)
    assert code == 0 and json.loads(out)["params"]["scheduler"] == "ddim", err
    code, out, _ = run_cli(["bench", "--help"], capsys)
    assert code == 0 and "default: the model's own" in " ".join(out.split())


@pytest.mark.parametrize("runs", [0, bench.MAX_RUNS + 1])
def test_bench_refuses_bad_runs_in_one_line(artifacts, capsys, runs):
    code, out, err = run_cli(["bench", "--model", artifacts, "--runs", runs], capsys)
    assert code == 2 and out == "" and err.count("\n") == 1 and "runs must be a whole number from 1 to 100" in err


def test_bench_refuses_a_missing_model_in_one_line(tmp_path, capsys):
    code, _, err = run_cli(["bench", "--model", tmp_path / "nothing", "--runs", 1], capsys)
    assert code == 2 and err.startswith("ldm-rt: error: ") and err.count("\n") == 1


def test_peak_rss_copy_matches_the_workers():
    """runtime/bench.py keeps a marked copy of benchmarks/peers/worker_common.py's peak_rss_mb (the workers run
    where ldm_rt is not installed); both read the same high-water mark of this process."""
    sys.path.insert(0, str(ROOT / "benchmarks" / "peers"))
    try:
        import worker_common
    finally:
        sys.path.pop(0)
    ours, theirs = bench.peak_rss_mb(), worker_common.peak_rss_mb()
    assert ours is not None and theirs is not None and abs(ours - theirs) < 16  # read moments apart: the mark may rise
