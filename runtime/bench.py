"""`ldm-rt bench`: ldm-rt against the pipelines users would pick instead, side by side in one run.

Every peer (ldm-rt on ONNX Runtime, the PyTorch reference, diffusers, Optimum) runs in its own process,
started fresh for each run spec, so that its peak resident memory (VmHWM, read by the worker at its end) and
its cold start (harness clock before the process starts -> the peer's first image, imports included) are
its own. The processes stay alive and are asked for one call each in turn, so a load that drifts on a
shared machine hits every peer alike. A peer is any command that takes `--spec JSON` and speaks the
line protocol of benchmarks/peers/worker_common.py (`serve` below is ldm-rt's side of it, run as
`python -m ldm_rt.runtime.bench worker`). This process imports numpy and onnxruntime only: torch peers are
other interpreters.

Measured per peer and run: end-to-end latency (median of N timed calls after warm-up) per image, per-stage
latency (text encoder per call, UNet per step, VAE decoder per call), peak RSS, cold start, and each as a
ratio peer / ldm-rt (> 1: ldm-rt is faster or smaller). In the same run: the machine's float32 matmul peak
(numpy, best of several: the roofline), the UNet's FLOPs per step (counted from the exported graph's Conv,
MatMul and Gemm shapes as ONNX Runtime's profiler records them), GFLOP/s of every peer's UNet step and its
share of the peak, and where ldm-rt's UNet time goes (ONNX Runtime profiler, time per op type).
"""

from __future__ import annotations

import time

T_START = time.perf_counter()  # before the heavy imports: the worker reports its import time from here

import argparse  # noqa: E402
import dataclasses  # noqa: E402
import importlib.metadata  # noqa: E402
import json  # noqa: E402
import logging  # noqa: E402
import os  # noqa: E402
import platform  # noqa: E402
import re  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import threading  # noqa: E402
from collections.abc import Callable, Sequence  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402
from datetime import datetime, timezone  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import numpy as np  # noqa: E402

log = logging.getLogger(__name__)

SCHEMA = "ldm-rt-bench/1"
RESULT_PREFIX = "LDMRT_BENCH "  # the last stdout line of a worker: this prefix, then its JSON result
OURS = "ours"
# Peers in table order; the label says what runs.
PEER_LABELS = {
    OURS: "ldm-rt (ONNX Runtime CPU)",
    "ours-openvino": "ldm-rt (OpenVINO, bf16 where the CPU has it)",
    "ours-cuda": "ldm-rt (ONNX Runtime CUDA)",
    "ours-tensorrt": "ldm-rt (TensorRT FP16)",
    "reference": "ldm-rt reference (PyTorch eager)",
    "diffusers": "diffusers StableDiffusionPipeline (PyTorch)",
    "optimum": "Optimum ORTStableDiffusionPipeline (ONNX Runtime CPU)",
}
TORCH_PEERS = ("reference", "diffusers")
ALT_OURS = "ours-openvino"  # a second ldm-rt row the targets are also evaluated for
# Ops whose multiply-adds are counted; everything else (norms, softmax, elementwise) is memory-bound and
# small next to them in a UNet.
FLOP_OPS = ("Conv", "ConvTranspose", "MatMul", "Gemm")
# The GPU protocol ONNX Runtime and NVIDIA publish numbers with (not runnable on a machine without CUDA).
GPU_PROTOCOL = {"height": 512, "width": 512, "steps": 50, "guidance": 7.5, "batch": 1, "scheduler": "ddim"}
# Targets of issue 7 (CPU): minimum ratio peer / ours for latency and cold start; UNet share of matmul peak.
TARGETS = {"latency": {"reference": 2.0, "diffusers": 2.0, "optimum": 1.3}, "cold_start": {"reference": 5.0, "diffusers": 5.0}, "peak_fraction": 0.5}


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

    @property
    def label(self) -> str:
        return PEER_LABELS.get(self.name, self.name)


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


def ours_peer(artifacts: Path | str, name: str = OURS, backend: str = "onnxruntime", providers: Sequence[str] | None = None) -> Peer:
    # Providers are onnxruntime's; the other backends take none.
    extra = {"backend": backend, "providers": (list(providers) if providers else ["cpu"]) if backend == "onnxruntime" else None}
    return Peer(name, (sys.executable, "-m", "ldm_rt.runtime.bench", "worker"), str(artifacts), extra=extra)


WARM_CACHE = "warm"  # Peer.extra["compile_cache"]: a compile cache in the workload's work folder, filled before timing


def openvino_peer(artifacts: Path | str) -> Peer:
    """ldm-rt on its OpenVINO backend, where `ldm-rt[openvino]` is installed, at OpenVINO's best speed: bf16 where
    the CPU has it (`reduced_precision`; f32 elsewhere), so its images may differ from ours by a few levels."""
    import importlib.util

    reason = None if importlib.util.find_spec("openvino") else "OpenVINO is not installed: pip install 'ldm-rt[openvino]'"
    peer = ours_peer(artifacts, "ours-openvino", backend="openvino")
    # It starts as ldm-rt does after its first run on a machine: compiled graphs read from a warm cache.
    return dataclasses.replace(peer, extra={**peer.extra, "compile_cache": WARM_CACHE, "reduced_precision": True}, skip_reason=reason)


def gpu_peers(artifacts: Path | str) -> list[Peer]:
    """ldm-rt on ONNX Runtime CUDA and on TensorRT: ready where a CUDA GPU is, marked not run elsewhere."""
    import onnxruntime as ort

    cuda = "CUDAExecutionProvider" in ort.get_available_providers()
    reason = None if cuda else "no CUDA GPU on this machine: not run (GPU protocol: 512x512, 50 DDIM steps, guidance 7.5, batch 1)"
    return [
        dataclasses.replace(ours_peer(artifacts, "ours-cuda", providers=["cuda"]), skip_reason=reason),
        dataclasses.replace(ours_peer(artifacts, "ours-tensorrt", backend="tensorrt"), skip_reason=reason),
    ]


def peer_scripts_dir() -> Path | None:
    """benchmarks/peers of the source checkout this runtime is installed from (editable installs), if any."""
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "peers"
    return path if (path / "worker_common.py").is_file() else None


# ---- ldm-rt's own worker -----------------------------------------------------------------------------------
def emit(message: dict[str, Any]) -> None:
    print(RESULT_PREFIX + json.dumps(message), flush=True)


def serve(generate: Callable[[], tuple[np.ndarray, dict[str, Any]]], save_first: Callable[[np.ndarray], None], info: dict[str, Any]) -> None:
    """The worker side of the protocol (the same as benchmarks/peers/worker_common.py): the first image, a
    "ready" line, then one answer per stdin command (warmup | run | exit), a "final" line last."""
    t0 = time.perf_counter()
    images, _ = generate()
    first_image_s = time.perf_counter() - t0
    emit({"event": "ready", "first_image_s": first_image_s, "first_image_at": time.time(), **info})
    save_first(images)
    for line in sys.stdin:
        command = line.strip()
        if command == "exit":
            break
        t0 = time.perf_counter()
        _, stages = generate()
        total = time.perf_counter() - t0
        emit({"event": "run", "total": total, **stages} if command == "run" else {"event": "done"})
    emit({"event": "final", "status": "ok", "peak_rss_mb": peak_rss_mb()})


def ours_worker(spec: dict[str, Any]) -> None:
    """Load the artifacts and serve the harness; stage times come from Result.timings."""
    from .backends.base import physical_cores
    from .pipeline import Pipeline

    import_s = time.perf_counter() - T_START
    t0 = time.perf_counter()
    pipe = Pipeline.load(spec["model"], backend=spec.get("backend", "onnxruntime"), providers=spec.get("providers"),
                         compile_cache=spec.get("compile_cache") or False,  # never the user's cache folder
                         reduced_precision=spec.get("reduced_precision", False))
    load_s = time.perf_counter() - t0
    latents = np.load(spec["noise_file"]) if spec.get("noise_file") else None

    def generate() -> tuple[np.ndarray, dict[str, Any]]:
        r = pipe.generate(
            spec["prompt"], negative_prompt=spec["negative_prompt"], steps=spec["steps"], guidance=spec["guidance"],
            scheduler=spec["scheduler"], seed=spec["seed"], batch=spec["batch"], height=spec["height"],
            width=spec["width"], latents=latents,
        )
        return r.images, {"text_encoder": r.timings.get("text_encoder", 0.0), "unet": list(r.timings["unet"]), "vae_decoder": r.timings["vae_decoder"]}

    def save_first(images: np.ndarray) -> None:
        if spec.get("image_out"):
            np.save(spec["image_out"], images, allow_pickle=False)

    versions = {"onnxruntime": _version("onnxruntime"), "numpy": np.__version__, "ldm-rt": _version("ldm-rt")}
    serve(generate, save_first, {"import_s": import_s, "load_s": load_s, "threads": physical_cores(), "versions": versions})


def peak_rss_mb() -> float | None:
    """This process's peak resident set (VmHWM, Linux), read at the end of a worker. The parent's ru_maxrss
    from wait4 would not do: Linux carries the forked pre-exec image's high-water mark (the harness's own
    size) into the child's."""
    try:
        text = Path("/proc/self/status").read_text()
    except OSError:
        return None
    found = re.search(r"VmHWM:\s+(\d+) kB", text)
    return int(found.group(1)) / 1024.0 if found else None


def worker_main(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m ldm_rt.runtime.bench worker")
    parser.add_argument("--spec", required=True)
    spec = json.loads(parser.parse_args(argv).spec)
    try:
        ours_worker(spec)
    except (ValueError, OSError) as e:  # the library's one-line errors; anything else is a bug and shows its traceback
        emit({"event": "final", "status": "failed", "error": f"{type(e).__name__}: {e}"})
        return 1
    return 0


# ---- running the peers -------------------------------------------------------------------------------------------
class PeerFailed(RuntimeError):
    """A peer process failed or stopped answering; the message says why and where its log is."""


class PeerProcess:
    """One live peer process: started once per run spec, asked for one call at a time (see serve())."""

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
              timeout: float) -> dict[str, dict[str, Any]]:
    """All peers for one run spec, interleaved: each is started (one at a time, so cold starts do not overlap)
    and kept alive; then every warm-up and timed round asks each live peer for one call in turn."""
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
        "versions": raw.get("versions", {}),
        "runs": runs,
    }


RATIO_FIELDS = {"latency": "latency_per_image_s", "unet_step": "unet_step_s", "peak_rss": "peak_rss_mb", "cold_start": "cold_start_s"}


def add_ratios(peers: dict[str, dict[str, Any]]) -> None:
    """Each ok peer's value / ldm-rt's (> 1: ldm-rt is faster or smaller). Latency and UNet step are the
    median over rounds of the ratio within a round (both measured back to back), which cancels a load that
    drifts between rounds; peak RSS and cold start are single measurements."""
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
    from .pipeline import Pipeline

    Pipeline.load(peer.model, backend=peer.extra["backend"], providers=peer.extra["providers"], compile_cache=folder,
                  reduced_precision=peer.extra.get("reduced_precision", False))  # the same settings, so the same cache keys
    return folder


def run_workload(workload: Workload, out_dir: Path, timeout: float, profile: bool) -> dict[str, Any]:
    """All peers on every run spec of one workload: fresh processes per spec, calls interleaved across peers."""
    from .manifest import Manifest

    entry: dict[str, Any] = {"name": workload.name, "description": workload.description, "config": workload.config, "runs": []}
    if workload.skip_reason is not None:
        entry["skipped"] = workload.skip_reason
        log.warning("workload %s skipped: %s", workload.name, workload.skip_reason)
        return entry
    facts = Manifest.read(workload.artifacts).facts
    work = out_dir / "work" / workload.name
    work.mkdir(parents=True, exist_ok=True)
    threads = _physical_cores()
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
        raw = run_peers(runnable, specs, {p.name: work / f"{tag}_{p.name}.log" for p in runnable}, spec.warmup, spec.runs, timeout)
        for peer in workload.peers:
            if peer.skip_reason is not None:
                run["peers"][peer.name] = {"status": "skipped", "label": peer.label, "reason": peer.skip_reason}
                continue
            result: dict[str, Any] = {"status": raw[peer.name]["status"], "label": peer.label, "model": peer.model}
            if result["status"] == "ok":
                result.update(summarize(raw[peer.name], spec.batch))
                if result["unet_step_s"]:
                    result["unet_gflops"] = flops["total"] / result["unet_step_s"] / 1e9  # share of the peak: run_benchmark
                if peer.name != OURS:
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


# ---- machine, roofline, FLOPs, profile, footprint ----------------------------------------------------------------
def _physical_cores() -> int:
    from .backends.base import physical_cores

    return physical_cores()


def _version(name: str) -> str | None:
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
    versions = {name: _version(name) for name in ("ldm-rt", "numpy", "onnxruntime", "torch", "diffusers", "transformers")}
    return {
        "cpu": cpu, "cpu_flags": flags, "logical_cores": os.cpu_count(), "physical_cores": _physical_cores(), "ram_gib": ram,
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


def _node_events(profile_file: str) -> list[dict[str, Any]]:
    events = json.loads(Path(profile_file).read_text())
    return [e for e in events if e.get("cat") == "Node" and e.get("name", "").endswith("_kernel_time")]


def _unet_file(artifacts: Path, as_run: bool = False) -> tuple[Path, Any]:
    """The fp32 UNet graph of an artifacts folder and its manifest entry (contract). FLOPs are counted on the
    portable graph; `as_run` gives the file the ONNX Runtime backend runs (the fused-attention variant if built)."""
    from .manifest import Manifest

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

    from .backends.base import HostOptions
    from .backends.onnxruntime_backend import session_options

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


# ---- the whole run -----------------------------------------------------------------------------------------------
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
    return report


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


def write_report(report: dict[str, Any], results_dir: Path, name: str = "latest") -> dict[str, Path]:
    """<name>.json, <name>.md (the full tables) and <name>.readme.md (the README's performance section)."""
    from .atomic import atomic_write_text

    results_dir.mkdir(parents=True, exist_ok=True)
    paths = {"json": results_dir / f"{name}.json", "markdown": results_dir / f"{name}.md", "readme": results_dir / f"{name}.readme.md"}
    atomic_write_text(paths["json"], json.dumps(report, indent=2) + "\n")
    atomic_write_text(paths["markdown"], render_markdown(report))
    atomic_write_text(paths["readme"], render_readme_section(report))
    return paths


# ---- rendering ----------------------------------------------------------------------------------------------------
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


def _run_table(run: dict[str, Any]) -> list[str]:
    head = ("| peer | latency / image (s) | vs ldm-rt | text enc (ms) | UNet / step (ms), median (fastest) | fastest step vs ldm-rt "
            "| VAE dec (ms) | peak RSS (MB) | vs ldm-rt | cold start (s) | vs ldm-rt | UNet GFLOP/s | % of peak "
            "| image Δ vs ldm-rt (mean / max, 8-bit) |")
    columns = head.count(" | ") + 1
    lines = [head, "|" + " --- |" * columns]
    for result in run["peers"].values():
        if result["status"] != "ok":
            why = result.get("reason") or result.get("error", "failed")
            lines.append(f"| {result['label']} | {result['status']}: {why} |" + " |" * (columns - 2))
            continue
        diff = result.get("image_vs_ours")
        diff_text = "–" if not diff else f"{diff['mean_abs']:.2f} / {diff['max_abs']:.0f}"
        lines.append(
            f"| {result['label']} | {_num(result['latency_per_image_s'], '{:.3f}')} | {_ratio(result, 'latency')} "
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
                  "| run | peer | s / image | vs ldm-rt | UNet ms / step, median (fastest) | fastest step vs ldm-rt | peak RSS MB | cold start s | UNet % of peak |",
                  "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
        for run in w["runs"]:
            for result in run["peers"].values():
                if result["status"] != "ok":
                    continue
                lines.append(
                    f"| {run['title']} | {result['label']} | {_num(result['latency_per_image_s'], '{:.3f}')} | {_ratio(result, 'latency')} "
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
    for n in report.get("notes", []):
        lines += ["", n]
    return "\n".join(lines) + "\n"


# ---- `ldm-rt bench` ------------------------------------------------------------------------------------------------
def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The `ldm-rt bench` options (runtime/cli.py adds them to its subcommand)."""
    parser.add_argument("--model", type=Path, default=None, help="artifacts folder (default: the shipped default model)")
    parser.add_argument("--source", type=Path, default=None, help="the model the PyTorch reference loads (default: the shipped default model folder)")
    parser.add_argument("--diffusers-source", type=Path, default=None, help="the same weights as a diffusers folder, for the diffusers peer")
    parser.add_argument("--optimum-model", type=Path, default=None, help="Optimum's ONNX export of them, for the Optimum peer")
    parser.add_argument("--optimum-python", type=Path, default=None, help="python of the Optimum virtual environment (benchmarks/peers/optimum_env.py)")
    parser.add_argument("--torch-python", type=Path, default=None, help="python with torch for the torch peers (default: this one, if it has torch)")
    parser.add_argument("--prompt", default="a red circle on a white background", help="the prompt every peer draws")
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 4], help="batch sizes to measure (default 1 4)")
    parser.add_argument("--height", type=int, default=None, help="image height (default: the artifacts' optimum)")
    parser.add_argument("--width", type=int, default=None, help="image width (default: the artifacts' optimum)")
    parser.add_argument("--steps", type=int, default=20, help="denoising steps (default 20)")
    parser.add_argument("--guidance", type=float, default=7.5, help="classifier-free guidance (default 7.5)")
    parser.add_argument("--runs", type=int, default=3, help="timed calls per peer; the median is reported (default 3)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed calls first (default 1)")
    parser.add_argument("--no-profile", action="store_true", help="skip the ONNX Runtime profile of ldm-rt's UNet")
    parser.add_argument("--timeout", type=float, default=3600.0, help="seconds before a peer process is killed (default 3600)")
    parser.add_argument("--results", type=Path, default=Path("bench-results"), help="folder for <name>.json/.md (default ./bench-results)")
    parser.add_argument("--name", default="latest", help="file name stem of the results (default latest)")


def _torch_python(requested: Path | None) -> Path | None:
    if requested is not None:
        return requested
    import importlib.util

    return Path(sys.executable) if importlib.util.find_spec("torch") is not None else None


def cli_workload(args: argparse.Namespace) -> Workload:
    """The workload `ldm-rt bench` measures: one artifacts folder, its source for the torch peers."""
    from .artifacts import default_artifacts_dir
    from .manifest import Manifest

    artifacts = args.model if args.model is not None else default_artifacts_dir()
    default_model = artifacts.parent / "model" if args.model is None else None
    try:
        manifest = Manifest.read(artifacts)
    except ValueError as e:
        return Workload("model", str(artifacts), None, (), (), skip_reason=str(e))
    height = args.height or manifest.profile.height[1]
    width = args.width or manifest.profile.width[1]
    runs = tuple(RunSpec(height, width, batch=b, steps=args.steps, guidance=args.guidance, runs=args.runs, warmup=args.warmup,
                         prompt=args.prompt) for b in args.batch)
    scripts = peer_scripts_dir()
    torch_python = _torch_python(args.torch_python)
    source = args.source or default_model
    peers = [ours_peer(artifacts), openvino_peer(artifacts)]
    for name, model, python in (("reference", source, torch_python), ("diffusers", args.diffusers_source, torch_python),
                                ("optimum", args.optimum_model, args.optimum_python)):
        reason = None
        if scripts is None:
            reason = "the peer workers live in a source checkout (benchmarks/peers); run `python benchmarks/run.py` there"
        elif python is None:
            reason = "no python with torch: pass --torch-python" if name != "optimum" else "pass --optimum-python (benchmarks/peers/optimum_env.py create)"
        elif model is None or not Path(model).exists():
            reason = {"reference": "pass --source", "diffusers": "pass --diffusers-source", "optimum": "pass --optimum-model"}[name]
        argv = (str(python), str(scripts / f"{name}_worker.py")) if reason is None else ()
        peers.append(Peer(name, argv, str(model or ""), skip_reason=reason))
    peers += gpu_peers(artifacts)
    return Workload(artifacts.name, f"artifacts {artifacts}", artifacts, runs, tuple(peers), config={"manifest_source": manifest.source})


def bench_command(args: argparse.Namespace) -> int:
    """`ldm-rt bench`: measure, print the table, write JSON + markdown to --results."""
    workload = cli_workload(args)
    if workload.skip_reason is not None:
        raise BenchError(workload.skip_reason)
    previous = log.level
    log.setLevel(logging.INFO)  # a run takes minutes: show its progress whatever the CLI's log level
    try:
        report = run_benchmark([workload], args.results, timeout=args.timeout, profile=not args.no_profile)
    finally:
        log.setLevel(previous)
    paths = write_report(report, args.results, args.name)
    print(render_markdown(report))
    print(f"wrote {paths['json']}, {paths['markdown']}, {paths['readme']}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["worker"]:
        return worker_main(argv[1:])
    parser = argparse.ArgumentParser(prog="python -m ldm_rt.runtime.bench", description=__doc__.split("\n\n")[0])
    add_arguments(parser)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    return bench_command(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
