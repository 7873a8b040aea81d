"""Smoke test: the reference UNet exports to ONNX (opset 17) with dynamic batch/H/W and runs in onnxruntime."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

from ldm_rt.reference.configs import UNetConfig
from ldm_rt.reference.unet import UNetModel

ort = pytest.importorskip("onnxruntime")
pytest.importorskip("onnx")

# Both transformer styles in one small model: attention at both levels, v2-style Linear projections,
# a class embedding, and upcast attention (a no-op in fp32 that must still trace).
CONFIG = UNetConfig(
    model_channels=32, channel_mult=(1, 2), num_res_blocks=1, attention_resolutions=(1, 2), num_heads=2,
    context_dim=24, use_linear_in_transformer=True, num_classes=3, upcast_attention=True,
)


pytestmark = pytest.mark.usefixtures("torch_one_thread")


def test_tiny_unet_exports_with_dynamic_shapes(tmp_path):
    torch.manual_seed(0)
    model = UNetModel(CONFIG).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))  # perturb so no path is a trivial identity
    path = tmp_path / "unet.onnx"
    example = (torch.randn(1, 4, 16, 16), torch.tensor([3.0]), torch.randn(1, 5, 24), torch.tensor([1]))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # legacy-exporter deprecation and TracerWarnings from torch internals
        torch.onnx.export(
            model, example, str(path), dynamo=False, opset_version=17,
            input_names=["x", "timesteps", "context", "y"], output_names=["eps"],
            dynamic_axes={
                "x": {0: "B", 2: "H", 3: "W"}, "timesteps": {0: "B"}, "context": {0: "B", 1: "T"}, "y": {0: "B"},
                "eps": {0: "B", 2: "H", 3: "W"},
            },
        )
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    g = torch.Generator().manual_seed(1)
    for b, h, w, t in [(2, 24, 40, 7), (3, 8, 16, 3)]:
        x = torch.randn(b, 4, h, w, generator=g)
        timesteps = torch.rand(b, generator=g) * 999
        context = torch.randn(b, t, 24, generator=g)
        y = torch.randint(0, 3, (b,), generator=g)
        with torch.no_grad():
            expected = model(x, timesteps, context, y).numpy()
        feeds = {"x": x.numpy(), "timesteps": timesteps.numpy(), "context": context.numpy(), "y": y.numpy()}
        (got,) = session.run(None, feeds)
        assert got.shape == (b, 4, h, w)
        assert np.abs(expected).mean() > 0.05
        np.testing.assert_allclose(got, expected, atol=1e-4, rtol=0)
