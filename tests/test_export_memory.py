"""Export memory: a component's export holds about one copy of its weights beyond the torch model, whatever its
size (issue 21: SD 1.5's export peaked at 18 GB, 5-6 copies of the UNet during the clean-up alone).

The bound is measured in a fresh process (the kernel's high-water mark, VmHWM, is per process) on a model with
128 MB of weights, big enough that copies of them dominate everything else, small enough to take seconds.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# Peak of the export beyond the process's resident memory before it (the torch model, imports), in weight bytes:
# measured 3.3x, all of it in torch.onnx.export, whose exporter builds a model under 2 GiB as one in-memory
# proto; the clean-up after it now stays within that (about 2x: the file's bytes and the parsed proto) where it
# reached 6x before, holding several copies of the weights. Past 2 GiB the tracer writes the weights to files and
# neither step holds them (SD 1.5's UNet: the clean-up peaked at 0.28 GB for 3.4 GB of weights).
BOUND = 4.0

SCRIPT = textwrap.dedent(
    """
    import json, sys, warnings
    from pathlib import Path

    import torch
    from torch import nn

    from ldm_rt.export.memory import process_peak_rss, rss_bytes
    from ldm_rt.export.onnx_export import export_component
    from ldm_rt.runtime.contracts import ComponentContract, Dim, TensorSpec, Tolerance

    warnings.simplefilter("ignore")
    torch.manual_seed(0)
    # 14 convolutions 512 -> 512, 3x3: 132 MB of weights and little arithmetic at 4x4 latents.
    layers = [nn.Conv2d(4, 512, 1)] + [nn.Conv2d(512, 512, 3, padding=1) for _ in range(14)] + [nn.Conv2d(512, 3, 1)]
    model = nn.Sequential(*layers).eval()
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    contract = ComponentContract(
        name="vae_decoder",
        inputs=(TensorSpec("latent", "float32", ("batch", 4, "latent_height", "latent_width")),),
        outputs=(TensorSpec("image", "float32", ("batch", 3, "latent_height", "latent_width")),),
        dims=(Dim("batch", 1, 1, 2), Dim("latent_height", 4, 4, 8, 2), Dim("latent_width", 4, 4, 8, 2)),
        tolerance={"fp32": Tolerance(1e-4)},
    )
    before = rss_bytes()
    files = export_component(model, contract, Path(sys.argv[1]) / "vae_decoder.onnx")
    print(json.dumps({"weight_bytes": weight_bytes, "before": before, "peak": process_peak_rss(),
                      "files": [f.name for f in files]}))
    """
)


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_a_components_export_holds_about_one_copy_of_its_weights(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-c", SCRIPT, str(tmp_path)], capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    got = json.loads(done.stdout.strip().splitlines()[-1])
    assert got["files"] == ["vae_decoder.onnx"]
    assert got["weight_bytes"] > 120e6
    extra = (got["peak"] - got["before"]) / got["weight_bytes"]
    assert extra < BOUND, f"export peak {extra:.2f}x the weight bytes above the torch model (bound {BOUND}x)"
