"""Parts of the export toolchain on small inputs: parity points and failures, graph clean-up, Triton
configs with engines, source hashing and model facts."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from google.protobuf import text_format
from tiny_models import make_tiny_ldm_rt_model
from torch import nn
from tritonclient.grpc import model_config_pb2

from ldm_rt.export import graph_cleanup, sources
from ldm_rt.export.errors import ExportError, ParityError, SourceError
from ldm_rt.export.graph_cleanup import clean_model
from ldm_rt.export.memory import GraphMemory
from ldm_rt.export.onnx_export import export_component
from ldm_rt.export.parity import check_onnx, format_table, parity_points, plan_parity, reference_cases, sample_sets
from ldm_rt.export.sources import load_source, weights_sha256
from ldm_rt.export.tensorrt_build import GpuInfo, TensorRTInfo, build_engine, engine_spec
from ldm_rt.export.triton_repo import config_pbtxt, write_triton_repo
from ldm_rt.reference.export_wrappers import export_wrappers
from ldm_rt.runtime.contracts import ComponentContract, Dim, ModelFacts, ShapeProfile, TensorSpec, Tolerance, build_contracts
from ldm_rt.runtime.manifest import ComponentEntry, FileEntry, Manifest, PrecisionEntry

FACTS = ModelFacts(4, 8, 8, 4, 4, 77, 768, 49408, 10, "kl", 0.18215)


def toy_contract() -> ComponentContract:
    return ComponentContract(
        name="vae_decoder",
        inputs=(TensorSpec("latent", "float32", ("batch", 4, "latent_height", "latent_width")),),
        outputs=(TensorSpec("image", "float32", ("batch", 3, "scale:latent_height:2", "scale:latent_width:2")),),
        dims=(Dim("batch", 1, 1, 3), Dim("latent_height", 4, 8, 12, 2), Dim("latent_width", 4, 8, 12, 2)),
        tolerance={"fp32": Tolerance(1e-4), "fp16": Tolerance(2e-2, 1e-2)},
    )


class ToyDecoder(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.norm = nn.GroupNorm(2, 4)
        self.conv = nn.Conv2d(4, 3, 3, padding=1)

    def forward(self, latent: torch.Tensor) -> torch.Tensor:
        return nn.functional.interpolate(self.conv(self.norm(latent)), scale_factor=2.0, mode="nearest")


def write_toy_manifest(art, entry: ComponentEntry) -> None:
    """A finished artifacts folder around the toy decoder's entry (with an empty scheduler config)."""
    (art / "scheduler_config.json").write_text("{}")
    Manifest(
        facts=FACTS, profile=ShapeProfile(), components={"vae_decoder": entry}, tokenizer=None,
        scheduler=FileEntry.of(art, "scheduler_config.json"), source={}, tools={},
    ).write(art)  # fmt: skip


def test_parity_points_cover_min_opt_max_and_an_odd_legal_size():
    points = parity_points(toy_contract())
    assert points[:3] == [
        {"batch": 1, "latent_height": 4, "latent_width": 4},
        {"batch": 1, "latent_height": 8, "latent_width": 8},
        {"batch": 3, "latent_height": 12, "latent_width": 12},
    ]
    odd = points[3]
    assert odd == {"batch": 2, "latent_height": 6, "latent_width": 6}  # 6 = 3 x the step 2, inside the range
    unet = build_contracts(FACTS, ShapeProfile((1, 1, 4), (512, 512, 1024), (512, 768, 1024)))["unet"]
    odd = parity_points(unet)[-1]
    assert odd["unet_batch"] == 3 and odd["latent_height"] == 72  # 9 x 8: odd multiple of the UNet factor
    # A static profile has nothing in between: the points collapse to the one or two real shapes.
    static = build_contracts(FACTS, ShapeProfile.static(1, 512, 512))
    assert parity_points(static["vae_decoder"]) == [{"batch": 1, "latent_height": 64, "latent_width": 64}]
    assert len(parity_points(static["unet"])) == 2  # uncond-only batch 1 and the guided batch 2


def test_parity_passes_for_a_faithful_export_and_fails_in_one_line_for_a_wrong_one(tmp_path):
    contract, model = toy_contract(), ToyDecoder().eval()
    path = tmp_path / "vae_decoder.onnx"
    export_component(model, contract, path)
    cases = reference_cases(model, contract, sample_sets(contract))
    good = check_onnx(path, contract, "fp32", cases)
    assert good.passed and max(good.max_abs_err) < 1e-5
    assert [s["latent"][0] for s in good.shapes] == [1, 1, 3, 2]

    proto = onnx.load(str(path))
    for t in proto.graph.initializer:
        if t.name.endswith("conv.bias"):
            bias = onnx.numpy_helper.to_array(t) + np.float32(1e-3)  # a 1e-3 shift: small, but 10x the bound
            t.CopyFrom(onnx.numpy_helper.from_array(bias.astype(np.float32), t.name))
    onnx.save(proto, str(path))
    bad = check_onnx(path, contract, "fp32", cases)
    assert not bad.passed
    with pytest.raises(ParityError) as e:
        bad.raise_if_failed("report it")
    line = str(e.value)
    assert "\n" not in line
    for part in ("vae_decoder", "fp32", "latent=1x4x4x4", "max abs error 0.001", "bound 0.0001", "report it"):
        assert part in line, part
    table = format_table([good, bad])
    assert table.count("\n") == 3 and "NO" in table.splitlines()[-1]


def test_parity_sessions_are_configured_as_the_runtime_configures_its_own(tmp_path):
    # Issue 15: thread count, optimisation level and execution mode change ONNX Runtime's rounding; parity
    # must check the sessions the runtime will run, not ones configured on their own.
    from ldm_rt.export.parity import ort_session
    from ldm_rt.runtime.backends.base import HostOptions
    from ldm_rt.runtime.backends.onnxruntime_backend import session_options

    path = tmp_path / "vae_decoder.onnx"
    export_component(ToyDecoder().eval(), toy_contract(), path)
    got, want = ort_session(path).get_session_options(), session_options(HostOptions())
    for name in ("graph_optimization_level", "intra_op_num_threads", "execution_mode", "enable_mem_pattern", "log_severity_level"):
        assert getattr(got, name) == getattr(want, name), name
    for key in ("session.intra_op.allow_spinning", "session.force_spinning_stop"):
        assert got.get_session_config_entry(key) == want.get_session_config_entry(key), key


@pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning")
def test_cleanup_removes_shape_arithmetic_and_keeps_the_function(tmp_path):
    contract, model = toy_contract(), ToyDecoder().eval()
    path = tmp_path / "raw.onnx"
    with torch.no_grad():
        torch.onnx.export(
            model, (torch.randn(1, 4, 8, 8),), str(path), dynamo=False, opset_version=17,
            input_names=["latent"], output_names=["image"], dynamic_axes=contract.dynamic_axes(),
            do_constant_folding=False,
        )  # fmt: skip
    raw = onnx.load(str(path))
    clean = clean_model(raw)
    assert len(clean.graph.node) < len(raw.graph.node)
    assert not any(n.op_type in ("Identity", "Constant") for n in clean.graph.node)
    onnx.checker.check_model(clean, full_check=True)
    x = np.random.default_rng(1).standard_normal((2, 4, 6, 10)).astype(np.float32)
    run = [ort.InferenceSession(m.SerializeToString()).run(None, {"latent": x})[0] for m in (raw, clean)]
    np.testing.assert_allclose(run[0], run[1], atol=1e-6)


def test_config_pbtxt_for_every_contract_parses():
    for name, contract in build_contracts(FACTS, ShapeProfile()).items():
        text = config_pbtxt(name, "onnxruntime_onnx", contract)
        config = text_format.Parse(text, model_config_pb2.ModelConfig())
        assert [t.name for t in config.input] == [t.name for t in contract.inputs]
        if name == "unet":  # the class-conditional UNet has an int64 label input
            labels = next(t for t in config.input if t.name == "class_labels")
            assert labels.data_type == model_config_pb2.TYPE_INT64 and list(labels.dims) == [-1]
        if name == "text_encoder":
            assert list(config.input[0].dims) == [-1, 77]


def test_triton_repository_adds_tensorrt_plans_when_engines_exist(tmp_path):
    contract, model = toy_contract(), ToyDecoder().eval()
    art = tmp_path / "art"
    export_component(model, contract, art / "onnx" / "fp32" / "vae_decoder.onnx")
    onnx_entry = FileEntry.of(art, "onnx/fp32/vae_decoder.onnx")
    info = TensorRTInfo("10.3.0", GpuInfo("NVIDIA L4", "8.9"))
    spec = engine_spec(contract, "fp32", onnx_entry.sha256, info)

    def fake_builder(onnx_path, spec, plan_path, timing_cache):
        plan_path.write_bytes(b"plan")

    record = build_engine(art / onnx_entry.file, spec, art / "engines", builder=fake_builder)
    entry = ComponentEntry(contract, {"fp32": PrecisionEntry(onnx_entry)}, {record["key"]: record})
    write_toy_manifest(art, entry)
    repo = tmp_path / "triton"
    assert write_triton_repo(art, repo) == ["vae_decoder", "vae_decoder_trt_fp32"]
    config = text_format.Parse((repo / "vae_decoder_trt_fp32" / "config.pbtxt").read_text(), model_config_pb2.ModelConfig())
    assert config.platform == "tensorrt_plan" and config.max_batch_size == 0
    assert list(config.output[0].dims) == [-1, 3, -1, -1]
    assert (repo / "vae_decoder_trt_fp32" / "1" / "model.plan").read_bytes() == b"plan"


def test_missing_default_model_is_a_source_error(tmp_path, monkeypatch):
    monkeypatch.setattr(sources, "default_model_dir", lambda: tmp_path / "engines" / "default" / "model")
    with pytest.raises(SourceError, match="the shipped default model is missing .*; pass --model"):
        load_source(None)


def test_source_hash_facts_and_errors(tmp_path):
    model = make_tiny_ldm_rt_model(tmp_path / "model")
    source = load_source(model)
    assert source.kind == "ldm-rt" and source.name == "model"
    assert source.facts == ModelFacts(4, 2, 2, 4, 4, 16, 32, source.loaded.tokenizer.vocab_size, None, "kl", 0.18215)
    profile = ShapeProfile((1, 1, 1), (8, 8, 8), (8, 8, 8))
    assert set(export_wrappers(source.loaded.model)) == set(build_contracts(source.facts, profile))
    # The hash covers the weights, not the configs: a config edit keeps it, a weight edit changes it.
    copy = tmp_path / "copy"
    shutil.copytree(model, copy)
    (copy / "scheduler_config.json").write_text("{}")
    assert weights_sha256(copy) == source.sha256
    with open(copy / "unet.safetensors", "ab") as f:
        f.write(b" ")
    assert weights_sha256(copy) != source.sha256


class WideToy(nn.Module):
    """Like ToyDecoder, with weights above onnx's 1 kB inline threshold (which keeps shape constants inline)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.norm = nn.GroupNorm(2, 4)
        self.widen = nn.Conv2d(4, 32, 3, padding=1)  # 1152 weights
        self.conv = nn.Conv2d(32, 3, 3, padding=1)

    def forward(self, latent: torch.Tensor) -> torch.Tensor:
        return nn.functional.interpolate(self.conv(self.widen(self.norm(latent))), scale_factor=2.0, mode="nearest")


def test_large_models_get_one_external_data_file(tmp_path, monkeypatch):
    # Pretend the 2 GiB protobuf limit is 1 kB, so the toy's ~8 kB of weights must go to external data.
    monkeypatch.setattr(graph_cleanup, "PROTO_LIMIT_BYTES", 1024)
    contract, model = toy_contract(), WideToy().eval()
    path = tmp_path / "onnx" / "vae_decoder.onnx"
    files = export_component(model, contract, path)
    assert files == [path, path.with_name("vae_decoder.onnx.data")]
    assert sorted(p.name for p in path.parent.iterdir()) == ["vae_decoder.onnx", "vae_decoder.onnx.data"]
    assert files[1].stat().st_size > 4 * 1152  # the big weights live in the .data file
    cases = reference_cases(model, contract, sample_sets(contract))
    assert check_onnx(path, contract, "fp32", cases).passed

    # The Triton copy keeps the data file's name: model.onnx refers to it by that relative location.
    art = tmp_path
    entry = ComponentEntry(contract, {"fp32": PrecisionEntry(FileEntry.of(art, "onnx/vae_decoder.onnx"))})
    write_toy_manifest(art, entry)
    write_triton_repo(art, tmp_path / "triton")
    version = tmp_path / "triton" / "vae_decoder" / "1"
    assert sorted(p.name for p in version.iterdir()) == ["model.onnx", "vae_decoder.onnx.data"]
    (got,) = ort.InferenceSession(str(version / "model.onnx")).run(None, cases[0].inputs)
    np.testing.assert_allclose(got, cases[0].reference, atol=1e-4)


def test_lora_targets_are_found_in_external_weights_read_a_tensor_at_a_time(tmp_path, monkeypatch):
    """Past 2 GiB the weights live in the .data file: the LoRA target index reads them a tensor at a time (the
    model is never loaded with its external data) and finds each weight there by content."""
    from ldm_rt.export import lora_targets

    monkeypatch.setattr(graph_cleanup, "PROTO_LIMIT_BYTES", 1024)
    model = WideToy().eval()
    path = tmp_path / "vae_decoder.onnx"
    assert export_component(model, toy_contract(), path)[1].name == "vae_decoder.onnx.data"
    asked = []
    load = onnx.load
    monkeypatch.setattr(lora_targets.onnx, "load", lambda f, **kw: asked.append(kw.get("load_external_data", True)) or load(f, **kw))
    weights = {m: getattr(model, m).weight.detach().numpy() for m in ("widen", "conv")}
    found = lora_targets.locate(path, weights)
    assert asked == [False]
    assert sorted(found) == ["conv", "widen"] and all(not t.transposed for t in found.values())
    by_name = {t.name: t for t in onnx.load(str(path), load_external_data=False).graph.initializer}
    assert all(by_name[t.initializer].data_location == onnx.TensorProto.EXTERNAL for t in found.values())
    wrong = {"widen": weights["widen"] + 1e-3}  # one changed value: not found
    assert lora_targets.locate(path, wrong) == {}


def test_parity_plan_shrinks_a_point_that_does_not_fit_the_memory_budget():
    contract = toy_contract()  # batch 1..3, latent 4..12 in steps of 2

    def estimate(shapes):  # bytes of the float32 input: a stand-in that grows with every dim
        return 4 * int(np.prod(shapes["latent"]))

    roomy = plan_parity(contract, estimate, budget=1 << 30)
    assert roomy.points == parity_points(contract) and roomy.note is None
    assert roomy.largest == {"batch": 3, "latent_height": 12, "latent_width": 12}
    tight = plan_parity(contract, estimate, budget=4 * 2 * 4 * 8 * 8)
    # The maximum (3x4x12x12) is replaced by the largest point towards the minimum that fits: 2x4x8x8.
    assert tight.points == [
        {"batch": 1, "latent_height": 4, "latent_width": 4},
        {"batch": 1, "latent_height": 8, "latent_width": 8},
        {"batch": 2, "latent_height": 8, "latent_width": 8},
        {"batch": 2, "latent_height": 6, "latent_width": 6},
    ]
    assert tight.largest == {"batch": 2, "latent_height": 8, "latent_width": 8}
    assert tight.note == (
        "parity at the profile's maximum (latent=3x4x12x12) would need about 6.44e-06 GiB, more than the "
        "1.91e-06 GiB it may use; checked at latent=2x4x8x8 instead"
    )
    assert tight.to_dict() == {"largest_checked": tight.largest, "bounded": tight.note}
    with pytest.raises(ExportError, match=r"vae_decoder: a parity check at the profile's minimum \(latent=1x4x4x4\)"):
        plan_parity(contract, estimate, budget=100)
    unknown = plan_parity(contract, None, budget=1 << 30)  # no estimate: nothing above opt
    assert unknown.largest == {"batch": 1, "latent_height": 8, "latent_width": 8} and "could not be estimated" in unknown.note


@pytest.fixture(scope="module")
def tiny_vae_decoder_onnx(tmp_path_factory):
    """The tiny ldm-rt model's VAE decoder (with its mid-block attention) exported to ONNX."""
    root = tmp_path_factory.mktemp("graph_memory")
    source = load_source(make_tiny_ldm_rt_model(root / "model"))
    contract = build_contracts(source.facts, ShapeProfile((1, 1, 2), (8, 16, 24), (8, 16, 24)))["vae_decoder"]
    path = root / "vae_decoder.onnx"
    export_component(export_wrappers(source.loaded.model)["vae_decoder"], contract, path)
    return path


def test_graph_memory_grows_with_the_square_of_the_attention_length(tiny_vae_decoder_onnx):
    graph = GraphMemory(tiny_vae_decoder_onnx)
    small, large = (graph.peak_bytes({"latent": (1, 4, n, n)}) for n in (32, 64))
    # 4x the pixels: 4x for convolutions alone; the (hw x hw) attention scores make it nearer 16x.
    assert 8 < large / small < 17
    assert graph.peak_bytes({"latent": (2, 4, 64, 64)}) == pytest.approx(2 * large, rel=0.01)
    assert graph.weight_bytes > 0


MEASURE_RUN = """
import sys, numpy as np
from pathlib import Path
from ldm_rt.export.parity import ort_session

def kib(field):  # from /proc/self/status
    return int(next(l for l in open("/proc/self/status") if l.startswith(field)).split()[1])

session = ort_session(sys.argv[1])
x = np.ones(tuple(int(n) for n in sys.argv[2:]), np.float32)
Path("/proc/self/clear_refs").write_text("5")  # the peak RSS (VmHWM) starts again from the current RSS
before = kib("VmRSS:")
session.run(None, {"latent": x})
print(1024 * (kib("VmHWM:") - before))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads the peak RSS from Linux's /proc/self/status")
def test_graph_memory_is_not_below_what_onnx_runtime_uses(tiny_vae_decoder_onnx):
    """Measured in a fresh process: the peak RSS that one run at 96x96 latents adds stays under the estimate
    (here the estimate is about 2x the measured use)."""
    shape = (1, 4, 96, 96)
    args = [sys.executable, "-c", MEASURE_RUN, str(tiny_vae_decoder_onnx), *map(str, shape)]
    used = int(subprocess.run(args, capture_output=True, text=True, check=True, timeout=120).stdout)
    estimate = GraphMemory(tiny_vae_decoder_onnx).peak_bytes({"latent": shape})
    assert 100 << 20 < used <= estimate, (used, estimate)


def test_default_parity_budget_counts_what_each_phase_holds(tiny_vae_decoder_onnx, monkeypatch):
    """The default budget (a share of the available memory) against what one parity case needs: the weights of its
    heavier phase (an ONNX Runtime session's copies, or the torch model's, 1.5x with the fp16 search's float16
    copy; never both) and the activations. A point that needs just over the budget is shrunk, one just under not."""
    from types import SimpleNamespace

    from ldm_rt.export import memory
    from ldm_rt.export.build import BuildOptions, _plan

    contract = toy_contract()
    graph = GraphMemory(tiny_vae_decoder_onnx)
    # Weights in the .onnx file, most of them Conv weights: two or three copies each in an open session.
    assert 2 * graph.weight_bytes < graph.session_weight_bytes <= 3 * graph.weight_bytes
    top = {"latent": (3, 4, 12, 12)}  # the profile's maximum
    need = graph.session_weight_bytes + graph.peak_bytes(top)
    assert memory.run_bytes(graph, top) == memory.run_bytes(graph, top, memory.TORCH_WEIGHT_COPIES_FP16) == need

    def plan(available: int):
        monkeypatch.setattr(memory, "available_memory", lambda: available)
        return _plan(tiny_vae_decoder_onnx, contract, BuildOptions(progress=False), [])

    enough = plan(int(need / memory.MEMORY_FRACTION) + 100)
    assert enough.note is None and enough.largest == {"batch": 3, "latent_height": 12, "latent_width": 12}
    assert "would need about" in plan(int(need / memory.MEMORY_FRACTION) - 100).note
    # A UNet-like graph (weights in a .data file, mostly MatMul's): the torch phase is the heavier with fp16.
    unet_like = SimpleNamespace(weight_bytes=1000, session_weight_bytes=1100, peak_bytes=lambda shapes: 7)
    assert memory.run_bytes(unet_like, top) == 1107
    assert memory.run_bytes(unet_like, top, memory.TORCH_WEIGHT_COPIES_FP16) == 1507


def test_triton_repository_is_rebuilt_only_over_its_own_folder(tmp_path):
    contract, model = toy_contract(), ToyDecoder().eval()
    art = tmp_path / "art"
    export_component(model, contract, art / "onnx" / "fp32" / "vae_decoder.onnx")
    entry = ComponentEntry(contract, {"fp32": PrecisionEntry(FileEntry.of(art, "onnx/fp32/vae_decoder.onnx"))})
    write_toy_manifest(art, entry)
    repo = tmp_path / "triton"
    for _ in range(2):  # the second run replaces the first: the folder is ours
        assert write_triton_repo(art, repo) == ["vae_decoder"]
    marker = json.loads((repo / "ldm_rt_triton.json").read_text())
    assert marker["format"] == "ldm-rt-triton-repository" and marker["models"] == ["vae_decoder"]
    (repo / "ldm_rt_triton.json").unlink()  # now it could be anyone's repository
    with pytest.raises(ExportError, match="not an ldm-rt Triton model repository; refusing to replace it"):
        write_triton_repo(art, repo)
    assert sorted(p.name for p in repo.iterdir()) == ["vae_decoder"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["art", "triton"]  # no lock file or temp left
