"""The OpenVINO execution provider (an ONNX Runtime plugin, ldm-rt[openvino]): the shipped default model runs on
it and draws what the CPU provider draws; without the plugin the error names the extra to install."""

from __future__ import annotations

import importlib
import json
import logging

import numpy as np
import onnxruntime as ort
import pytest

from ldm_rt.runtime.backends import base, onnxruntime_backend
from ldm_rt.runtime.backends.base import BackendError
from ldm_rt.runtime.pipeline import Pipeline

PROMPTS = ["a small blue square at the top on a gray background", "a large red circle on the left on a white background"]


def test_the_default_model_on_openvino_matches_the_cpu_provider(caplog, monkeypatch, tmp_path):
    pytest.importorskip("onnxruntime_ep_openvino", reason="the OpenVINO plugin is not installed (pip install 'ldm-rt[openvino]')")
    cpu = Pipeline.load(providers=["cpu"])
    given = []
    real = ort.SessionOptions.add_provider_for_devices
    monkeypatch.setattr(ort.SessionOptions, "add_provider_for_devices", lambda so, devices, opts: given.append(opts) or real(so, devices, opts))
    with caplog.at_level(logging.INFO, logger=onnxruntime_backend.__name__):
        ov = Pipeline.load(providers=["openvino"], threads=1, compile_cache=tmp_path)
    # The thread count and the cache folder reach the plugin through its load_config (it ignores the intra-op setting).
    cache = tmp_path / "openvino"
    assert given and all(json.loads(o["load_config"]) == {"CPU": {"INFERENCE_NUM_THREADS": "1", "CACHE_DIR": str(cache)}} for o in given)
    blobs = sorted(cache.iterdir())
    assert len(blobs) >= len(ov.components)  # one compiled graph per component (at least)
    assert all(c.session.get_providers()[0] == "OpenVINOExecutionProvider" for c in ov.components.values())
    # The portable UNet, not the ONNX Runtime variant whose contrib op OpenVINO would hand back to the CPU.
    assert "opened unet (fp32) from onnx/fp32/unet.onnx on OpenVINOExecutionProvider" in caplog.text
    a = cpu.generate(PROMPTS, steps=25, guidance=5.0, seed=3).images.astype(np.float64)
    b = ov.generate(PROMPTS, steps=25, guidance=5.0, seed=3).images.astype(np.float64)
    # OpenVINO may run fp32 graphs in bf16 on CPUs with AMX; measured here 0.06 mean, 7 max (8-bit levels).
    assert np.abs(a - b).mean() < 1.0 and np.abs(a - b).max() <= 48
    # A second process-like load reads the compiled graphs back: nothing new is compiled, the images are the same.
    again = Pipeline.load(providers=["openvino"], threads=1, compile_cache=tmp_path)
    assert sorted(cache.iterdir()) == blobs
    np.testing.assert_array_equal(again.generate(PROMPTS, steps=25, guidance=5.0, seed=3).images.astype(np.float64), b)
    given.clear()
    Pipeline.load(providers=["openvino"], compile_cache=False)
    assert given and all("CACHE_DIR" not in json.loads(o["load_config"])["CPU"] for o in given)


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


def test_compile_cache_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert base.default_compile_cache() == tmp_path / "xdg" / "ldm-rt"
    assert onnxruntime_backend._cache_folder(tmp_path / "c", "openvino") == tmp_path / "c" / "openvino"
    assert (tmp_path / "c" / "openvino").is_dir()
    assert onnxruntime_backend._cache_folder(None, "openvino") is None
    blocker = tmp_path / "file"
    blocker.write_text("x")
    # A folder that cannot be made means no cache, not a failed load.
    assert onnxruntime_backend._cache_folder(blocker / "sub", "openvino") is None
    with pytest.raises(BackendError, match="is a file; give a folder"):
        Pipeline.load(compile_cache=blocker)
