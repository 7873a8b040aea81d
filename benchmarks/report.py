"""The benchmark report: `run_benchmark` measures every workload into one JSON-able dict, `write_report` writes
it with its two renderings, the full tables (`render_markdown`) and the README's performance section
(`render_readme_section`)."""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from ldm_rt.runtime.atomic import atomic_write_text

from .harness import Workload, run_workload
from .machine import install_footprint, machine_info, matmul_peak
from .targets import evaluate_issue21, evaluate_targets

log = logging.getLogger(__name__)

SCHEMA = "ldm-rt-bench/1"


def run_benchmark(workloads: Sequence[Workload], out_dir: Path, *, timeout: float = 3600.0, profile: bool = True,
                  footprint: dict[str, Any] | None = None, notes: Sequence[str] = (), matmul_n: int = 2048) -> dict[str, Any]:
    """Measure every workload; returns the report (write it with `write_report`)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    load_start = os.getloadavg()
    started = datetime.now(timezone.utc)
    peak = matmul_peak(matmul_n)
    log.info("matmul peak %.1f GFLOP/s", peak["gflops"])
    entries = [run_workload(w, out_dir, timeout, profile) for w in workloads]
    peak_after = matmul_peak(matmul_n)
    # The roofline is what the machine can do: the better of the two measurements (load lowers either).
    roofline = max(peak["gflops"], peak_after["gflops"])
    for entry in entries:
        for run in entry.get("runs", []):
            for result in run["peers"].values():
                if result.get("unet_gflops") is not None:
                    result["peak_fraction"] = result["unet_gflops"] / roofline
    report = {
        "schema": SCHEMA,
        "created": started.isoformat(timespec="seconds"),
        "duration_s": (datetime.now(timezone.utc) - started).total_seconds(),
        "machine": {**machine_info(), "load_average_start": load_start, "load_average_end": os.getloadavg()},
        "matmul_peak": {**peak, "gflops_at_end": peak_after["gflops"], "roofline_gflops": roofline},
        "footprint": footprint if footprint is not None else install_footprint(),
        "workloads": entries,
        "notes": list(notes),
    }
    report["targets"] = evaluate_targets(report)
    report["targets_issue21"] = evaluate_issue21(report)
    return report


def write_report(report: dict[str, Any], results_dir: Path, name: str = "latest") -> dict[str, Path]:
    """<name>.json, <name>.md (the full tables) and <name>.readme.md (the README's performance section)."""
    results_dir.mkdir(parents=True, exist_ok=True)
    paths = {"json": results_dir / f"{name}.json", "markdown": results_dir / f"{name}.md", "readme": results_dir / f"{name}.readme.md"}
    atomic_write_text(paths["json"], json.dumps(report, indent=2) + "\n")
    atomic_write_text(paths["markdown"], render_markdown(report))
    atomic_write_text(paths["readme"], render_readme_section(report))
    return paths


def _num(value: float | None, fmt: str = "{:.2f}", scale: float = 1.0) -> str:
    return "–" if value is None else fmt.format(value * scale)


def _ratio(result: dict[str, Any], key: str) -> str:
    value = result.get("vs_ours", {}).get(key)
    return "–" if value is None else f"{value:.2f}x"


def machine_line(report: dict[str, Any]) -> str:
    m = report["machine"]
    v = m["versions"]
    load = f"load average {m['load_average_start'][0]:.1f} at start, {m['load_average_end'][0]:.1f} at end"
    soft = ", ".join(f"{k} {v[k]}" for k in ("python", "numpy", "onnxruntime", "torch", "diffusers") if v.get(k))
    return (f"{m['cpu']} ({', '.join(m['cpu_flags']) or 'no AVX2'}), {m['physical_cores']} physical / {m['logical_cores']} logical cores, "
            f"{_num(m['ram_gib'], '{:.1f}')} GiB RAM; {load}; {soft}")


def peak_line(report: dict[str, Any]) -> str:
    p = report["matmul_peak"]
    return (f"matmul peak (numpy float32 {p['n']}x{p['n']}, best of {p['repeats']}, all cores): {p['gflops']:.1f} GFLOP/s "
            f"at start, {p['gflops_at_end']:.1f} at end; \"% of peak\" is of the better one")


def _same_precision(result: dict[str, Any], key: str = "latency") -> str:
    """peer / the ldm-rt row of the same precision, naming that row's precision (f32 with f32, bf16 with bf16)."""
    same = result.get("vs_same_precision") or {}
    value = same.get(key)
    return "–" if value is None else f"{value:.2f}x ({result.get('precision', 'f32')})"


def _image_diff(result: dict[str, Any]) -> str:
    if result.get("image_vs_ours_skipped"):
        return f"not compared: {result['image_vs_ours_skipped']}"
    diff = result.get("image_vs_ours")
    return "–" if not diff else f"{diff['mean_abs']:.2f} / {diff['max_abs']:.0f}"


def _run_table(run: dict[str, Any]) -> list[str]:
    head = ("| peer | precision | latency / image (s) | vs ldm-rt | vs ldm-rt, same precision | text enc (ms) | UNet / step (ms), median (fastest) | fastest step vs ldm-rt "
            "| VAE dec (ms) | peak RSS (MB) | vs ldm-rt | cold start (s) | vs ldm-rt | UNet GFLOP/s | % of peak "
            "| image Δ vs ldm-rt (mean / max, 8-bit) |")
    columns = head.count(" | ") + 1
    lines = [head, "|" + " --- |" * columns]
    for result in run["peers"].values():
        if result["status"] != "ok":
            why = result.get("reason") or result.get("error", "failed")
            lines.append(f"| {result['label']} | {result['status']}: {why} |" + " |" * (columns - 2))
            continue
        diff_text = _image_diff(result)
        lines.append(
            f"| {result['label']} | {result.get('precision', 'f32')} | {_num(result['latency_per_image_s'], '{:.3f}')} | {_ratio(result, 'latency')} "
            f"| {_same_precision(result)} "
            f"| {_num(result['text_encoder_s'], '{:.1f}', 1e3)} | {_num(result['unet_step_s'], '{:.1f}', 1e3)} "
            f"({_num(result.get('unet_step_min_s'), '{:.1f}', 1e3)}) | {_ratio(result, 'unet_step_best')} "
            f"| {_num(result['vae_decoder_s'], '{:.1f}', 1e3)} | {_num(result['peak_rss_mb'], '{:.0f}')} | {_ratio(result, 'peak_rss')} "
            f"| {_num(result['cold_start_s'], '{:.2f}')} | {_ratio(result, 'cold_start')} | {_num(result.get('unet_gflops'), '{:.1f}')} "
            f"| {_num(result.get('peak_fraction'), '{:.0f}%', 100)} | {diff_text} |"
        )
    return lines


def _spread_line(run: dict[str, Any]) -> str:
    """Peers whose UNet steps varied more than 3x within the run: contention with other work on the machine."""
    spread = []
    for result in run["peers"].values():
        steps = [s for r in result.get("runs", []) for s in r["unet"]]
        if steps and max(steps) > 3 * min(steps):
            spread.append(f"{result['label']} {min(steps) * 1e3:.0f}-{max(steps) * 1e3:.0f} ms")
    if not spread:
        return ""
    return ("UNet step times spread more than 3x within this run (other processes competing for the cores): "
            + "; ".join(spread) + ". The fastest step is what each does when it has the cores to itself.")


def _profile_lines(profile: dict[str, Any]) -> list[str]:
    ops = ", ".join(f"{o['op']} {o['share']:.0%}" for o in profile["ops"])
    fams = "; ".join(f"{name} kernels {f['share']:.0%} of kernel time at {_num(f['gflops'], '{:.1f}')} GFLOP/s"
                     for name, f in profile.get("families", {}).items())
    line = (f"ldm-rt UNet profile (ONNX Runtime profiler, {profile['threads']} intra-op threads, {profile['step_s'] * 1e3:.1f} ms/call): "
            f"{ops}; layout conversions (Reorder*) {profile['layout_share']:.0%}. {fams}.")
    if profile.get("categories"):
        line += " By kind: " + ", ".join(f"{k} {v:.0%}" for k, v in profile["categories"].items()) + "."
    if profile.get("scaling"):
        sc = profile["scaling"]
        line += (f" Without the profiler: {sc['one_thread_s'] * 1e3:.1f} ms/call on 1 thread, {sc['all_threads_s'] * 1e3:.1f} on "
                 f"{profile['threads']} ({sc['speedup']:.2f}x).")
    return [line]


def _where_time_goes(report: dict[str, Any]) -> list[str]:
    """One row per run with an ldm-rt profile: the UNet step's time by kind of op, its kernels' GFLOP/s, thread scaling."""
    rows = [(w, run) for w in report["workloads"] for run in w.get("runs", []) if run.get("ours_profile", {}).get("categories")]
    if not rows:
        return []
    kinds = list(rows[0][1]["ours_profile"]["categories"])
    threads = rows[0][1]["ours_profile"]["threads"]
    lines = [f"Where ldm-rt's UNet step goes (ONNX Runtime CPU provider; share of kernel time by the profiler; step times without it):", "",
             f"| workload | run | ms / step, 1 thread | {threads} threads | speed-up | " + " | ".join(kinds) + " | Conv GFLOP/s | MatMul GFLOP/s |",
             "| --- | --- | --- | --- | --- | " + " | ".join("---" for _ in kinds) + " | --- | --- |"]
    for w, run in rows:
        prof = run["ours_profile"]
        sc, fam = prof["scaling"], prof.get("families", {})
        lines.append(f"| {w['name']} | {run['title']} | {sc['one_thread_s'] * 1e3:.1f} | {sc['all_threads_s'] * 1e3:.1f} | {sc['speedup']:.2f}x | "
                     + " | ".join(f"{prof['categories'][k]:.0%}" for k in kinds)
                     + f" | {_num(fam.get('Conv', {}).get('gflops'), '{:.0f}')} | {_num(fam.get('MatMul', {}).get('gflops'), '{:.0f}')} |")
    return lines + [""]


def issue21_lines(report: dict[str, Any]) -> list[str]:
    """Issue 21's targets (SD 1.5-sized workload), each met / missed / not measured with its numbers."""
    targets = report.get("targets_issue21") or []
    if not targets:
        return ["Issue 21's targets (SD 1.5-sized workload, `--sd15`): not measured in this run.", ""]
    lines = ["| target (issue 21, SD 1.5-sized) | worst ratio | measured (peer vs ldm-rt) | met |", "| --- | --- | --- | --- |"]
    for t in targets:
        if t["worst"] is None:
            lines.append(f"| {t['target']} | – | not measured: {t['missing']} | – |")
        else:
            lines.append(f"| {t['target']} | {t['worst']:.2f}x | {'; '.join(t['numbers'])} | {'yes' if t['met'] else 'no'} |")
    return lines + [""]


def render_markdown(report: dict[str, Any]) -> str:
    s = next((w["runs"][0]["spec"] for w in report["workloads"] if w.get("runs")), None)
    lines = [f"# ldm-rt benchmark, {report['created']}", "", f"Machine: {machine_line(report)}.", "", f"Roofline: {peak_line(report)}.", ""]
    if s is not None:
        lines += [f"Protocol: prompt \"{s['prompt']}\", negative \"{s['negative_prompt']}\", {s['scheduler'].upper()} (eta 0), guidance {s['guidance']}, "
                  f"the same initial noise for every peer; median of {s['runs']} timed calls after {s['warmup']} warm-up "
                  "(the first warm-up is the cold-start image). Every peer runs in its own fresh process per table, all kept "
                  "alive and asked for one call each in turn, so load changes hit every peer alike. Ratios are peer / ldm-rt "
                  "(> 1: ldm-rt is faster or smaller); latency and UNet-step ratios are the median of the per-round ratios.", ""]
    for w in report["workloads"]:
        lines += [f"## {w['name']}", "", w["description"], ""]
        if w.get("skipped"):
            lines += [f"Skipped: {w['skipped']}", ""]
            continue
        if w.get("config"):
            lines += ["```json", json.dumps(w["config"], indent=None, sort_keys=True), "```", ""]
        for run in w["runs"]:
            gflop = run["unet_flops"] / 1e9
            lines += [f"### {run['title']} (UNet: {gflop:.2f} GFLOP per call of {run['unet_rows']} rows)", ""]
            lines += _run_table(run) + [""]
            spread = _spread_line(run)
            if spread:
                lines += [spread, ""]
            if run.get("ours_profile"):
                lines += _profile_lines(run["ours_profile"]) + [""]
    lines += ["## Install footprint", "", "| install | packages | size (MB) | torch | largest (MB) |", "| --- | --- | --- | --- | --- |"]
    for label, f in report["footprint"].items():
        largest = ", ".join(f"{k} {v:.0f}" for k, v in f.get("largest_mb", {}).items())
        lines.append(f"| {label} | {f['packages']} | {_num(f['mb'], '{:.0f}')} | {'yes' if f['has_torch'] else 'no'} | {largest} |")
    lines += ["", "## Targets (issue 7, CPU)", "", "| target | worst measured | met |", "| --- | --- | --- |"]
    for t in report["targets"]:
        shown = f"{t['worst']:.0%}" if t["key"] == "roofline" else f"{t['worst']:.2f}x"
        lines.append(f"| {t['target']} | {shown} | {'yes' if t['met'] else 'no'} |")
    lines += ["", "## Targets (issue 21, CPU runtimes)", ""] + issue21_lines(report)
    for n in report.get("notes", []):
        lines += ["", n]
    return "\n".join(lines) + "\n"


def render_readme_section(report: dict[str, Any]) -> str:
    """The README's performance section: one compact table per workload, the machine, the targets."""
    peak = peak_line(report)
    s = next((w["runs"][0]["spec"] for w in report["workloads"] if w.get("runs")), None)
    protocol = "" if s is None else (
        f"Same weights, prompt, {s['scheduler'].upper()} (eta 0), {s['steps']} steps, guidance {s['guidance']} and initial noise for "
        f"every peer; median of {s['runs']} timed calls, interleaved across peers; \"vs ldm-rt\" is peer / ldm-rt (> 1: ldm-rt is faster). ")
    lines = ["## Performance", "", f"Measured by `python benchmarks/run.py` on {report['created'][:10]}: {machine_line(report)}. "
             f"{peak[0].upper() + peak[1:]}. {protocol}Full tables, per-stage times and the JSON: `benchmarks/results/`.", ""]
    for w in report["workloads"]:
        if w.get("skipped"):
            lines += [f"**{w['name']}**: not measured ({w['skipped']}).", ""]
            continue
        lines += [f"**{w['name']}**: {w['description']}", "",
                  "| run | peer | precision | s / image | vs ldm-rt | vs ldm-rt, same precision | UNet ms / step, median (fastest) | fastest step vs ldm-rt "
                  "| peak RSS MB | cold start s | UNet % of peak |",
                  "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
        for run in w["runs"]:
            for result in run["peers"].values():
                if result["status"] != "ok":
                    continue
                lines.append(
                    f"| {run['title']} | {result['label']} | {result.get('precision', 'f32')} | {_num(result['latency_per_image_s'], '{:.3f}')} "
                    f"| {_ratio(result, 'latency')} | {_same_precision(result)} "
                    f"| {_num(result['unet_step_s'], '{:.1f}', 1e3)} ({_num(result.get('unet_step_min_s'), '{:.1f}', 1e3)}) "
                    f"| {_ratio(result, 'unet_step_best')} | {_num(result['peak_rss_mb'], '{:.0f}')} "
                    f"| {_num(result['cold_start_s'], '{:.2f}')} | {_num(result.get('peak_fraction'), '{:.0f}%', 100)} |"
                )
        lines.append("")
    lines += _where_time_goes(report)
    foot = "; ".join(f"{label}: {_num(f['mb'], '{:.0f}')} MB" for label, f in report["footprint"].items())
    lines += [f"Install footprint (installed files of each setup's packages): {foot}.", ""]
    missed = [t for t in report["targets"] if not t["met"]]
    met = [t for t in report["targets"] if t["met"]]
    if met:
        lines.append("Targets met: " + "; ".join(t["target"] for t in met) + ".")
    if missed:
        shown = lambda t: f"{t['worst']:.0%}" if t["key"] == "roofline" else f"{t['worst']:.2f}x"  # noqa: E731
        lines.append("Targets missed: " + "; ".join(f"{t['target']} (worst {shown(t)})" for t in missed) + ".")
    lines += [""] + issue21_lines(report)
    for n in report.get("notes", []):
        lines += ["", n]
    return "\n".join(lines) + "\n"


