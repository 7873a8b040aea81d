"""Backends without artifacts: selection, the missing-TensorRT line, engine cache-key refusal, ORT session
options, provider resolution; and request validation against a manifest (runtime/params.py)."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import math
import subprocess
import sys

import numpy as np
import onnxruntime as ort
import pytest

from ldm_rt.runtime.backends import base, onnxruntime_backend, tensorrt_backend
from ldm_rt.runtime.backends.base import BackendError
from ldm_rt.runtime.contracts import ModelFacts, ShapeProfile, build_contracts
from ldm_rt.runtime.manifest import ArtifactError, ComponentEntry, FileEntry, Manifest, PrecisionEntry
from ldm_rt.runtime.params import GenerationError, make_params
from ldm_rt.runtime.pipeline import Pipeline

FACTS = ModelFacts(
    latent_channels=4, latent_factor=2, unet_factor=2, unet_in_channels=4, unet_out_channels=4, context_length=8,
    context_dim=16, vocab_size=100, num_classes=None, autoencoder_kind="kl", scale_factor=0.18215,
)
PROFILE = ShapeProfile(batch=(1, 1, 2), height=(16, 32, 64), width=(16, 32, 64))


def fake_manifest() -> Manifest:
    entry = FileEntry("x", "0" * 64, 1)
    comps = {
        name: ComponentEntry(contract, {"fp32": PrecisionEntry(entry)})
        for name, contract in build_contracts(FACTS, PROFILE).items()
    }
    return Manifest(FACTS, PROFILE, comps, entry, entry, {"sha256": "f" * 64}, {})


GOOD = dict(prompt="a cat", negative_prompt="", steps=5, guidance=7.5, scheduler="ddim", seed=1, batch=1,
            height=None, width=None, strength=0.8)


def test_params_fill_defaults_from_the_profile():
    p = make_params(fake_manifest(), **GOOD)
    assert (p.height, p.width, p.images, p.negative_prompts) == (32, 32, 1, ("",))
    q = make_params(fake_manifest(), **{**GOOD, "seed": None})
    r = make_params(fake_manifest(), **{**GOOD, "seed": None})
    assert q.seed != r.seed and q.seed >= 0  # a fresh seed, recorded in the params


@pytest.mark.parametrize(
    "change, message",
    [
        ({"steps": 0}, "steps must be >= 1"),
        ({"steps": 2.5}, "steps must be an integer"),
        ({"guidance": math.nan}, "guidance must be a finite number"),
        ({"guidance": math.inf}, "guidance must be a finite number"),
        ({"scheduler": "kdpm2"}, "unknown scheduler 'kdpm2'"),
        ({"batch": 0}, "batch must be >= 1"),
        ({"batch": 3}, "outside the artifacts' batch range"),
        ({"prompt": ["a", "b"], "batch": 2}, "4 images per call"),
        ({"height": 30}, "height 30 must be a multiple of 4 in \\[16, 64\\]"),
        ({"width": 128}, "width 128 must be a multiple of 4"),
        ({"strength": 0.0}, "strength must be in \\(0, 1\\]"),
        ({"seed": -1}, "seed must be >= 0"),
        ({"negative_prompt": ["x", "y"]}, "2 negative prompts for 1 prompts"),
        ({"guidance_rescale": 1.5}, "guidance_rescale must be in \\[0, 1\\]"),
        ({"guidance_rescale": -0.1}, "guidance_rescale must be in \\[0, 1\\]"),
        ({"guidance_rescale": float("nan")}, "guidance_rescale must be in \\[0, 1\\]"),
        ({"guidance_rescale": "lots"}, "guidance_rescale must be a number"),
    ],
)
def test_params_reject_bad_values_with_one_line(change, message):
    with pytest.raises(GenerationError, match=message) as info:
        make_params(fake_manifest(), **{**GOOD, **change})
    assert "\n" not in str(info.value)


def test_unknown_backend_lists_the_available_ones():
    with pytest.raises(BackendError, match="unknown backend 'nope'.*onnxruntime.*tensorrt"):
        base.backend_factory("nope")


def test_torch_backend_is_found_only_through_the_entry_point(monkeypatch):
    queries = []

    def fake_entry_points(group=None, name=None):
        queries.append((group, name))
        return ()

    monkeypatch.setattr(importlib.metadata, "entry_points", fake_entry_points)
    with pytest.raises(BackendError, match=r"unknown backend 'torch' \(install the reference models: pip install 'ldm-rt\[torch\]'\)"):
        base.backend_factory("torch")
    assert ("ldm_rt.backends", "torch") in queries


def test_a_backend_whose_import_fails_names_the_missing_module(monkeypatch):
    class Entry:
        name = "torch"

        def load(self):
            raise ModuleNotFoundError("No module named 'torch'", name="torch")

    monkeypatch.setattr(importlib.metadata, "entry_points", lambda group=None, name=None: (Entry(),))
    with pytest.raises(BackendError, match="backend 'torch' cannot be imported \\(torch is missing\\)"):
        base.backend_factory("torch")


def test_bad_precision_is_refused():
    with pytest.raises(BackendError, match="precision must be one of fp32, fp16"):
        base.open_components("onnxruntime", ".", fake_manifest(), "int8")


@pytest.mark.skipif("tensorrt" in sys.modules or importlib.util.find_spec("tensorrt") is not None, reason="TensorRT is installed")
def test_missing_tensorrt_is_one_line_pointing_to_onnxruntime(tmp_path):
    with pytest.raises(BackendError) as info:
        base.open_components("tensorrt", tmp_path, fake_manifest(), "fp32")
    assert str(info.value) == "TensorRT/CUDA not found (the tensorrt package is not installed); use --backend onnxruntime"


def engine_record(key_fields):
    from ldm_rt.export.tensorrt_build import EngineSpec, GpuInfo

    spec = EngineSpec(gpu=GpuInfo(**key_fields.pop("gpu")), **key_fields)
    return {"key": spec.key, "precision": spec.precision, "engine": {}, "tensorrt_version": spec.tensorrt_version,
            "gpu": {"name": spec.gpu.name, "compute_capability": spec.gpu.compute_capability},
            "profile": spec.profile, "flags": spec.flags}


def test_engine_key_agrees_with_export_and_stale_engines_are_refused():
    gpu = {"name": "NVIDIA L4", "compute_capability": "8.9"}
    fields = dict(component="unet", precision="fp16", onnx_sha256="a" * 64, tensorrt_version="10.3.0", gpu=dict(gpu),
                  profile={"sample": [[1, 4, 8, 8], [2, 4, 8, 8], [8, 4, 16, 16]]}, flags={"static": False, "fp16": False})
    record = engine_record(dict(fields))
    records = {record["key"]: record}
    assert tensorrt_backend.select_engine("unet", "fp16", records, "a" * 64, "10.3.0", gpu) is record
    for args, message in [
        (("a" * 64, "10.0.1", gpu), "built for TensorRT 10.3.0, this is 10.0.1"),
        (("a" * 64, "10.3.0", {**gpu, "name": "NVIDIA A100"}), "built for GPU"),
        (("b" * 64, "10.3.0", gpu), "built for another ONNX file or build settings"),
    ]:
        with pytest.raises(ArtifactError, match=message) as info:
            tensorrt_backend.select_engine("unet", "fp16", records, *args)
        assert "\n" not in str(info.value) and "use --backend onnxruntime" in str(info.value)
    with pytest.raises(BackendError, match="no fp32 TensorRT engine for unet"):
        tensorrt_backend.select_engine("unet", "fp32", records, "a" * 64, "10.3.0", gpu)


def test_session_options_and_providers():
    so = onnxruntime_backend.session_options()
    assert so.graph_optimization_level == ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    assert so.execution_mode == ort.ExecutionMode.ORT_SEQUENTIAL and so.enable_mem_pattern
    assert 1 <= so.intra_op_num_threads == base.physical_cores()
    assert so.get_session_config_entry("session.intra_op.allow_spinning") == "0"
    spinning = onnxruntime_backend.session_options(base.HostOptions(threads=3, spin=True))
    assert spinning.intra_op_num_threads == 3 and spinning.get_session_config_entry("session.intra_op.allow_spinning") == "1"
    # A pool never keeps spinning after its call, where it would slow the next session's.
    assert spinning.get_session_config_entry("session.force_spinning_stop") == "1"
    assert onnxruntime_backend.resolve_providers(["cpu"]) == ["CPUExecutionProvider"]
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        assert onnxruntime_backend.resolve_providers(None) == ["CPUExecutionProvider"]
        with pytest.raises(BackendError, match="onnxruntime has no CUDAExecutionProvider"):
            onnxruntime_backend.resolve_providers(["cuda"])


@pytest.mark.parametrize("count", [0, -2, 1.5, True, "4"])
def test_bad_thread_counts_are_refused(count):
    with pytest.raises(BackendError, match="threads must be a whole number >= 1"):
        base.HostOptions(threads=count)


def test_reduced_precision_is_a_bool():
    with pytest.raises(BackendError, match="reduced_precision must be True or False, got 'yes'"):
        base.HostOptions(reduced_precision="yes")


def test_thread_counts_are_bounded_by_the_host(monkeypatch):
    monkeypatch.setattr(base, "usable_cpus", lambda: 2)
    assert base.HostOptions(threads=8).threads == 8  # 4x oversubscribed is still allowed for experiments
    with pytest.raises(BackendError, match="^threads 9 is more than 4x the 2 CPUs this process may use; leave it out for one per physical core$"):
        base.HostOptions(threads=9)


def test_a_huge_thread_count_is_refused_by_the_cli_at_once(tmp_path):
    # It hung, memory growing, while ONNX Runtime built a pool of 100000 threads (issue 14).
    done = subprocess.run([sys.executable, "-m", "ldm_rt.runtime.cli", "sample", "--threads", "100000", "--out", str(tmp_path / "x.png")],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and done.stderr.count("\n") == 1 and "threads 100000 is more than 4x" in done.stderr, done.stderr
    assert not (tmp_path / "x.png").exists()


def test_cuda_asked_for_and_not_created_is_an_error(monkeypatch, caplog):
    """ONNX Runtime drops a CUDA provider it cannot create (libraries missing, driver too old) and runs on the CPU,
    saying so only in its own log; simulated here on a machine without a GPU."""
    real_session = ort.InferenceSession

    def falls_back(path, sess_options=None, providers=None):
        return real_session(path, sess_options=sess_options, providers=[p for p in providers if p != "CUDAExecutionProvider"])

    monkeypatch.setattr(ort, "get_available_providers", lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"])
    monkeypatch.setattr(ort, "InferenceSession", falls_back)
    with pytest.raises(BackendError) as info:
        Pipeline.load(providers=["cuda"])
    assert str(info.value).startswith("onnxruntime ") and "could not create its CUDA provider for text_encoder and fell back to the CPU" in str(info.value)
    assert str(info.value).endswith("; fix the CUDA install or use --provider cpu") and "\n" not in str(info.value)
    # Not asked for (the default picks CUDA where onnxruntime lists it): a warning, then the CPU.
    pipe = Pipeline.load()
    assert all(not c.on_cuda for c in pipe.components.values() if not isinstance(c, base.LazyComponent))  # the encoder: on first use
    assert caplog.text.count("could not create its CUDA provider") == 1


def test_missing_precision_names_the_fix(tmp_path):
    with pytest.raises(BackendError, match="has no fp16 text_encoder \\(built: fp32\\); rebuild with --fp16"):
        onnxruntime_backend.open_components(tmp_path, fake_manifest(), "fp16")


def test_placeholder_has_the_contract_dtype_and_no_memory():
    contract = build_contracts(FACTS, PROFILE)["unet"]
    p = base.placeholder_for(contract, "encoder_hidden_states", (2, 8, 16))
    assert p.dtype == np.float32 and p.shape == (2, 8, 16) and p.strides == (0, 0, 0)
