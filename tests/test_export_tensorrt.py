"""TensorRT engine building: profiles, names, cache keys, metadata, reuse, the missing-TensorRT error, and
the builder's TensorRT calls against fake TensorRT 10 and 11 modules (gpu_fakes.py).

Everything but the @pytest.mark.gpu tests runs without TensorRT, with a stand-in builder that writes a
fake plan or a fake tensorrt module; the GPU tests build and run a real engine and are skipped (with the
reason) elsewhere.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from gpu_fakes import PRECISION_FLAGS, tensorrt_10, tensorrt_11
from torch import nn

from ldm_rt.export.errors import ExportError, TensorRTUnavailable
from ldm_rt.export.onnx_export import export_component
from ldm_rt.export.parity import ort_session
from ldm_rt.export.tensorrt_build import (
    GpuInfo,
    TensorRTInfo,
    build_engine,
    build_plan,
    engine_profile,
    engine_spec,
    probe_tensorrt,
)
from ldm_rt.runtime.backends import cuda_probe
from ldm_rt.runtime.backends.tensorrt_backend import TrtComponent
from ldm_rt.runtime.contracts import ModelFacts, ShapeProfile, build_contracts
from ldm_rt.runtime.manifest import sha256_file

FACTS = ModelFacts(
    latent_channels=4, latent_factor=8, unet_factor=8, unet_in_channels=4, unet_out_channels=4, context_length=77,
    context_dim=768, vocab_size=49408, num_classes=None, autoencoder_kind="kl", scale_factor=0.18215,
)  # fmt: skip
PROFILE = ShapeProfile((1, 1, 4), (512, 512, 768), (512, 768, 1024))
INFO = TensorRTInfo("10.3.0", GpuInfo("NVIDIA L4", "8.9"))


def contracts(profile: ShapeProfile = PROFILE):
    return build_contracts(FACTS, profile)


def test_profile_from_the_contract():
    p = engine_profile(contracts()["unet"])
    assert p["sample"] == [[1, 4, 64, 64], [2, 4, 64, 96], [8, 4, 96, 128]]  # UNet batch is 2x under guidance
    assert p["timestep"] == [[1], [2], [8]]
    assert p["encoder_hidden_states"] == [[1, 77, 768], [2, 77, 768], [8, 77, 768]]
    decoder = engine_profile(contracts()["vae_decoder"])
    assert decoder == {"latent": [[1, 4, 64, 64], [1, 4, 64, 96], [4, 4, 96, 128]]}
    encoder = engine_profile(contracts()["vae_encoder"])
    assert encoder == {"image": [[1, 3, 512, 512], [1, 3, 512, 768], [4, 3, 768, 1024]]}


def test_static_shape_profile_is_min_opt_max_equal():
    static = contracts(ShapeProfile.static(2, 512, 640))
    for name, contract in static.items():
        for shapes in engine_profile(contract, static=True).values():
            assert shapes[0] == shapes[1] == shapes[2], name
    assert engine_profile(static["unet"], static=True)["sample"][0] == [4, 4, 64, 80]


def test_cache_key_changes_when_any_input_changes():
    unet = contracts()["unet"]
    base = engine_spec(unet, "fp16", "a" * 64, INFO)
    variants = [
        engine_spec(unet, "fp16", "b" * 64, INFO),  # ONNX content
        engine_spec(unet, "fp16", "a" * 64, TensorRTInfo("10.4.0", INFO.gpu)),  # TensorRT version
        engine_spec(unet, "fp16", "a" * 64, TensorRTInfo(INFO.version, GpuInfo("NVIDIA A100", "8.9"))),  # GPU
        engine_spec(unet, "fp16", "a" * 64, TensorRTInfo(INFO.version, GpuInfo("NVIDIA L4", "9.0"))),  # compute cap.
        engine_spec(unet, "fp32", "a" * 64, INFO),  # precision
        engine_spec(contracts(ShapeProfile((1, 1, 2), PROFILE.height, PROFILE.width))["unet"], "fp16", "a" * 64, INFO),
        engine_spec(unet, "fp16", "a" * 64, INFO, static=True),  # profile + flag
        engine_spec(unet, "fp16", "a" * 64, INFO, refit=True),  # builder flag
    ]
    keys = [base.key] + [v.key for v in variants]
    assert len(set(keys)) == len(keys)
    assert engine_spec(unet, "fp16", "a" * 64, INFO).key == base.key  # and is deterministic
    # Both precisions strongly typed: the types are the ONNX graph's; no precision flag is part of any build.
    assert base.flags == {"strongly_typed": True, "refittable": False, "static": False}
    assert engine_spec(unet, "fp32", "a" * 64, INFO).flags["strongly_typed"]


def test_engine_file_name_carries_component_precision_and_key():
    spec = engine_spec(contracts()["vae_decoder"], "fp32", "c" * 64, INFO)
    assert spec.stem == f"vae_decoder.fp32.{spec.key[:16]}"
    assert len(spec.key) == 64


class FakeBuilder:
    """Stands in for polygraphy: writes a plan whose bytes name the spec; counts the builds."""

    def __init__(self) -> None:
        self.built: list[str] = []

    def __call__(self, onnx_path: Path, spec, plan_path: Path, timing_cache) -> None:
        self.built.append(spec.key)
        plan_path.write_bytes(b"PLAN " + spec.key.encode())


def test_metadata_reuse_and_rebuild_of_stale_engines(tmp_path):
    onnx_file = tmp_path / "unet.onnx"
    onnx_file.write_bytes(b"onnx")
    spec = engine_spec(contracts()["unet"], "fp32", sha256_file(onnx_file), INFO)
    builder = FakeBuilder()

    first = tmp_path / "build1" / "engines"
    record = build_engine(onnx_file, spec, first, builder=builder)
    plan = first / f"{spec.stem}.plan"
    meta = json.loads(plan.with_suffix(".json").read_text())
    assert meta["key"] == spec.key and meta["spec"] == spec.to_dict()
    assert meta["sha256"] == sha256_file(plan) and meta["bytes"] == plan.stat().st_size
    assert record["key"] == spec.key and record["engine"]["file"] == f"engines/{spec.stem}.plan"
    assert record["profile"] == spec.profile and record["gpu"] == {"name": "NVIDIA L4", "compute_capability": "8.9"}
    assert builder.built == [spec.key]

    # Same key: copied from the earlier build, not rebuilt.
    second = tmp_path / "build2" / "engines"
    build_engine(onnx_file, spec, second, reuse_from=[first], builder=builder)
    assert builder.built == [spec.key]
    assert (second / plan.name).read_bytes() == plan.read_bytes()

    # Another TensorRT version: the old engine is stale and never loaded; a new one is built.
    newer = dataclasses.replace(spec, tensorrt_version="10.4.0")
    third = tmp_path / "build3" / "engines"
    build_engine(onnx_file, newer, third, reuse_from=[first], builder=builder)
    assert builder.built == [spec.key, newer.key]
    assert [p.name for p in third.glob("*.plan")] == [f"{newer.stem}.plan"]

    # A plan that no longer matches its recorded hash is rebuilt, not trusted.
    plan.write_bytes(b"corrupted")
    build_engine(onnx_file, spec, tmp_path / "build4" / "engines", reuse_from=[first], builder=builder)
    assert builder.built == [spec.key, newer.key, spec.key]

    # Metadata that is not a JSON object (a list, as a foreign tool might leave) means rebuild, not a crash.
    plan.with_suffix(".json").write_text("[1, 2]")
    build_engine(onnx_file, spec, tmp_path / "build5" / "engines", reuse_from=[first], builder=builder)
    assert builder.built == [spec.key, newer.key, spec.key, spec.key]


def test_missing_tensorrt_is_the_one_line_error(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # import tensorrt -> ImportError
    with pytest.raises(TensorRTUnavailable) as e:
        probe_tensorrt(tmp_path / "art")
    assert str(e.value) == (
        "TensorRT/CUDA not found: the tensorrt package is not installed; the exported ONNX models in "
        f"{tmp_path / 'art'} run with the ONNX Runtime backend (`ldm-rt sample --model {tmp_path / 'art'}`)"
    )


@pytest.mark.parametrize("trt_module", [tensorrt_10, tensorrt_11], ids=["tensorrt10", "tensorrt11"])
@pytest.mark.parametrize("precision", ["fp32", "fp16"])
@pytest.mark.parametrize("refit", [False, True])
def test_no_build_requests_a_precision_flag(tmp_path, trt_module, precision, refit):
    # TensorRT 11 removed FP16/BF16/INT8/... (the fake has only 11's members: asking for one is an AttributeError);
    # fp16 engines come from the fp16 ONNX as strongly typed networks, on 10 as on 11.
    trt = trt_module()
    spec = engine_spec(contracts()["unet"], precision, "a" * 64, INFO, refit=refit)
    plan, cache = build_plan(trt, tmp_path / "unet.onnx", spec, b"old")
    assert plan.startswith(b"PLAN") and cache == b"old+timings"
    assert trt.log.network_flags == [1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)]
    assert not PRECISION_FLAGS & set(trt.log.set_flags)
    assert trt.log.set_flags == (["REFIT"] if refit else [])
    assert trt.log.cleared_flags == (["TF32"] if "TF32" in trt.BuilderFlag.__members__ else [])
    assert trt.log.shapes == {name: tuple(map(tuple, s)) for name, s in spec.profile.items()}
    assert trt.log.parsed == [str(tmp_path / "unet.onnx")]


def test_the_tensorrt_builder_writes_the_plan_and_the_timing_cache(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", tensorrt_11())
    onnx_file = tmp_path / "unet.onnx"
    onnx_file.write_bytes(b"onnx")
    cache = tmp_path / "timing.cache"
    spec = engine_spec(contracts()["unet"], "fp16", sha256_file(onnx_file), INFO)
    record = build_engine(onnx_file, spec, tmp_path / "out" / "engines", timing_cache=cache)
    assert (tmp_path / "out" / record["engine"]["file"]).read_bytes().startswith(b"PLAN")
    assert cache.read_bytes() == b"+timings"
    build_engine(onnx_file, spec, tmp_path / "again" / "engines", timing_cache=cache)  # the cache is read back
    assert sys.modules["tensorrt"].log.timing_cache_in == [b"", b"+timings"]
    assert cache.read_bytes() == b"+timings+timings"


def test_an_onnx_file_tensorrt_cannot_parse_is_one_line(tmp_path, monkeypatch):
    from gpu_fakes import TRT10_BUILDER_FLAGS, fake_tensorrt

    trt = fake_tensorrt("10.13.3.9", TRT10_BUILDER_FLAGS, ("EXPLICIT_BATCH", "STRONGLY_TYPED"), parse_errors=("bad node Foo",))
    monkeypatch.setitem(sys.modules, "tensorrt", trt)
    spec = engine_spec(contracts()["unet"], "fp32", "a" * 64, INFO)
    with pytest.raises(ExportError) as info:
        build_engine(tmp_path / "unet.onnx", spec, tmp_path / "engines")
    assert str(info.value) == "TensorRT cannot parse unet.onnx: bad node Foo; build with --onnx-only (ONNX Runtime runs it)"
    assert not list((tmp_path / "engines").glob("*"))


class TinyDecoder(nn.Module):
    """latent (B, 4, h, w) -> image (B, 3, 8h, 8w): enough structure for a dynamic-shape engine."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(4, 3, 3, padding=1)

    def forward(self, latent: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.interpolate(self.conv(latent), scale_factor=8.0, mode="nearest")


@pytest.mark.gpu
@pytest.mark.parametrize("static", [False, True])
def test_gpu_builds_and_runs_a_tiny_engine(tmp_path, static):
    from polygraphy.backend.common import BytesFromPath
    from polygraphy.backend.trt import EngineFromBytes, TrtRunner

    contract = contracts(ShapeProfile((1, 1, 2), (64, 64, 128), (64, 64, 128)))["vae_decoder"]
    onnx_file = tmp_path / "vae_decoder.onnx"
    export_component(TinyDecoder().eval(), contract, onnx_file)
    info = probe_tensorrt(tmp_path)
    spec = engine_spec(contract, "fp32", sha256_file(onnx_file), info, static=static)
    record = build_engine(onnx_file, spec, tmp_path / "engines")
    latent = np.random.default_rng(0).standard_normal((1, 4, 8, 8)).astype(np.float32)
    (want,) = ort_session(onnx_file).run(None, {"latent": latent})
    plan = tmp_path / record["engine"]["file"]
    with TrtRunner(EngineFromBytes(BytesFromPath(str(plan)))) as runner:  # polygraphy: an independent runner
        got = runner.infer({"latent": latent})["image"]
    np.testing.assert_allclose(got, want, atol=1e-3)
    # The runtime's own TensorRT path on the same engine (static: through a CUDA graph, replayed), then freed.
    trt, cudart = cuda_probe.probe()
    engine = trt.Runtime(trt.Logger(trt.Logger.WARNING)).deserialize_cuda_engine(plan.read_bytes())
    with TrtComponent(trt, cudart, engine, contract, record["profile"], use_cuda_graph=static) as component:
        for _ in range(2):
            np.testing.assert_allclose(component.run({"latent": latent})["image"], want, atol=1e-3)
