"""One command: ldm-rt against its reference, diffusers and Optimum, side by side, written to benchmarks/results/.

    python benchmarks/run.py                    # everything (first run: makes the Optimum venv and the exports)
    python benchmarks/run.py --quick            # 1 timed run, 4 steps, 128x128 only: a check that all peers run
    python benchmarks/run.py --fresh-venv       # also measure the install footprint in fresh virtual environments
    python benchmarks/run.py --sd15             # also the SD 1.5-sized model (3.4 GB UNet; ~9 GB of memory to export, once)

Workloads (benchmarks/workloads.py): the SD-v1-shaped model at reduced width at each --sizes (batch 1), the
SD-v2-shaped one (64-wide heads) at each --sd2-sizes, the SDXL-shaped one (two text encoders, text_time UNet)
at each --sdxl-sizes, and the shipped default model at batch 1 and 4 (skipped, and said so, while its
artifacts do not exist). Peers:
ldm-rt on ONNX Runtime CPU (CUDA and TensorRT where present), the PyTorch reference, diffusers'
StableDiffusionPipeline (StableDiffusionXLPipeline on the SDXL-shaped model), Optimum's
ORTStableDiffusion(XL)Pipeline in benchmarks/.venv-optimum, OpenVINO GenAI's
Text2ImagePipeline at its default precision and at f32 in benchmarks/.venv-ovgenai, stable-diffusion.cpp in
benchmarks/.venv-sdcpp (SD 1.5-sized workload only), ldm-rt's native C++ runtime (cpp/native, built here with
CMake; `ours-native`). The harness is
the `benchmarks` package beside this script (harness.py runs the peers, report.py writes the results); this
script makes the models and names the peers.
"""

from __future__ import annotations

import logging
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
# `benchmarks` is a folder of the source checkout, not an installed package: import it from the repository root.
sys.path.insert(0, str(HERE.parent))

from benchmarks import harness, report, workloads  # noqa: E402
from benchmarks.machine import install_footprint  # noqa: E402
from benchmarks.peers import native_env, openvino_genai_env, optimum_env, sdcpp_env  # noqa: E402
from benchmarks.peers.peer_env import PeerEnv, PeerEnvError  # noqa: E402
from ldm_rt.runtime.cli_support import OneLineParser, run, summary  # noqa: E402

RESULTS = HERE / "results"
log = logging.getLogger("benchmarks")
PROG = "benchmarks/run.py"


def peer_env(env: PeerEnv, skip: str | None, log_file: Path) -> tuple[Path | None, str | None]:
    """(the peer venv's python, None), made on first use, or (None, why not: `skip`, or the failed install)."""
    if skip is not None:
        return None, skip
    try:
        log.info("%s environment: %s", env.name, env.venv)
        return env.create(log_file=log_file), None
    except PeerEnvError as e:
        return None, str(e)


def cpu_runtime_peers(prepared: workloads.Prepared, envs: dict[str, tuple[Path | None, str | None]]) -> list[harness.Peer]:
    """OpenVINO GenAI at both precisions and stable-diffusion.cpp (issue 21's CPU runtimes), or why they cannot run."""
    ov_python, ov_reason = envs["openvino-genai"]
    sd_python, sd_reason = envs["sdcpp"]
    return [*harness.openvino_genai_peers(prepared.openvino_ir, ov_python, prepared.openvino_reason or ov_reason),
            harness.sdcpp_peer(prepared.single_file, sd_python, prepared.single_file_reason or sd_reason)]


def native_peer(artifacts: Path | str | None, worker: tuple[Path | None, str | None]) -> harness.Peer:
    """ldm-rt's native C++ runtime (peers/native_env.py) on ldm-rt's artifacts: `worker` is (its executable, None)
    or (None, why it cannot run)."""
    exe, reason = worker
    return harness.Peer(native_env.NAME, (str(exe),) if exe else (), str(artifacts or ""), skip_reason=reason)


def peers_for(prepared: workloads.Prepared, optimum_python: Path | None,
              envs: dict[str, tuple[Path | None, str | None]] | None = None,
              native: tuple[Path | None, str | None] = (None, "not built")) -> tuple[harness.Peer, ...]:
    """ldm-rt first (the others' images are compared with its; then on OpenVINO, then native C++), the torch peers,
    Optimum, the CPU runtimes (`envs`), GPU."""
    peers = [harness.ours_peer(prepared.artifacts), harness.openvino_peer(prepared.artifacts), native_peer(prepared.artifacts, native)]
    pipeline = harness.pipeline_extra(prepared.pipeline)  # the diffusers class the diffusers and Optimum peers run
    for name, model, why, extra in (("reference", prepared.reference_source, "no model folder for the reference", {}),
                                    ("diffusers", prepared.diffusers_source, prepared.diffusers_reason, pipeline)):
        reason = None if model is not None else why or "no diffusers-layout folder"
        peers.append(harness.Peer(name, harness.worker_argv(name), str(model or ""), skip_reason=reason, extra=extra))
    if prepared.optimum_model is not None and optimum_python is not None:
        peers.append(harness.Peer("optimum", harness.worker_argv("optimum", optimum_python), str(prepared.optimum_model), extra=pipeline))
    else:
        peers.append(harness.Peer("optimum", skip_reason=prepared.optimum_reason or "Optimum environment not available", extra=pipeline))
    if envs is not None:
        peers += cpu_runtime_peers(prepared, envs)
    peers += harness.gpu_peers(prepared.artifacts)
    return tuple(peers)


def sd15_workload(args, envs: dict[str, tuple[Path | None, str | None]], ov: tuple[bool, str | None],
                  native: tuple[Path | None, str | None]) -> harness.Workload:
    """The SD 1.5-sized model at its one size and step count (--runs/--warmup apply): ldm-rt (ONNX Runtime f32;
    OpenVINO bf16 where the CPU has it), OpenVINO GenAI at both precisions, stable-diffusion.cpp. The torch
    peers and Optimum are measured on the smaller workloads; here each peer runs alone (Workload.sequential),
    as their processes together would not fit in memory."""
    size, sd_ready = workloads.SD15_SIZE, (envs["sdcpp"][0] is not None, envs["sdcpp"][1])
    model = workloads.prepare_sd_shaped(workloads.SD15_SHAPE, (size,), None, "not run at SD 1.5 size", openvino=ov, sdcpp=sd_ready)
    peers = (harness.ours_peer(model.artifacts), harness.openvino_peer(model.artifacts), native_peer(model.artifacts, native),
             *cpu_runtime_peers(model, envs))
    runs = (harness.RunSpec(size, size, batch=1, steps=workloads.SD15_STEPS, runs=args.runs, warmup=args.warmup),)
    return harness.Workload(model.name, model.description, model.artifacts, runs, peers, model.config, sequential=True)


def fresh_venv_footprint(log_file: Path) -> dict[str, dict]:
    """site-packages size of fresh venvs: `pip install .` (runtime only) and `pip install .[torch]` (torch pinned)."""
    out = {}
    for label, target in (("fresh venv: pip install . (runtime only)", str(workloads.ROOT)),
                          ("fresh venv: pip install .[torch]", f"{workloads.ROOT}[torch]")):
        with tempfile.TemporaryDirectory() as tmp, open(log_file, "a") as f:
            venv = Path(tmp) / "venv"
            subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, stdout=f, stderr=subprocess.STDOUT)
            pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "-q", "-c", str(workloads.ROOT / "constraints.txt"), target]
            if subprocess.run(pip, stdout=f, stderr=subprocess.STDOUT).returncode != 0:
                out[label] = {"mb": None, "packages": 0, "has_torch": False, "missing": [f"pip failed; see {log_file}"]}
                continue
            site = next((venv / "lib").glob("python*/site-packages"))
            size = sum(p.stat().st_size for p in site.rglob("*") if p.is_file() and not p.is_symlink())
            dists = list(site.glob("*.dist-info"))
            out[label] = {"mb": size / 1e6, "packages": len(dists), "has_torch": any(d.name.startswith("torch-") for d in dists), "missing": []}
    return out


def main(argv: list[str] | None = None) -> int:
    parser = OneLineParser(prog=PROG, description=summary(__doc__))
    parser.add_argument("--sizes", type=int, nargs="+", default=list(workloads.SD_SIZES), help="SD-shaped image sizes (default 128 256)")
    parser.add_argument("--sd2-sizes", type=int, nargs="*", default=[256], help="SD-v2-shaped image sizes (default 256; none to skip)")
    parser.add_argument("--sdxl-sizes", type=int, nargs="*", default=list(workloads.SDXL_SIZES),
                        help="SDXL-shaped image sizes (default 256; none to skip)")
    parser.add_argument("--default-batches", type=int, nargs="+", default=[1, 4], help="default-model batch sizes (default 1 4)")
    parser.add_argument("--steps", type=int, default=20, help="DDIM steps (default 20)")
    parser.add_argument("--runs", type=int, default=3, help="timed calls per peer, median reported (default 3)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed calls first (default 1)")
    parser.add_argument("--quick", action="store_true", help="1 run, 4 steps, the smallest size: check that every peer runs")
    parser.add_argument("--no-optimum", action="store_true", help="skip the Optimum peer (no venv is made)")
    parser.add_argument("--no-openvino-genai", action="store_true", help="skip the OpenVINO GenAI peers (no venv is made)")
    parser.add_argument("--no-sdcpp", action="store_true", help="skip the stable-diffusion.cpp peer (no venv is built)")
    parser.add_argument("--no-native", action="store_true", help="skip ldm-rt's native C++ runtime (not built with CMake)")
    parser.add_argument("--sd15", action="store_true", help=f"also the SD 1.5-sized model at {workloads.SD15_SIZE}x{workloads.SD15_SIZE}, "
                        f"{workloads.SD15_STEPS} steps: ldm-rt, OpenVINO GenAI, stable-diffusion.cpp, one process at a time "
                        "(first run: ~9 GB of memory to export it)")
    parser.add_argument("--fresh-venv", action="store_true", help="also measure fresh venvs' site-packages (needs the package index)")
    parser.add_argument("--no-profile", action="store_true", help="skip the ONNX Runtime profile of ldm-rt's UNet")
    parser.add_argument("--results", type=Path, default=RESULTS, help=f"results folder (default {RESULTS})")
    parser.add_argument("--name", default="latest", help="file name stem of the results (default latest)")
    args = parser.parse_args(argv)
    return run(PROG, lambda: benchmark(args))


def benchmark(args) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    if args.quick:
        args.runs, args.steps, args.sizes = 1, 4, [min(args.sizes)]
        args.sd2_sizes = [min(args.sd2_sizes)] if args.sd2_sizes else []
        args.sdxl_sizes = [min(args.sdxl_sizes)] if args.sdxl_sizes else []

    workloads.WORK.mkdir(parents=True, exist_ok=True)
    optimum_python, optimum_reason = None, None
    if args.no_optimum:
        optimum_reason = "not run (--no-optimum)"
    else:
        try:
            log.info("Optimum environment: %s", optimum_env.DEFAULT_VENV)
            optimum_python = optimum_env.create(log_file=workloads.WORK / "optimum_env.log")
        except optimum_env.OptimumEnvError as e:
            optimum_reason = str(e)

    asked = "not run (asked on the command line)"
    # stable-diffusion.cpp runs only at SD 1.5 size: its venv (a ~15-minute build) is made only for --sd15.
    sdcpp_skip = asked if args.no_sdcpp else None if args.sd15 else workloads.SDCPP_SHAPES
    envs = {"openvino-genai": peer_env(openvino_genai_env.ENV, asked if args.no_openvino_genai else None, workloads.WORK / "openvino_genai_env.log"),
            "sdcpp": peer_env(sdcpp_env.ENV, sdcpp_skip, workloads.WORK / "sdcpp_env.log")}
    ov = (envs["openvino-genai"][0] is not None, envs["openvino-genai"][1])
    native = (None, asked) if args.no_native else native_env.build_worker(workloads.WORK, workloads.WORK / "native_build.log")
    sd = workloads.prepare_sd_shaped(workloads.SDShape(), tuple(args.sizes), optimum_python, optimum_reason, openvino=ov)
    sd_runs = tuple(harness.RunSpec(s, s, batch=1, steps=args.steps, runs=args.runs, warmup=args.warmup) for s in args.sizes)
    default = workloads.prepare_default(optimum_python, optimum_reason)
    items = [harness.Workload(sd.name, sd.description, sd.artifacts, sd_runs, peers_for(sd, optimum_python, envs, native), sd.config)]
    if args.sd2_sizes:
        sd2 = workloads.prepare_sd_shaped(workloads.SD2_SHAPE, tuple(args.sd2_sizes), optimum_python, optimum_reason, openvino=ov)
        sd2_runs = tuple(harness.RunSpec(s, s, batch=1, steps=args.steps, runs=args.runs, warmup=args.warmup) for s in args.sd2_sizes)
        items.append(harness.Workload(sd2.name, sd2.description, sd2.artifacts, sd2_runs, peers_for(sd2, optimum_python, envs, native), sd2.config))
    if args.sdxl_sizes:
        xl = workloads.prepare_sdxl_shaped(workloads.SDXLShape(), tuple(args.sdxl_sizes), optimum_python, optimum_reason, openvino=ov)
        xl_runs = tuple(harness.RunSpec(s, s, batch=1, steps=args.steps, runs=args.runs, warmup=args.warmup) for s in args.sdxl_sizes)
        items.append(harness.Workload(xl.name, xl.description, xl.artifacts, xl_runs, peers_for(xl, optimum_python, envs, native), xl.config))
    if args.sd15:
        items.append(sd15_workload(args, envs, ov, native))
    if default.skip_reason is not None:
        items.insert(0, harness.Workload(default.name, default.description, None, (), (), skip_reason=default.skip_reason))
    else:
        from ldm_rt.runtime.manifest import Manifest

        profile = Manifest.read(default.artifacts).profile
        runs = tuple(harness.RunSpec(profile.height[1], profile.width[1], batch=b, steps=args.steps, runs=args.runs, warmup=args.warmup,
                                   prompt="a red circle on a white background") for b in args.default_batches)
        items.insert(0, harness.Workload(default.name, default.description, default.artifacts, runs, peers_for(default, optimum_python, native=native), default.config))

    footprint = install_footprint()
    if args.fresh_venv:
        footprint.update(fresh_venv_footprint(workloads.WORK / "fresh_venv.log"))
    notes = ["Install footprint: bytes of the files each installed distribution lists (its RECORD), over the dependency "
             "closure of each setup in this environment" + ("; 'fresh venv' rows: du of site-packages of new venvs." if args.fresh_venv else "."),
             "Cold start of ldm-rt on OpenVINO: with its compiled graphs in a warm cache, as after ldm-rt's first run on a "
             "machine (the cache is on by default); compiling them takes 1-3 s more per start."]
    results = report.run_benchmark(items, workloads.WORK, profile=not args.no_profile, footprint=footprint, notes=notes)
    paths = report.write_report(results, args.results, args.name)
    print(report.render_markdown(results))
    print(f"wrote {paths['json']}, {paths['markdown']}, {paths['readme']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
