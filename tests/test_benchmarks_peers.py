"""benchmarks' CPU peers of issue 21 without their venvs: the single-file checkpoint stable-diffusion.cpp loads
(round trip through diffusers' own single-file loader), the OpenVINO GenAI and stable-diffusion.cpp workers'
protocol pieces, and the like-for-like target arithmetic."""

from __future__ import annotations

import statistics
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # `benchmarks` is imported from the checkout's root

from benchmarks import single_file, workloads  # noqa: E402

TINY = workloads.SDShape(unet_channels=(32, 64), unet_layers_per_block=1, unet_heads=4, text_hidden=32, text_layers=1,
                         text_heads=2, text_intermediate=64, vae_channels=(32, 32), vae_layers_per_block=1)


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    pytest.importorskip("diffusers")
    return workloads.make_sd_shaped(tmp_path_factory.mktemp("sd") / "diffusers", TINY)


@pytest.mark.parametrize("dtype", ["f32", "f16"])
def test_single_file_round_trips_through_diffusers_loader(tiny_folder, tmp_path, dtype):
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from diffusers.loaders.single_file_utils import convert_ldm_clip_checkpoint
    from safetensors.torch import load_file
    from transformers import CLIPTextModel

    out = single_file.diffusers_to_single_file(tiny_folder, tmp_path / "model.safetensors", dtype)
    to = torch.float16 if dtype == "f16" else torch.float32
    sd = load_file(str(out))
    assert {v.dtype for v in sd.values()} == {to}
    assert any(k.startswith("model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2") for k in sd)
    # diffusers' own single-file loader, given the folder's configs (no hub), reads back exactly the weights.
    for cls, part in ((UNet2DConditionModel, "unet"), (AutoencoderKL, "vae")):
        theirs = cls.from_single_file(str(out), config=str(tiny_folder), subfolder=part, local_files_only=True, torch_dtype=to).state_dict()
        mine = cls.from_pretrained(tiny_folder / part).state_dict()
        assert theirs.keys() == mine.keys(), part
        bad = [k for k in mine if not torch.equal(theirs[k].to(to), mine[k].to(to).reshape(theirs[k].shape))]
        assert not bad, (part, bad[:5])
    from ldm_rt.reference.checkpoints import hf_text_keys

    # Both in the canonical `text_model.*` naming (transformers 5's state_dict drops that level).
    weights = hf_text_keys(CLIPTextModel.from_pretrained(tiny_folder / "text_encoder").state_dict())
    theirs = hf_text_keys(convert_ldm_clip_checkpoint(sd))
    assert weights.keys() <= theirs.keys() and all(torch.equal(theirs[k], v.to(to)) for k, v in weights.items())


def test_single_file_never_overwrites(tiny_folder, tmp_path):
    out = tmp_path / "taken.safetensors"
    out.write_text("user data")
    with pytest.raises(FileExistsError):
        single_file.diffusers_to_single_file(tiny_folder, out)
    assert out.read_text() == "user data"
    assert single_file.main([str(tiny_folder), str(out)]) == 2


# ---- the workers' pieces that run without their venvs ----------------------------------------------------------
def worker_module(name: str):
    """A peer worker imported as its process does (peers/ on sys.path: worker_common is a sibling module)."""
    import importlib

    sys.path.insert(0, str(ROOT / "benchmarks" / "peers"))
    try:
        return importlib.import_module(name)
    finally:
        sys.path.pop(0)


def test_openvino_genai_precision_properties():
    worker = worker_module("openvino_genai_worker")
    assert worker.plugin_config("default") == {}  # what a user gets: the CPU plugin's own choice
    assert worker.plugin_config("f32") == {"INFERENCE_PRECISION_HINT": "f32"}
    with pytest.raises(ValueError, match="precision"):
        worker.plugin_config("fp8")
    assert worker.us_to_s([1_500_000.0, 2000.0]) == [1.5, 0.002]


def test_sdcpp_records_sampling_steps_only():
    worker = worker_module("sdcpp_worker")
    from worker_common import StageClock

    clock = StageClock()
    record = worker.step_recorder(clock, steps=4)
    for step in range(1, 5):
        record(step, 4, 0.5 * step)
    record(10, 1130, 0.0)  # tensor-loading progress: other counts, no time
    assert clock.times["unet"] == [0.5, 1.0, 1.5, 2.0]
    assert worker.SAMPLER == "ddim_trailing"


def test_peer_rows_say_precision_and_why_an_image_is_not_compared():
    from benchmarks import harness

    ov = harness.openvino_genai_peers("ir", "/venv/bin/python", None)
    assert [(p.name, p.extra["precision"]) for p in ov] == [("openvino-genai", "default"), ("openvino-genai-f32", "f32")]
    assert all(p.argv[1].endswith("openvino_genai_worker.py") and p.skip_reason is None for p in ov)
    assert all(p.skip_reason == "no venv" for p in harness.openvino_genai_peers(None, None, "no venv"))
    sd = harness.sdcpp_peer("model.safetensors", "/venv/bin/python", None)
    assert sd.no_image_compare and "noise" in sd.no_image_compare
    assert harness.sdcpp_peer(None, None, None).skip_reason  # no checkpoint: skipped, and says so
    assert workloads.sdcpp_checkpoint(True, None, workloads.SDShape(), Path("x"), Path("y"), {}) == (None, workloads.SDCPP_SHAPES)


def test_peer_env_installs_with_its_pins_and_reports_a_failure(tmp_path, monkeypatch):
    import subprocess

    from benchmarks.peers import peer_env, sdcpp_env

    ran = []

    def fake_run(command, **kwargs):  # the venv is made; pip fails
        ran.append((command, kwargs.get("env", {})))
        return subprocess.CompletedProcess(command, 1 if "pip" in command else 0)

    monkeypatch.setattr(peer_env.subprocess, "run", fake_run)
    env = peer_env.PeerEnv("probe", tmp_path / "venv", ("pkg==1",), tmp_path / "c.txt", probe="import pkg", pip_env={"CMAKE_BUILD_PARALLEL_LEVEL": "2"})
    with pytest.raises(peer_env.PeerEnvError, match=r"probe environment: `.*pip install .*pkg==1` failed; see .*pip.log"):
        env.create(log_file=tmp_path / "pip.log")
    pip, pip_env = ran[-1]
    assert pip[pip.index("-c") + 1] == str(tmp_path / "c.txt") and pip_env["CMAKE_BUILD_PARALLEL_LEVEL"] == "2"
    # Every peer venv is pinned by a constraints file beside its module, and the file pins what is measured.
    assert "stable-diffusion-cpp-python==" in sdcpp_env.ENV.constraints.read_text()


# ---- like-for-like ratios and issue 21's targets ------------------------------------------------------------------
def _row(latency, rss, cold, precision="f32", rounds=None):
    runs = [{"total": t, "unet": [t / 4] * 4} for t in (rounds or [latency])]
    return {"status": "ok", "precision": precision, "latency_s": latency, "peak_rss_mb": rss, "cold_start_s": cold, "runs": runs,
            "unet_step_min_s": latency / 4}


def test_same_precision_ratios_pair_f32_with_f32_and_bf16_with_bf16():
    from benchmarks import harness

    peers = {"ours": _row(6.0, 5000, 15.0, rounds=[6.0, 6.0]), "ours-openvino": _row(3.0, 6000, 4.0, "bf16", rounds=[3.0, 3.0]),
             "openvino-genai": _row(2.9, 6300, 3.0, "bf16", rounds=[2.9, 3.3]), "openvino-genai-f32": _row(5.3, 8400, 5.0, rounds=[5.3, 5.5]),
             "sdcpp": _row(25.0, 2600, 30.0, "f16")}
    harness.add_ratios(peers)
    bf16, f32 = peers["openvino-genai"]["vs_same_precision"], peers["openvino-genai-f32"]["vs_same_precision"]
    assert bf16["baseline"] == "ours-openvino" and bf16["latency"] == pytest.approx((2.9 / 3.0 + 3.3 / 3.0) / 2)
    assert bf16["peak_rss"] == pytest.approx(6300 / 6000) and bf16["cold_start"] == pytest.approx(3.0 / 4.0)
    assert f32["baseline"] == "ours" and f32["latency"] == pytest.approx((5.3 + 5.5) / 2 / 6.0)
    assert "vs_same_precision" not in peers["sdcpp"]  # no ldm-rt row at f16
    assert peers["openvino-genai"]["vs_ours"]["latency"] == pytest.approx(statistics.median([2.9 / 6.0, 3.3 / 6.0]))


def test_issue21_targets_met_missed_and_not_measured():
    from benchmarks import harness, targets

    peers = {"ours": _row(6.0, 5000, 15.0), "openvino-genai": _row(2.9, 6300, 3.0, "bf16"), "openvino-genai-f32": _row(7.5, 8400, 5.0),
             "sdcpp": _row(25.0, 2600, 30.0, "f16")}
    harness.add_ratios(peers)
    report = {"workloads": [{"name": workloads.SD15_SHAPE.name, "runs": [{"peers": peers}]},
                            {"name": "sd-shaped", "runs": [{"peers": {"ours": _row(1.0, 100, 1.0), "sdcpp": _row(100.0, 1, 1.0, "f16")}}]}]}
    got = {t["key"]: t for t in targets.evaluate_issue21(report)}
    assert got["latency_openvino-genai-f32"]["worst"] == pytest.approx(7.5 / 6.0) and got["latency_openvino-genai-f32"]["met"]
    assert got["peak_rss_openvino-genai-f32"]["worst"] == pytest.approx(8400 / 5000) and got["peak_rss_openvino-genai-f32"]["met"]
    assert got["cold_start_openvino-genai-f32"]["worst"] == pytest.approx(5.0 / 15.0) and not got["cold_start_openvino-genai-f32"]["met"]
    # ldm-rt has no bf16 row here: the bf16 targets are listed as not measured, never compared with the f32 row.
    assert got["latency_openvino-genai"]["worst"] is None and "no bf16 row" in got["latency_openvino-genai"]["missing"]
    # stable-diffusion.cpp against ldm-rt's fastest row, only on the SD 1.5-sized workload: 25 / 6 < 6.
    assert got["latency_sdcpp"]["worst"] == pytest.approx(25.0 / 6.0) and not got["latency_sdcpp"]["met"]
    assert "25.00 s vs 6.00 s (ours)" in got["latency_sdcpp"]["numbers"][0]
    from benchmarks import report as report_module

    text = "\n".join(report_module.issue21_lines({"targets_issue21": list(got.values())}))
    assert "not measured: ldm-rt has no bf16 row" in text and "| 4.17x | 25.00 s vs 6.00 s (ours) | no |" in text


LONE_STUB = f"""
import atexit, os, sys
sys.path.insert(0, {str(ROOT / "benchmarks" / "peers")!r})
from worker_common import StageClock, run_worker

def prepare(spec):
    lock = spec["lock"]
    if os.path.exists(lock):
        raise RuntimeError("another peer process is alive")
    open(lock, "w").close()
    atexit.register(os.remove, lock)
    clock = StageClock()
    def generate():
        clock.add("unet", 0.001)
        return [[[[0, 0, 0]]]]
    return generate, clock, {{"import_s": 0.0, "load_s": 0.0, "threads": 1, "versions": {{}}}}

run_worker(prepare)
"""


@pytest.mark.parametrize("sequential", [True, False])
def test_sequential_workloads_run_one_peer_process_at_a_time(tmp_path, sequential):
    from benchmarks import harness

    stub = tmp_path / "lone_worker.py"
    stub.write_text(LONE_STUB)
    peers = [harness.Peer(name, (sys.executable, str(stub)), "m") for name in ("a", "b")]
    spec = {**harness.RunSpec(8, 8, steps=2, runs=2).to_dict(), "lock": str(tmp_path / "alive")}
    raw = harness.run_peers(peers, {"a": spec, "b": spec}, {p.name: tmp_path / f"{p.name}.log" for p in peers}, 1, 2, 60, sequential)
    assert raw["a"]["status"] == "ok" and len(raw["a"]["runs"]) == 2
    # Kept alive side by side, the second peer finds the first still running; one at a time, it never does.
    assert raw["b"]["status"] == ("ok" if sequential else "failed")
