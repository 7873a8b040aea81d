"""Issue 7's CPU targets, checked against a benchmark report: each at its worst over every run."""

from __future__ import annotations

from typing import Any

from .harness import ALT_OURS, OURS, PEER_LABELS

# Minimum ratio peer / ours for latency and cold start; UNet share of the matmul peak.
TARGETS = {"latency": {"reference": 2.0, "diffusers": 2.0, "optimum": 1.3}, "cold_start": {"reference": 5.0, "diffusers": 5.0}, "peak_fraction": 0.5}


def evaluate_targets(report: dict[str, Any]) -> list[dict[str, Any]]:
    """Issue 7's CPU targets, each at its worst over every run where both sides ran."""
    checks: dict[str, dict[str, Any]] = {}

    def note(key: str, text: str, value: float | None, goal: float, higher_is_better: bool = True) -> None:
        if value is None:
            return
        c = checks.setdefault(key, {"target": text, "worst": value, "goal": goal})
        c["worst"] = min(c["worst"], value) if higher_is_better else max(c["worst"], value)
        c["met"] = c["worst"] >= goal if higher_is_better else c["worst"] <= goal

    for w in report["workloads"]:
        for run in w.get("runs", []):
            peers = run["peers"]
            ours = peers.get(OURS, {})
            if ours.get("status") != "ok":
                continue
            for name, goal in TARGETS["latency"].items():
                ratio = peers.get(name, {}).get("vs_ours", {}).get("latency")
                note(f"latency_{name}", f"ldm-rt >= {goal}x faster end-to-end than {PEER_LABELS[name]}", ratio, goal)
            for name, goal in TARGETS["cold_start"].items():
                ratio = peers.get(name, {}).get("vs_ours", {}).get("cold_start")
                note(f"cold_{name}", f"cold start >= {goal}x faster than {PEER_LABELS[name]}", ratio, goal)
            others = [p.get("vs_ours", {}).get("peak_rss") for n, p in peers.items() if not n.startswith("ours") and p.get("status") == "ok"]
            if others and all(r is not None for r in others):
                note("memory", "lower peak memory than every peer (min peer / ldm-rt > 1)", min(others), 1.0 + 1e-9)
            # The same targets for ldm-rt on OpenVINO: peer / ours-openvino = (peer / ours) / (ours-openvino / ours).
            alt = peers.get(ALT_OURS, {})
            if alt.get("status") == "ok":
                for kind, goals, text in (("latency", TARGETS["latency"], "faster end-to-end than"), ("cold_start", TARGETS["cold_start"], "faster cold start than")):
                    for name, goal in goals.items():
                        ratio, own = peers.get(name, {}).get("vs_ours", {}).get(kind), alt.get("vs_ours", {}).get(kind)
                        if ratio is not None and own:
                            note(f"{kind}_{name}_{ALT_OURS}", f"{PEER_LABELS[ALT_OURS]} >= {goal}x {text} {PEER_LABELS[name]}", ratio / own, goal)
            if w.get("config", {}).get("sd_shaped"):
                note("roofline", f"UNet step >= {TARGETS['peak_fraction']:.0%} of the matmul peak (SD-shaped workload)", ours.get("peak_fraction"), TARGETS["peak_fraction"])
    return [{"key": k, **v} for k, v in checks.items()]


