"""What a LoRA applied at run time costs: time to open the pipeline and peak memory, with and without it.

    python benchmarks/lora_open.py              # the SD-shaped workload (made and exported on first use)
    python benchmarks/lora_open.py --runs 5 --rank 16

The LoRA is a typical one, written in kohya layout from the artifacts' own module table: rank R on every
attention projection (q, k, v, out), the feed-forward layers and the transformer projections of the UNet, and
on q, k, v, out and the MLP of every text-encoder layer; `--locon` adds the ResBlock convolutions (LoCon).
Each measurement is a fresh process (`Pipeline.load` then one UNet step, so the step time shows the patched
session runs as fast), reporting the median over --runs of: seconds to open, peak RSS after opening (MB),
seconds per UNet step. Sampling costs nothing extra: the sessions hold the patched weights in place of the
originals. A separate script, not part of benchmarks/run.py's peers: it measures our loading, not a peer.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

# Module-name endings a typical SD LoRA trains (kohya's defaults: attention and feed-forward, transformer projections).
LINEAR_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2", "proj_in", "proj_out",
                  "q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2")  # fmt: skip
LOCON_TARGETS = ("conv1", "conv2")

_CHILD = r"""
import json, resource, sys, time
import numpy as np
from ldm_rt.runtime.pipeline import Pipeline
artifacts, lora = sys.argv[1], sys.argv[2]
t = time.perf_counter()
pipe = Pipeline.load(artifacts, loras=[(lora, 1.0)] if lora else None)
opened = time.perf_counter() - t
try:  # VmHWM: this program's peak; ru_maxrss would carry the parent's peak across exec
    rss = next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM:")) / 1024
except (OSError, StopIteration):
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
unet = pipe.components["unet"]
feeds = {}
sizes = {d.name: d.opt for d in unet.contract.dims}
rng = np.random.default_rng(0)
for spec in unet.contract.inputs:
    shape = spec.resolve(sizes)
    feeds[spec.name] = rng.standard_normal(shape).astype(np.float32) if spec.dtype == "float32" else np.zeros(shape, spec.dtype)
unet.run(feeds)
t = time.perf_counter()
unet.run(feeds)
print(json.dumps({"open_s": opened, "peak_rss_mb": rss, "unet_step_s": time.perf_counter() - t}))
"""


def write_typical_lora(artifacts: Path, out: Path, rank: int = 8, locon: bool = False, seed: int = 0) -> tuple[Path, int]:
    """A kohya-layout LoRA over the artifacts' adaptable modules (lora_targets.json); (file, modules adapted)."""
    import numpy as np
    from safetensors.numpy import save_file

    from ldm_rt.runtime.lora import LoraTargets

    modules = LoraTargets.read(artifacts).modules
    prefixes = {"unet": "lora_unet_", "text_encoder": "lora_te_", "text_encoder_2": "lora_te2_"}
    targets = LINEAR_TARGETS + (LOCON_TARGETS if locon else ())
    rng = np.random.default_rng(seed)
    tensors: dict[str, np.ndarray] = {}
    for component, table in modules.items():
        for module, info in table.items():
            name = info.aliases[0] if info.aliases else module  # diffusers' name where there is one, as kohya writes SD 1.x
            if not name.endswith(targets):
                continue
            out_dim, in_shape = info.shape[0], info.shape[1:]
            if len(in_shape) == 3 and in_shape[1:] != (1, 1) and not locon:
                continue
            key = prefixes[component] + name.replace(".", "_")
            down_shape = (rank, *in_shape) if len(in_shape) == 3 else (rank, in_shape[0])
            up_shape = (out_dim, rank, 1, 1) if len(in_shape) == 3 else (out_dim, rank)
            tensors[f"{key}.lora_down.weight"] = (rng.standard_normal(down_shape) * 0.01).astype(np.float16)
            tensors[f"{key}.lora_up.weight"] = (rng.standard_normal(up_shape) * 0.01).astype(np.float16)
            tensors[f"{key}.alpha"] = np.array(rank / 2, np.float16)
    out.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out))
    return out, len(tensors) // 3


def measure(artifacts: Path, lora: Path | None) -> dict[str, float]:
    """One fresh process: open (with the LoRA, if any), one warm-up and one timed UNet step."""
    done = subprocess.run([sys.executable, "-c", _CHILD, str(artifacts), str(lora or "")], capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"measuring {artifacts} failed: {done.stderr.strip().splitlines()[-1] if done.stderr.strip() else done.returncode}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def compare(artifacts: Path, lora: Path, runs: int = 3) -> dict[str, dict[str, float]]:
    """Median of `runs` fresh processes each way, interleaved so machine load affects both alike."""
    samples: dict[str, list[dict[str, float]]] = {"without": [], "with": []}
    for _ in range(runs):
        samples["without"].append(measure(artifacts, None))
        samples["with"].append(measure(artifacts, lora))
    return {way: {k: statistics.median(s[k] for s in got) for k in got[0]} for way, got in samples.items()}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="benchmarks/lora_open.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--artifacts", type=Path, help="an artifacts folder (default: the SD-shaped workload's, made on first use)")
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--locon", action="store_true", help="also adapt the ResBlock convolutions (LoCon)")
    args = p.parse_args(argv)
    artifacts = args.artifacts
    if artifacts is None:
        from benchmarks import workloads

        artifacts = workloads.prepare_sd_shaped(workloads.SDShape(), workloads.SD_SIZES, None, "not measured here").artifacts
    lora, n = write_typical_lora(artifacts, HERE / "work" / "lora" / f"typical_r{args.rank}{'_locon' if args.locon else ''}.safetensors", args.rank, args.locon)
    result = compare(artifacts, lora, args.runs)
    print(json.dumps({"artifacts": str(artifacts), "lora": {"file": lora.name, "bytes": lora.stat().st_size, "modules": n, "rank": args.rank},
                      "median_of": args.runs, **result}, indent=2))  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
