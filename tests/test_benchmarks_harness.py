"""The benchmark harness (the `benchmarks` package + benchmarks/peers) on tiny models, N=1: the schema of the
JSON and the tables, ratios computed side by side from the peers' own numbers, the FLOP counter against
hand-counted graphs, and the torch peers computing the same images from the same noise. No timing asserts."""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper
from test_runtime_fixtures import synthetic

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # `benchmarks` is a folder of the checkout, imported from its root (benchmarks/__init__.py)

from benchmarks import flops, harness, machine, report, targets  # noqa: E402
from benchmarks.harness import PEERS  # noqa: E402

# A stand-in peer speaking the worker protocol through benchmarks/peers/worker_common.py, with fixed stage
# times, so the ratios it gets can be checked against what it reported.
STUB = f"""
import sys, time
sys.path.insert(0, {str(PEERS)!r})
from worker_common import StageClock, run_worker

def prepare(spec):
    if spec.get("fail"):
        raise RuntimeError("stub asked to fail")
    clock = StageClock()
    def generate():
        clock.add("text_encoder", 0.003)
        for _ in range(spec["steps"]):
            clock.add("unet", 0.002)
        clock.add("vae_decoder", 0.004)
        time.sleep(0.01)
        return [[[[0, 0, 0]]]]  # one 1x1 image
    return generate, clock, {{"import_s": 0.0, "load_s": 0.0, "threads": 1, "versions": {{"stub": "1"}}}}

run_worker(prepare)
"""


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("bench")
    artifacts, _ = synthetic(tmp_path_factory)
    stub = tmp / "stub_worker.py"
    stub.write_text(STUB)
    peers = (
        harness.ours_peer(artifacts),
        harness.Peer("diffusers", (sys.executable, str(stub)), "stub-model"),
        harness.Peer("optimum", (sys.executable, str(stub)), "stub-model", extra={"fail": True}),
        harness.Peer("reference", skip_reason="not installed in this test"),
        *harness.gpu_peers(artifacts),
    )
    runs = (harness.RunSpec(16, 16, batch=1, steps=3, runs=1, prompt="a red cube"), harness.RunSpec(16, 16, batch=2, steps=2, runs=2, prompt="a red cube"))
    workloads = [
        harness.Workload("synthetic", "closed-form test model", artifacts, runs, peers, {"sd_shaped": True}),
        harness.Workload("default", "the shipped default model", None, (), (), skip_reason="engines/default/artifacts does not exist yet"),
    ]
    footprint = {"runtime only": {"mb": 200.0, "packages": 20, "has_torch": False, "missing": []}}
    result = report.run_benchmark(workloads, tmp / "out", timeout=300, footprint=footprint, matmul_n=512)
    paths = report.write_report(result, tmp / "results", "smoke")
    return result, paths


def test_report_schema_and_files(smoke):
    result, paths = smoke
    assert result["schema"] == report.SCHEMA
    assert {"cpu", "physical_cores", "logical_cores", "ram_gib", "versions", "load_average_start"} <= set(result["machine"])
    assert result["matmul_peak"]["gflops"] > 0
    assert json.loads(paths["json"].read_text()) == json.loads(json.dumps(result))
    synthetic_w, default_w = result["workloads"]
    assert default_w["skipped"].startswith("engines/default/artifacts does not exist")
    assert [r["spec"]["batch"] for r in synthetic_w["runs"]] == [1, 2]
    for run in synthetic_w["runs"]:
        assert run["unet_flops"] > 0 and run["unet_rows"] == 2 * run["spec"]["batch"]  # guidance doubles the rows
        assert list(run["peers"]) == ["ours", "diffusers", "optimum", "reference", "ours-cuda", "ours-tensorrt"]
        ours = run["peers"]["ours"]
        assert ours["status"] == "ok" and len(ours["runs"]) == run["spec"]["runs"]
        assert ours["unet_calls_per_run"] == run["spec"]["steps"]
        assert ours["peak_rss_mb"] > 10 and ours["cold_start_s"] >= ours["first_image_s"] > 0
        assert set(ours["versions"]) >= {"onnxruntime", "numpy"}
        prof = run["ours_profile"]
        assert prof["ops"] and abs(sum(o["share"] for o in prof["ops"])) <= 1.0 + 1e-9
        # Every op lands in one kind; the closed-form test model has convolutions and matmuls.
        assert sum(prof["categories"].values()) == pytest.approx(1.0) and prof["categories"]["convolution"] > 0
        assert prof["scaling"]["one_thread_s"] > 0 and prof["scaling"]["speedup"] == pytest.approx(
            prof["scaling"]["one_thread_s"] / prof["scaling"]["all_threads_s"])


def test_ratios_are_peer_over_ours_from_the_same_run(smoke):
    result, _ = smoke
    for run in result["workloads"][0]["runs"]:
        ours, stub = run["peers"]["ours"], run["peers"]["diffusers"]
        assert stub["status"] == "ok"
        assert stub["unet_step_s"] == pytest.approx(0.002) and stub["text_encoder_s"] == pytest.approx(0.003)
        assert stub["latency_per_image_s"] == pytest.approx(stub["latency_s"] / run["spec"]["batch"])
        # Latency and UNet step: median over rounds of the within-round ratio; memory and cold start: one each.
        rounds = list(zip(stub["runs"], ours["runs"]))
        assert len(rounds) == run["spec"]["runs"]
        assert stub["vs_ours"]["latency"] == pytest.approx(statistics.median(a["total"] / b["total"] for a, b in rounds))
        assert stub["vs_ours"]["unet_step"] == pytest.approx(
            statistics.median(statistics.median(a["unet"]) / statistics.median(b["unet"]) for a, b in rounds))
        assert stub["vs_ours"]["peak_rss"] == pytest.approx(stub["peak_rss_mb"] / ours["peak_rss_mb"])
        assert stub["vs_ours"]["cold_start"] == pytest.approx(stub["cold_start_s"] / ours["cold_start_s"])
        assert ours["vs_ours"]["latency"] == pytest.approx(1.0)
        assert stub["unet_gflops"] == pytest.approx(run["unet_flops"] / 0.002 / 1e9)


def test_failed_and_skipped_peers_are_reported_not_dropped(smoke):
    result, paths = smoke
    run = result["workloads"][0]["runs"][0]
    assert run["peers"]["optimum"]["status"] == "failed" and "stub asked to fail" in run["peers"]["optimum"]["error"]
    assert run["peers"]["reference"] == {"status": "skipped", "label": harness.PEER_LABELS["reference"], "reason": "not installed in this test"}
    assert run["peers"]["ours-cuda"]["status"] == "skipped"
    text = paths["markdown"].read_text()
    assert "failed: RuntimeError: stub asked to fail" in text and "skipped: not installed in this test" in text
    assert "skipped: no CUDA GPU" in text or "CUDAExecutionProvider" in str(harness.gpu_peers)


def test_openvino_peer_starts_from_a_warm_compile_cache(tmp_path_factory):
    pytest.importorskip("openvino", reason="OpenVINO is not installed (pip install 'ldm-rt[openvino]')")
    tmp = tmp_path_factory.mktemp("bench_ov")
    artifacts, _ = synthetic(tmp_path_factory)
    peer = harness.openvino_peer(artifacts)
    assert peer.skip_reason is None and peer.extra["compile_cache"] == harness.WARM_CACHE
    # The OpenVINO backend at its best speed (bf16 where the CPU has it), and the row says so.
    assert peer.extra["backend"] == "openvino" and peer.extra["reduced_precision"] and peer.extra["providers"] is None
    assert "bf16" in peer.label
    workload = harness.Workload("synthetic", "closed-form test model", artifacts, (harness.RunSpec(16, 16, batch=1, steps=2, runs=1),), (harness.ours_peer(artifacts), peer))
    entry = harness.run_workload(workload, tmp, timeout=300, profile=False)
    assert entry["runs"][0]["peers"]["ours-openvino"]["status"] == "ok"
    cache = tmp / "work" / "synthetic" / "compile_cache" / "openvino"
    assert any(cache.iterdir())  # filled before the peer started


def test_markdown_and_readme_tables(smoke):
    result, paths = smoke
    md = paths["markdown"].read_text()
    rows = [line for line in md.splitlines() if line.startswith("| ldm-rt (ONNX Runtime CPU) |")]
    header = next(line for line in md.splitlines() if line.startswith("| peer |"))
    assert len(rows) == 2 and all(row.count("|") == header.count("|") for row in rows)
    assert all(line.count("|") == header.count("|") for line in md.splitlines() if line.startswith("| ldm-rt (TensorRT FP16) |"))
    assert "## Targets (issue 7, CPU)" in md and "Machine: " in md and "matmul peak" in md
    readme = paths["readme"].read_text()
    assert readme.startswith("## Performance") and readme == report.render_readme_section(result)
    assert "| 16x16, batch 2, 2 steps | diffusers StableDiffusionPipeline (PyTorch) |" in readme
    assert "**default**: not measured" in readme
    where = [line for line in readme.splitlines() if line.startswith("| synthetic |")]
    assert len(where) == 2 and all(line.count("|") == 14 for line in where)  # one row per profiled run, every column filled


def test_targets_take_the_worst_run():
    def run(latency_ratio, cold_ratio, rss_ratio, fraction):
        return {"peers": {"ours": {"status": "ok", "peak_fraction": fraction},
                          "diffusers": {"status": "ok", "vs_ours": {"latency": latency_ratio, "cold_start": cold_ratio, "peak_rss": rss_ratio}}}}

    fake = {"workloads": [{"config": {"sd_shaped": True}, "runs": [run(3.0, 6.0, 1.5, 0.6), run(1.5, 7.0, 0.9, 0.4)]}]}
    got = {t["key"]: t for t in targets.evaluate_targets(fake)}
    assert got["latency_diffusers"]["worst"] == 1.5 and not got["latency_diffusers"]["met"]
    assert got["cold_diffusers"]["worst"] == 6.0 and got["cold_diffusers"]["met"]
    assert got["memory"]["worst"] == 0.9 and not got["memory"]["met"]
    assert got["roofline"]["worst"] == 0.4 and not got["roofline"]["met"]


def test_flop_counter_against_hand_count(tmp_path):
    """Conv (3x3, pad 1, groups 1), a batched MatMul and a transposed Gemm: 2 FLOPs per multiply-add."""
    conv_w = helper.make_tensor("w", TensorProto.FLOAT, (8, 3, 3, 3), np.zeros(8 * 27, np.float32))
    gemm_b = helper.make_tensor("gb", TensorProto.FLOAT, (2, 6), np.zeros(12, np.float32))
    nodes = [
        helper.make_node("Conv", ["x", "w"], ["y"], pads=[1, 1, 1, 1]),
        helper.make_node("MatMul", ["a", "b"], ["c"]),
        helper.make_node("Gemm", ["g", "gb"], ["h"], transB=1),
    ]
    graph = helper.make_graph(
        nodes, "flops",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, (1, 3, 16, 16)), helper.make_tensor_value_info("a", TensorProto.FLOAT, (2, 5, 7)),
         helper.make_tensor_value_info("b", TensorProto.FLOAT, (7, 4)), helper.make_tensor_value_info("g", TensorProto.FLOAT, (3, 6))],
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in ("y", "c", "h")],
        initializer=[conv_w, gemm_b],
    )
    path = tmp_path / "flops.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9), path)
    rng = np.random.default_rng(0)
    feeds = {"x": rng.standard_normal((1, 3, 16, 16), dtype=np.float32), "a": rng.standard_normal((2, 5, 7), dtype=np.float32),
             "b": rng.standard_normal((7, 4), dtype=np.float32), "g": rng.standard_normal((3, 6), dtype=np.float32)}
    got = flops.graph_flops(path, feeds)["by_op"]
    assert got == {"Conv": 2 * (8 * 16 * 16) * (3 * 3 * 3), "MatMul": 2 * (2 * 5 * 4) * 7, "Gemm": 2 * (3 * 2) * 6}


def test_footprint_of_the_runtime_install_has_no_torch():
    import importlib.metadata

    runtime = machine._closure({"ldm-rt": ()})
    assert "torch" not in runtime and {"numpy", "onnxruntime", "tokenizers", "pillow"} <= set(runtime)
    assert all(size > 0 for name, size in runtime.items() if name != "ldm-rt")
    assert "torch" in machine._requirement_names(importlib.metadata.distribution("ldm-rt"), ("torch",))


def torch_peer_images(process: harness.Peer, in_process: str, in_process_model: Path, spec: dict, tmp_path: Path) -> tuple[np.ndarray, np.ndarray]:
    """The images of two torch peers for one spec: `process` run as the benchmark runs it (its own process, the line
    protocol, a warm-up and a timed call; its numbers checked) and the worker `in_process` (reference or diffusers)
    prepared and called in this process, which has torch already. The SD test runs the diffusers worker as a process
    and the reference in-process, the SDXL test the other way round: each worker runs both ways, one torch start per test."""
    from test_benchmarks_peers import worker_module

    specs = {process.name: {**spec, **process.extra, "model": process.model, "image_out": str(tmp_path / f"{process.name}.npy")}}
    raw = harness.run_peers([process], specs, {process.name: tmp_path / "peer.log"}, warmup=1, runs=1, timeout=600)[process.name]
    assert raw["status"] == "ok", (tmp_path / "peer.log").read_text()[-2000:]
    assert raw["peak_rss_mb"] > 50 and raw["cold_start_s"] > raw["first_image_s"]
    assert [len(r["unet"]) for r in raw["runs"]] == [spec["steps"]] and raw["runs"][0]["text_encoder"] > 0 and raw["runs"][0]["vae_decoder"] > 0
    generate, clock, info = worker_module(f"{in_process}_worker").prepare({**spec, "model": str(in_process_model)})
    clock.reset()
    here = np.asarray(generate())
    assert len(clock.times["unet"]) == spec["steps"] and clock.times["text_encoder"] > 0 and info["load_s"] > 0
    return np.load(tmp_path / f"{process.name}.npy"), here


def test_torch_peers_compute_the_same_images(tiny_ldm_rt_model, tmp_path):
    """The default-model path: an ldm-rt model folder converted to diffusers' layout (benchmarks/diffusers_layout.py);
    the diffusers worker on the conversion and the reference worker on the original, with the same noise and DDIM,
    must draw the same image."""
    from benchmarks.diffusers_layout import ldm_rt_to_diffusers

    converted = ldm_rt_to_diffusers(tiny_ldm_rt_model, tmp_path / "diffusers")
    np.save(tmp_path / "noise.npy", np.random.default_rng(0).standard_normal((1, 4, 16, 16), dtype=np.float32))
    spec = {**harness.RunSpec(32, 32, steps=2, runs=1, prompt="a red cat").to_dict(), "threads": 2, "noise_file": str(tmp_path / "noise.npy")}
    peer = harness.Peer("diffusers", harness.worker_argv("diffusers"), str(converted))
    diffusers, reference = torch_peer_images(peer, "reference", tiny_ldm_rt_model, spec, tmp_path)
    assert reference.shape == (1, 32, 32, 3)
    assert np.abs(reference.astype(int) - diffusers.astype(int)).max() <= 2 and reference.std() > 5  # the same non-trivial image
