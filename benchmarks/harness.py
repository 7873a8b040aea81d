"""Running the peers: what is measured (RunSpec), who is measured (Peer, Workload), and the processes that do it.

Every peer (ldm-rt on ONNX Runtime or OpenVINO, the PyTorch reference, diffusers, Optimum) runs in its own
process, started fresh for each run spec, so that its peak resident memory (VmHWM, read by the worker at its
end) and its cold start (harness clock before the process starts -> the peer's first image, imports included)
are its own. The processes stay alive and are asked for one call each in turn, so a load that drifts on a
shared machine hits every peer alike. A peer is any command that takes `--spec JSON` and speaks the line
protocol of peers/worker_common.py (its one owner); ldm-rt's own worker is peers/ours_worker.py. This process
imports numpy and onnxruntime only: torch peers are other interpreters.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ldm_rt.runtime.manifest import Manifest

from .flops import op_profile, unet_flops
from .machine import physical_cores
from .peers.worker_common import RESULT_PREFIX

log = logging.getLogger(__name__)

PEERS = Path(__file__).resolve().parent / "peers"
OURS = "ours"
# diffusers' pipeline classes the torch and Optimum peers run (a folder's model_index.json `_class_name`); Optimum's
# class is the same name with "ORT" in front.
SD_PIPELINE, SDXL_PIPELINE = "StableDiffusionPipeline", "StableDiffusionXLPipeline"
PIPELINE_PEER_LABELS = {"diffusers": "diffusers {pipeline} (PyTorch)", "optimum": "Optimum ORT{pipeline} (ONNX Runtime CPU)"}
# Peers in table order; the label says what runs.
PEER_LABELS = {
    OURS: "ldm-rt (ONNX Runtime CPU)",
    "ours-openvino": "ldm-rt (OpenVINO, bf16 where the CPU has it)",
    "ours-native": "ldm-rt native C++ (OpenVINO C++ API, no Python)",
    "ours-cuda": "ldm-rt (ONNX Runtime CUDA)",
    "ours-tensorrt": "ldm-rt (TensorRT FP16)",
    "reference": "ldm-rt reference (PyTorch eager)",
    **{name: label.format(pipeline=SD_PIPELINE) for name, label in PIPELINE_PEER_LABELS.items()},
    "openvino-genai": "OpenVINO GenAI Text2ImagePipeline (its default precision)",
    "openvino-genai-f32": "OpenVINO GenAI Text2ImagePipeline (f32)",
    "sdcpp": "stable-diffusion.cpp (f16 weights)",
}
F32 = "f32"  # the precision of every row that says no other (the worker's `precision` answer overrides it)
ALT_OURS = "ours-openvino"  # a second ldm-rt row the targets are also evaluated for


class BenchError(ValueError):
    """The benchmark cannot run as asked; the message names the cause and the fix."""


# ---- what is run ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class RunSpec:
    """One measured configuration: every peer generates exactly this."""

    height: int
    width: int
    batch: int = 1  # images per call (one prompt, `batch` images: diffusers' num_images_per_prompt)
    steps: int = 20
    guidance: float = 7.5  # classifier-free guidance: every peer batches [uncond, cond] into one UNet call
    scheduler: str = "ddim"  # DDIM with eta 0: deterministic, so the peers' images can be compared
    prompt: str = "a photo of an astronaut riding a horse on the moon"
    negative_prompt: str = ""
    seed: int = 0
    runs: int = 3  # N timed calls; the median is reported
    warmup: int = 1  # untimed calls first; the first of them is the cold-start image

    def __post_init__(self) -> None:
        if self.runs < 1 or self.warmup < 1:
            raise BenchError(f"runs and warmup must be >= 1 (got runs={self.runs}, warmup={self.warmup})")

    @property
    def title(self) -> str:
        return f"{self.width}x{self.height}, batch {self.batch}, {self.steps} steps"

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class Peer:
    """A competitor: the command that runs it (the spec is appended as --spec JSON) and the model it loads."""

    name: str
    argv: tuple[str, ...] = ()
    model: str = ""  # artifacts folder, model folder, diffusers folder or Optimum ONNX folder
    skip_reason: str | None = None  # set when it cannot run here; shown in the table instead of numbers
    extra: dict[str, Any] = field(default_factory=dict)  # peer-specific spec fields (backend, providers)
    # Why its image cannot be compared with ldm-rt's (it draws its own noise, tokenizes differently); None: compare.
    no_image_compare: str | None = None

    @property
    def label(self) -> str:
        if self.name in PIPELINE_PEER_LABELS:  # the class its worker runs: extra["pipeline"] (pipeline_extra)
            return PIPELINE_PEER_LABELS[self.name].format(pipeline=self.extra.get("pipeline", SD_PIPELINE))
        return PEER_LABELS.get(self.name, self.name)


def pipeline_extra(pipeline: str) -> dict[str, Any]:
    """Peer.extra of the diffusers and Optimum peers: the diffusers pipeline class their workers run (Optimum's
    is "ORT" + it), which their label names."""
    if pipeline not in (SD_PIPELINE, SDXL_PIPELINE):
        raise BenchError(f"pipeline {pipeline!r} is not one of {SD_PIPELINE}, {SDXL_PIPELINE}; the peer workers run only those")
    return {"pipeline": pipeline}


@dataclass(frozen=True)
class Workload:
    """One model measured at one or more run specs; `artifacts` is ldm-rt's build of it (the FLOP count and
    the noise shape come from its manifest)."""

    name: str
    description: str
    artifacts: Path | None
    runs: tuple[RunSpec, ...]
    peers: tuple[Peer, ...]
    config: dict[str, Any] = field(default_factory=dict)  # the model's configuration, printed with the results
    skip_reason: str | None = None
    # One peer process at a time (each started, measured and ended before the next): at full model size the
    # peers' processes together would not fit in memory. Drift between peers is then not cancelled.
    sequential: bool = False


def worker_argv(name: str, python: Path | str = sys.executable) -> tuple[str, ...]:
    """The command of the peer worker benchmarks/peers/<name>_worker.py under `python`."""
    return (str(python), str(PEERS / f"{name}_worker.py"))


WARM_CACHE = "warm"  # Peer.extra["compile_cache"]: a compile cache in the workload's work folder, filled before timing


def ours_peer(artifacts: Path | str, name: str = OURS, backend: str = "onnxruntime", providers: Sequence[str] | None = None) -> Peer:
    # Providers are onnxruntime's; the other backends take none.
    extra = {"backend": backend, "providers": (list(providers) if providers else ["cpu"]) if backend == "onnxruntime" else None}
    if backend == "onnxruntime":
        # As after ldm-rt's first run on a machine: large components open ONNX Runtime's optimised graphs from the
        # compile cache (runtime/backends/onnxruntime_backend.py; small ones are optimised at each start as before).
        extra["compile_cache"] = WARM_CACHE
    return Peer(name, worker_argv(OURS), str(artifacts), extra=extra)


def openvino_peer(artifacts: Path | str) -> Peer:
    """ldm-rt on its OpenVINO backend, where `ldm-rt[openvino]` is installed, at OpenVINO's best speed: bf16 where
    the CPU has it (`reduced_precision`; f32 elsewhere), so its images may differ from ours by a few levels."""
    import importlib.util

    reason = None if importlib.util.find_spec("openvino") else "OpenVINO is not installed: pip install 'ldm-rt[openvino]'"
    peer = ours_peer(artifacts, "ours-openvino", backend="openvino")
    # It starts as ldm-rt does after its first run on a machine: compiled graphs read from a warm cache.
    return dataclasses.replace(peer, extra={**peer.extra, "compile_cache": WARM_CACHE, "reduced_precision": True}, skip_reason=reason)


# OpenVINO GenAI at its two precisions: what a user gets (the CPU plugin's choice: bf16 where the CPU has it)
# and f32 asked for; each row reports the precision that ran.
OPENVINO_GENAI_PRECISIONS = {"openvino-genai": "default", "openvino-genai-f32": "f32"}
SDCPP_NO_IMAGE_COMPARE = "draws its own noise (no latents input), tokenizes with CLIP BPE, DDIM with trailing spacing"


def openvino_genai_peers(ir: Path | str | None, python: Path | str | None, reason: str | None) -> list[Peer]:
    """OpenVINO GenAI's Text2ImagePipeline (peers/openvino_genai_worker.py in its venv) on optimum-intel's IR."""
    why = reason or ("no OpenVINO export of this model" if ir is None else None)
    argv = worker_argv("openvino_genai", python) if python is not None else ()
    return [Peer(name, argv, str(ir or ""), skip_reason=why, extra={"precision": p}) for name, p in OPENVINO_GENAI_PRECISIONS.items()]


def sdcpp_peer(checkpoint: Path | str | None, python: Path | str | None, reason: str | None) -> Peer:
    """stable-diffusion.cpp (peers/sdcpp_worker.py in its venv) on the f16 single-file checkpoint."""
    why = reason or ("no single-file checkpoint of this model" if checkpoint is None else None)
    argv = worker_argv("sdcpp", python) if python is not None else ()
    return Peer("sdcpp", argv, str(checkpoint or ""), skip_reason=why, no_image_compare=SDCPP_NO_IMAGE_COMPARE)


def gpu_peers(artifacts: Path | str) -> list[Peer]:
    """ldm-rt on ONNX Runtime CUDA and on TensorRT: ready where a CUDA GPU is, marked not run elsewhere."""
    import onnxruntime as ort

    cuda = "CUDAExecutionProvider" in ort.get_available_providers()
    reason = None if cuda else "no CUDA GPU on this machine: not run (GPU protocol: 512x512, 50 DDIM steps, guidance 7.5, batch 1)"
    return [
        dataclasses.replace(ours_peer(artifacts, "ours-cuda", providers=["cuda"]), skip_reason=reason),
        dataclasses.replace(ours_peer(artifacts, "ours-tensorrt", backend="tensorrt"), skip_reason=reason),
    ]


# ---- running the peers -------------------------------------------------------------------------------------------
class PeerFailed(RuntimeError):
    """A peer process failed or stopped answering; the message says why and where its log is."""


class PeerProcess:
    """One live peer process: started once per run spec, asked for one call at a time (worker_common.serve)."""

    def __init__(self, peer: Peer, spec: dict[str, Any], log_path: Path, timeout: float) -> None:
        self.peer, self.log_path, self.timeout = peer, log_path, timeout
        self.log = open(log_path, "w")
        self.started = time.time()
        self.proc = subprocess.Popen([*peer.argv, "--spec", json.dumps(spec)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=self.log, text=True)

    def _read(self) -> dict[str, Any]:
        """The next protocol line; PeerFailed on a failure report, an early exit or a timeout (the process is killed)."""
        timer = threading.Timer(self.timeout, self.proc.kill)
        timer.start()
        try:
            for line in self.proc.stdout:
                if line.startswith(RESULT_PREFIX):
                    message = json.loads(line[len(RESULT_PREFIX):])
                    if message.get("status") == "failed":
                        raise PeerFailed(f"{message.get('error', 'failed')}; see {self.log_path}")
                    return message
        finally:
            timer.cancel()
        code = self.proc.wait()
        what = f"killed after {self.timeout:.0f} s without an answer" if code < 0 else f"exited with status {code}"
        raise PeerFailed(f"{what}; see {self.log_path}")

    def ready(self) -> dict[str, Any]:
        message = self._read()
        message["cold_start_s"] = message["first_image_at"] - self.started
        return message

    def ask(self, command: str) -> dict[str, Any]:
        try:
            self.proc.stdin.write(command + "\n")
            self.proc.stdin.flush()
        except BrokenPipeError:
            pass  # the read below reports how the process ended
        return self._read()

    def finish(self) -> dict[str, Any]:
        final = self.ask("exit")
        self.close()
        return final

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()


SETTLE_S = 0.25


def run_peers(peers: Sequence[Peer], specs: dict[str, dict[str, Any]], logs: dict[str, Path], warmup: int, runs: int,
              timeout: float, sequential: bool = False) -> dict[str, dict[str, Any]]:
    """All peers for one run spec, interleaved: each is started (one at a time, so cold starts do not overlap)
    and kept alive; then every warm-up and timed round asks each live peer for one call in turn. `sequential`:
    each peer's whole measurement ends (and its memory is freed) before the next starts."""
    if sequential:
        return {name: result for peer in peers for name, result in run_peers([peer], specs, logs, warmup, runs, timeout).items()}
    raw: dict[str, dict[str, Any]] = {}
    live: dict[str, PeerProcess] = {}
    for peer in peers:
        log.info("starting %s", peer.label)
        process = PeerProcess(peer, specs[peer.name], logs[peer.name], timeout)
        try:
            raw[peer.name] = {"status": "ok", **process.ready(), "runs": []}
            live[peer.name] = process
        except PeerFailed as e:
            raw[peer.name] = {"status": "failed", "error": str(e)}
            process.close()
    rounds = [("warmup", i) for i in range(warmup - 1)] + [("run", i) for i in range(runs)]
    for command, i in rounds:
        log.info("%s %d: %s", command, i + 1, ", ".join(live))
        for name, process in list(live.items()):
            # Let the previous peer's threads go idle first: ONNX Runtime's pools spin on after a call by
            # default, OpenMP's and TBB's briefly too, and would take the cores from the peer being timed.
            time.sleep(SETTLE_S)
            try:
                answer = process.ask(command)
            except PeerFailed as e:
                raw[name] = {"status": "failed", "error": str(e)}
                process.close()
                del live[name]
                continue
            if command == "run":
                raw[name]["runs"].append({k: v for k, v in answer.items() if k != "event"})
    for name, process in live.items():
        try:
            raw[name]["peak_rss_mb"] = process.finish().get("peak_rss_mb")
        except PeerFailed as e:
            raw[name] = {"status": "failed", "error": str(e)}
            process.close()
    return raw


def summarize(raw: dict[str, Any], batch: int) -> dict[str, Any]:
    """Medians over the timed runs: latency per call and per image, text encoder, UNet per step, VAE decoder."""
    runs = raw["runs"]
    steps = [s for r in runs for s in r["unet"]]
    latency = statistics.median(r["total"] for r in runs)
    return {
        "latency_s": latency,
        "latency_per_image_s": latency / batch,
        "text_encoder_s": statistics.median(r["text_encoder"] for r in runs),
        "unet_step_s": statistics.median(steps) if steps else None,
        # The fastest step: what the peer does when nothing else on the machine gets in its way.
        "unet_step_min_s": min(steps) if steps else None,
        "unet_calls_per_run": len(runs[0]["unet"]),
        "vae_decoder_s": statistics.median(r["vae_decoder"] for r in runs),
        "peak_rss_mb": raw.get("peak_rss_mb"),
        "cold_start_s": raw.get("cold_start_s"),
        "import_s": raw.get("import_s"),
        "load_s": raw.get("load_s"),
        "first_image_s": raw.get("first_image_s"),
        "threads": raw.get("threads"),
        "precision": raw.get("precision") or F32,  # what the worker says it computed in
        "versions": raw.get("versions", {}),
        "runs": runs,
    }


def add_ratios(peers: dict[str, dict[str, Any]]) -> None:
    """Each ok peer's value / ldm-rt's (> 1: ldm-rt is faster or smaller). Latency and UNet step are the
    median over rounds of the ratio within a round (both measured back to back), which cancels a load that
    drifts between rounds; peak RSS and cold start are single measurements."""
    add_same_precision_ratios(peers)
    ours = peers.get(OURS, {})
    if ours.get("status") != "ok":
        return
    for result in peers.values():
        if result.get("status") != "ok":
            continue
        pairs = list(zip(result["runs"], ours["runs"]))
        step = lambda r: statistics.median(r["unet"]) if r["unet"] else None  # noqa: E731
        result["vs_ours"] = {
            "latency": statistics.median(a["total"] / b["total"] for a, b in pairs) if pairs else None,
            "unet_step": statistics.median(step(a) / step(b) for a, b in pairs) if pairs and step(pairs[0][1]) else None,
            "unet_step_best": _over(result.get("unet_step_min_s"), ours.get("unet_step_min_s")),
            "peak_rss": _over(result.get("peak_rss_mb"), ours.get("peak_rss_mb")),
            "cold_start": _over(result.get("cold_start_s"), ours.get("cold_start_s")),
        }


def same_precision_baseline(peers: dict[str, dict[str, Any]], precision: str) -> str | None:
    """The ldm-rt row a peer at `precision` is compared with: ldm-rt's own row at that precision (ONNX Runtime's
    first, then the other ldm-rt backends in table order), or None when ldm-rt has no ok row at it."""
    for name, result in peers.items():
        if name.startswith(OURS) and result.get("status") == "ok" and result.get("precision", F32) == precision:
            return name
    return None


def add_same_precision_ratios(peers: dict[str, dict[str, Any]]) -> None:
    """`vs_same_precision` of every ok peer that is not ldm-rt: its value / the same-precision ldm-rt row's
    (f32 with f32, bf16 with bf16), latency as the median of per-round ratios, like `vs_ours`."""
    for name, result in peers.items():
        if name.startswith(OURS) or result.get("status") != "ok":
            continue
        base_name = same_precision_baseline(peers, result.get("precision", F32))
        if base_name is None:
            continue
        base = peers[base_name]
        pairs = list(zip(result["runs"], base["runs"]))
        result["vs_same_precision"] = {
            "baseline": base_name,
            "latency": statistics.median(a["total"] / b["total"] for a, b in pairs) if pairs else None,
            "peak_rss": _over(result.get("peak_rss_mb"), base.get("peak_rss_mb")),
            "cold_start": _over(result.get("cold_start_s"), base.get("cold_start_s")),
        }


def _over(a: float | None, b: float | None) -> float | None:
    return a / b if a and b else None


def image_difference(ours_file: Path, peer_file: Path) -> dict[str, float] | None:
    """Mean and max |difference| of the first images in 8-bit levels: the peers computed the same thing."""
    if not (ours_file.is_file() and peer_file.is_file()):
        return None
    a, b = np.load(ours_file).astype(np.int16), np.load(peer_file).astype(np.int16)
    if a.shape != b.shape:
        return {"mean_abs": float("nan"), "max_abs": float("nan")}
    d = np.abs(a - b)
    return {"mean_abs": float(d.mean()), "max_abs": float(d.max())}


def warm_compile_cache(peer: Peer, folder: Path) -> Path:
    """Open the peer's pipeline once in this process so `folder` holds its compiled graphs before any timing."""
    from ldm_rt.runtime.pipeline import Pipeline

    Pipeline.load(peer.model, backend=peer.extra["backend"], providers=peer.extra["providers"], compile_cache=folder,
                  reduced_precision=peer.extra.get("reduced_precision", False))  # the same settings, so the same cache keys
    return folder


def run_workload(workload: Workload, out_dir: Path, timeout: float, profile: bool) -> dict[str, Any]:
    """All peers on every run spec of one workload: fresh processes per spec, calls interleaved across peers."""
    entry: dict[str, Any] = {"name": workload.name, "description": workload.description, "config": workload.config, "runs": []}
    if workload.skip_reason is not None:
        entry["skipped"] = workload.skip_reason
        log.warning("workload %s skipped: %s", workload.name, workload.skip_reason)
        return entry
    facts = Manifest.read(workload.artifacts).facts
    work = out_dir / "work" / workload.name
    work.mkdir(parents=True, exist_ok=True)
    threads = physical_cores()
    f = facts.latent_factor
    runnable = [p for p in workload.peers if p.skip_reason is None]
    # Once per workload: the compiled graphs keep their dynamic shapes, so every run spec reads the same cache.
    caches = {p.name: str(warm_compile_cache(p, work / "compile_cache")) for p in runnable if p.extra.get("compile_cache") == WARM_CACHE}
    for spec in workload.runs:
        tag = f"{spec.width}x{spec.height}_b{spec.batch}"
        log.info("%s %s", workload.name, spec.title)
        noise = np.random.default_rng(spec.seed).standard_normal((spec.batch, facts.latent_channels, spec.height // f, spec.width // f), dtype=np.float32)
        noise_file = work / f"noise_{tag}.npy"
        np.save(noise_file, noise)
        rows = spec.batch * (2 if spec.guidance != 1.0 and facts.context_length is not None else 1)
        flops = unet_flops(workload.artifacts, rows, spec.height // f, spec.width // f)
        run: dict[str, Any] = {"spec": spec.to_dict(), "title": spec.title, "unet_rows": rows, "unet_flops": flops["total"],
                               "unet_flops_by_op": flops["by_op"], "peers": {}}
        specs = {p.name: {**spec.to_dict(), "model": p.model, "threads": threads, "noise_file": str(noise_file),
                          "image_out": str(work / f"image_{tag}_{p.name}.npy"), **p.extra} for p in runnable}
        for name, cache in caches.items():
            specs[name]["compile_cache"] = cache
        raw = run_peers(runnable, specs, {p.name: work / f"{tag}_{p.name}.log" for p in runnable}, spec.warmup, spec.runs, timeout,
                        workload.sequential)
        for peer in workload.peers:
            if peer.skip_reason is not None:
                run["peers"][peer.name] = {"status": "skipped", "label": peer.label, "reason": peer.skip_reason}
                continue
            result: dict[str, Any] = {"status": raw[peer.name]["status"], "label": peer.label, "model": peer.model}
            if result["status"] == "ok":
                result.update(summarize(raw[peer.name], spec.batch))
                if result["unet_step_s"]:
                    result["unet_gflops"] = flops["total"] / result["unet_step_s"] / 1e9  # share of the peak: run_benchmark
                if peer.no_image_compare is not None:
                    result["image_vs_ours_skipped"] = peer.no_image_compare
                elif peer.name != OURS:
                    result["image_vs_ours"] = image_difference(work / f"image_{tag}_{OURS}.npy", work / f"image_{tag}_{peer.name}.npy")
            else:
                result["error"] = raw[peer.name]["error"]
                log.warning("%s failed: %s", peer.label, result["error"])
            run["peers"][peer.name] = result
        add_ratios(run["peers"])
        if profile and run["peers"].get(OURS, {}).get("status") == "ok":
            run["ours_profile"] = op_profile(workload.artifacts, rows, spec.height // f, spec.width // f, flops["by_op"])
        entry["runs"].append(run)
    return entry

