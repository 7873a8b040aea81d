"""The OpenVINO execution provider (an ONNX Runtime plugin, ldm-rt[openvino]): the shipped default model runs on
it and draws what the CPU provider draws; without the plugin the error names the extra to install."""

from __future__ import annotations

import importlib
import json
import logging

import numpy as np
import onnxruntime as ort
import pytest

from ldm_rt.runtime.backends import onnxruntime_backend
from ldm_rt.runtime.backends.base import BackendError
from ldm_rt.runtime.pipeline import Pipeline

PROMPTS = ["a small blue square at the top on a gray background", "a large red circle on the left on a white background"]


def test_the_default_model_on_openvino_matches_the_cpu_provider(caplog, monkeypatch):
    pytest.importorskip("onnxruntime_ep_openvino", reason="the OpenVINO plugin is not installed (pip install 'ldm-rt[openvino]')")
    cpu = Pipeline.load(providers=["cpu"])
    given = []
    real = ort.SessionOptions.add_provider_for_devices
    monkeypatch.setattr(ort.SessionOptions, "add_provider_for_devices", lambda so, devices, opts: given.append(opts) or real(so, devices, opts))
    with caplog.at_level(logging.INFO, logger=onnxruntime_backend.__name__):
        ov = Pipeline.load(providers=["openvino"], threads=1)
    # The thread count reaches the plugin through its load_config (it ignores the intra-op setting).
    assert given and all(json.loads(o["load_config"]) == {"CPU": {"INFERENCE_NUM_THREADS": "1"}} for o in given)
    assert all(c.session.get_providers()[0] == "OpenVINOExecutionProvider" for c in ov.components.values())
    # The portable UNet, not the ONNX Runtime variant whose contrib op OpenVINO would hand back to the CPU.
    assert "opened unet (fp32) from onnx/fp32/unet.onnx on OpenVINOExecutionProvider" in caplog.text
    a = cpu.generate(PROMPTS, steps=25, guidance=5.0, seed=3).images.astype(np.float64)
    b = ov.generate(PROMPTS, steps=25, guidance=5.0, seed=3).images.astype(np.float64)
    # OpenVINO may run fp32 graphs in bf16 on CPUs with AMX; measured here 0.06 mean, 7 max (8-bit levels).
    assert np.abs(a - b).mean() < 1.0 and np.abs(a - b).max() <= 48


def test_without_the_plugin_the_error_names_the_extra(monkeypatch):
    real_import = importlib.import_module

    def no_plugin(name, *args):
        if name == "onnxruntime_ep_openvino":
            raise ImportError(name)
        return real_import(name, *args)

    monkeypatch.setattr(ort, "get_ep_devices", lambda: [])  # nothing registered in this process
    monkeypatch.setattr(onnxruntime_backend.importlib, "import_module", no_plugin)
    with pytest.raises(BackendError, match=r"pip install 'ldm-rt\[openvino\]'"):
        Pipeline.load(providers=["openvino"])
