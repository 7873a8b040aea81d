"""How much work a UNet step is and where its time goes: FLOPs counted from the exported graph's Conv, MatMul
and Gemm shapes as ONNX Runtime's profiler records them, and ONNX Runtime's profile of ldm-rt's UNet (time
per op type and kind, the kernels' GFLOP/s, scaling from one thread to all)."""

from __future__ import annotations

import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from ldm_rt.runtime.manifest import Manifest

# Ops whose multiply-adds are counted; everything else (norms, softmax, elementwise) is memory-bound and
# small next to them in a UNet.
FLOP_OPS = ("Conv", "ConvTranspose", "MatMul", "Gemm")


def _node_events(profile_file: str) -> list[dict[str, Any]]:
    events = json.loads(Path(profile_file).read_text())
    return [e for e in events if e.get("cat") == "Node" and e.get("name", "").endswith("_kernel_time")]


def _unet_file(artifacts: Path, as_run: bool = False) -> tuple[Path, Any]:
    """The fp32 UNet graph of an artifacts folder and its manifest entry (contract). FLOPs are counted on the
    portable graph; `as_run` gives the file the ONNX Runtime backend runs (the fused-attention variant if built)."""
    entry = Manifest.read(artifacts).components["unet"]
    fp32 = entry.precisions["fp32"]
    return Path(artifacts) / (fp32.ort.onnx.file if as_run and fp32.ort else fp32.onnx.file), entry


def _unet_feeds(entry, rows: int, h: int, w: int) -> dict[str, np.ndarray]:
    sizes = {"unet_batch": rows, "latent_height": h, "latent_width": w}
    return entry.contract.sample_inputs(sizes, np.random.default_rng(0))


def conv_matmul_flops(events: list[dict[str, Any]]) -> dict[str, float]:
    """FLOPs (2 per multiply-add) of the Conv/MatMul/Gemm nodes in profiler events, by op type.

    Conv: 2 * |output| * |weight| / C_out (weight (C_out, C_in/groups, kh, kw)); MatMul: 2 * |output| * K;
    Gemm: 2 * |output| * K with K = |A| / M."""
    by_op: dict[str, float] = {}
    for e in events:
        op = e["args"].get("op_name")
        if op not in FLOP_OPS:
            continue
        ins = [next(iter(t.values())) for t in e["args"].get("input_type_shape", [])]
        outs = [next(iter(t.values())) for t in e["args"].get("output_type_shape", [])]
        if not ins or not outs:
            continue
        out_size = float(np.prod(outs[0]))
        if op in ("Conv", "ConvTranspose"):
            weight = ins[1]
            per_out = float(np.prod(weight)) / weight[0] if op == "Conv" else float(np.prod(weight[1:]))
            flops = 2.0 * out_size * per_out if op == "Conv" else 2.0 * float(np.prod(ins[0])) * per_out
        elif op == "MatMul":
            flops = 2.0 * out_size * ins[0][-1]
        else:
            flops = 2.0 * out_size * float(np.prod(ins[0])) / outs[0][0]
        by_op[op] = by_op.get(op, 0.0) + flops
    return by_op


def graph_flops(onnx_path: Path | str, feeds: dict[str, np.ndarray]) -> dict[str, Any]:
    """FLOPs of one run of an ONNX graph on `feeds`, from one profiled run of the unoptimised graph (the
    exported ops with their real shapes; fusions would hide them)."""
    import onnxruntime as ort

    with tempfile.TemporaryDirectory() as tmp:
        so = ort.SessionOptions()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        so.enable_profiling = True
        so.profile_file_prefix = str(Path(tmp) / "flops")
        so.log_severity_level = 3
        session = ort.InferenceSession(str(onnx_path), sess_options=so, providers=["CPUExecutionProvider"])
        session.run(None, feeds)
        by_op = conv_matmul_flops(_node_events(session.end_profiling()))
    return {"total": sum(by_op.values()), "by_op": by_op}


def unet_flops(artifacts: Path, rows: int, h: int, w: int) -> dict[str, Any]:
    """FLOPs of one UNet call with `rows` rows (2 x batch under guidance) at latent size h x w."""
    path, entry = _unet_file(artifacts)
    return graph_flops(path, _unet_feeds(entry, rows, h, w))


# family: (kernels that run it after ONNX Runtime's fusions, exported ops whose FLOPs were counted);
# NCHWc convolutions keep the name Conv; fused attention runs the attention MatMuls of the portable graph.
FLOP_FAMILIES = {"Conv": (("Conv", "FusedConv", "ConvTranspose"), ("Conv", "ConvTranspose")),
                 "MatMul": (("MatMul", "FusedMatMul", "Gemm", "MultiHeadAttention"), ("MatMul", "Gemm"))}


# What each op type is, for the "where the time goes" table; anything unlisted is "other" (elementwise
# arithmetic, activations, reshapes, concatenations: the memory-bound rest).
OP_CATEGORIES = {
    "attention": ("MultiHeadAttention", "Attention", "Softmax"),
    "convolution": ("Conv", "FusedConv", "ConvTranspose"),
    "matmul": ("MatMul", "FusedMatMul", "Gemm"),
    "normalisation": ("InstanceNormalization", "LayerNormalization", "SkipLayerNormalization", "GroupNorm", "GroupNormalization"),
    "layout": ("ReorderInput", "ReorderOutput"),
}


def _interleaved_medians(sessions: dict[Any, Any], feeds: dict[str, np.ndarray], repeats: int) -> dict[Any, float]:
    """Median seconds per call of each session, the sessions taking turns so load changes hit all alike."""
    times: dict[Any, list[float]] = {k: [] for k in sessions}
    for s in sessions.values():
        s.run(None, feeds)
    for _ in range(repeats):
        for k, s in sessions.items():
            t0 = time.perf_counter()
            s.run(None, feeds)
            times[k].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


def op_profile(artifacts: Path, rows: int, h: int, w: int, flops_by_op: dict[str, float] | None = None,
               repeats: int = 3, top: int = 8) -> dict[str, Any]:
    """Where ldm-rt's UNet step spends its time: ONNX Runtime's profiler on the runtime's own session
    options, time per op type and per category over `repeats` calls after one warm-up, the GFLOP/s the
    convolution and matrix-multiply kernels reach on their own, and how the step scales from one thread
    to all (timed without the profiler, whose per-node cost would distort it)."""
    import onnxruntime as ort

    from ldm_rt.runtime.backends.base import HostOptions
    from ldm_rt.runtime.backends.onnxruntime_backend import session_options

    path, entry = _unet_file(artifacts, as_run=True)
    feeds = _unet_feeds(entry, rows, h, w)
    with tempfile.TemporaryDirectory() as tmp:
        so = session_options()
        so.enable_profiling = True
        so.profile_file_prefix = str(Path(tmp) / "ops")
        session = ort.InferenceSession(str(path), sess_options=so, providers=["CPUExecutionProvider"])
        session.run(None, feeds)
        t0 = time.perf_counter()
        for _ in range(repeats):
            session.run(None, feeds)
        step_s = (time.perf_counter() - t0) / repeats
        events = json.loads(Path(session.end_profiling()).read_text())
    threads = so.intra_op_num_threads
    plain = {n: ort.InferenceSession(str(path), sess_options=session_options(HostOptions(n)), providers=["CPUExecutionProvider"])
             for n in sorted({1, threads})}
    scaling = _interleaved_medians(plain, feeds, max(repeats, 3))
    runs = sorted((e for e in events if e.get("cat") == "Session" and e.get("name") == "model_run"), key=lambda e: e["ts"])
    timed = runs[-repeats:]
    in_timed = [e for e in events if e.get("cat") == "Node" and e.get("name", "").endswith("_kernel_time")
                and any(r["ts"] <= e["ts"] <= r["ts"] + r["dur"] for r in timed)]
    per_op: dict[str, float] = {}
    for e in in_timed:
        per_op[e["args"]["op_name"]] = per_op.get(e["args"]["op_name"], 0.0) + e["dur"] / 1e6 / repeats
    node_total = sum(per_op.values()) or 1.0
    ranked = sorted(per_op.items(), key=lambda kv: -kv[1])
    families = {}
    for family, (kernels, counted) in FLOP_FAMILIES.items():
        seconds = sum(per_op.get(op, 0.0) for op in kernels)
        flops = sum((flops_by_op or {}).get(op, 0.0) for op in counted)
        families[family] = {"s": seconds, "share": seconds / node_total, "gflops": flops / seconds / 1e9 if seconds and flops else None}
    categories = {name: sum(per_op.get(op, 0.0) for op in ops) / node_total for name, ops in OP_CATEGORIES.items()}
    categories["other"] = max(0.0, 1.0 - sum(categories.values()))
    return {
        "step_s": step_s,
        "kernel_s": node_total,
        "threads": threads,
        "nodes": len({e["name"] for e in in_timed}),
        "ops": [{"op": op, "s": s, "share": s / node_total} for op, s in ranked[:top]],
        "families": families,
        "categories": categories,
        "layout_share": categories["layout"],
        "scaling": {"one_thread_s": scaling[1], "all_threads_s": scaling[threads], "speedup": scaling[1] / scaling[threads]},
    }


