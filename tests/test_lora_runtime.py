"""LoRA at the edges: the CLIs (`ldm-rt sample --lora`, `build_engines.py --lora`) and their bad input (a LoRA for
another architecture, a truncated file, a scale that is not a number, a pickle: one line, exit 2, nothing
written), backends that cannot apply LoRAs, patched weights reaching every ONNX Runtime graph optimisation
(weights in the file or in external data), `ldm-rt info --lora`, and the TensorRT refit against a fake
`tensorrt` (unverified on a GPU)."""

from __future__ import annotations

import json
import pickle
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image
from test_lora_formats import write_safetensors
from test_runtime_fixtures import exported

from ldm_rt.runtime.backends.base import BackendError
from ldm_rt.runtime.artifacts import default_artifacts_dir
from ldm_rt.runtime.lora import LoraError, LoraTargets
from ldm_rt.runtime.manifest import ArtifactError

pytest.importorskip("torch")

Q = "input_blocks.1.1.transformer_blocks.0.attn1.to_q"


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory, tiny_sd_v1):
    return exported(tmp_path_factory, tiny_sd_v1, fp16=True)  # shared with the runtime and LoRA parity tests


@pytest.fixture(scope="module")
def loras(artifacts, tmp_path_factory):
    """A small kohya LoRA for the tiny SD v1 (named from the artifacts' own module table), and bad ones."""
    folder = tmp_path_factory.mktemp("lora_files")
    info = LoraTargets.read(artifacts).modules["unet"][Q]
    out_dim, in_dim = info.shape
    rng = np.random.default_rng(0)
    flat = "lora_unet_" + info.aliases[0].replace(".", "_")
    good = write_safetensors(folder / "good.safetensors", {
        f"{flat}.lora_down.weight": rng.standard_normal((2, in_dim)), f"{flat}.lora_up.weight": 3 * rng.standard_normal((out_dim, 2)),
        f"{flat}.alpha": np.float32(1.0),
    })  # fmt: skip
    sdxl = write_safetensors(folder / "sdxl.safetensors", {
        "lora_unet_input_blocks_4_1_transformer_blocks_0_attn2_to_k.lora_down.weight": rng.standard_normal((4, 2048)),
        "lora_unet_input_blocks_4_1_transformer_blocks_0_attn2_to_k.lora_up.weight": rng.standard_normal((640, 4)),
        "lora_te2_text_model_encoder_layers_0_mlp_fc1.lora_down.weight": rng.standard_normal((4, 1280)),
        "lora_te2_text_model_encoder_layers_0_mlp_fc1.lora_up.weight": rng.standard_normal((5120, 4)),
    })  # fmt: skip
    # The same module names at other widths (an SD 2.x LoRA on SD 1.x): the names match, the shapes do not.
    wider = write_safetensors(folder / "wider.safetensors", {
        f"{flat}.lora_down.weight": rng.standard_normal((2, 2 * in_dim)), f"{flat}.lora_up.weight": rng.standard_normal((out_dim, 2)),
    })  # fmt: skip
    truncated = folder / "truncated.safetensors"
    truncated.write_bytes(good.read_bytes()[:-16])
    pickled = folder / "evil.ckpt"
    pickled.write_bytes(pickle.dumps(SimpleNamespace(x=1)))  # not tensors: weights_only refuses it
    return SimpleNamespace(good=good, sdxl=sdxl, wider=wider, truncated=truncated, pickled=pickled)


BAD_CASES = ["another architecture", "another architecture, same names", "truncated", "scale not a number", "scale not finite", "pickle"]


def bad_inputs(loras) -> dict[str, tuple[str, str]]:
    """--lora value -> what the one line must say."""
    return {
        "another architecture": (str(loras.sdxl), "none of its 4 keys names a module of this model"),
        "another architecture, same names": (str(loras.wider), "a LoRA for another architecture"),
        "truncated": (str(loras.truncated), "truncated"),
        "scale not a number": (f"{loras.good}:lots", "scale 'lots' is not a number"),
        "scale not finite": (f"{loras.good}:nan", "must be a finite number"),
        "pickle": (str(loras.pickled), "pickle"),
    }


def test_sample_applies_a_lora_and_records_it_in_the_png(artifacts, loras, tmp_path, capsys):
    from ldm_rt.runtime.cli import main

    common = ["sample", "--model", str(artifacts), "--prompt", "a red car", "--steps", "2", "--seed", "1", "--height", "16", "--width", "16"]
    assert main([*common, "--out", str(tmp_path / "plain.png")]) == 0
    assert main([*common, "--lora", f"{loras.good}:0.8", "--out", str(tmp_path / "lora.png")]) == 0
    capsys.readouterr()
    with Image.open(tmp_path / "lora.png") as im:
        params = json.loads(im.text["parameters"])
        pixels = np.asarray(im.convert("RGB"))
    assert [(r["file"], r["scale"], r["applied"]) for r in params["loras"]] == [("good.safetensors", 0.8, "run time")]
    assert len(params["loras"][0]["sha256"]) == 64
    assert not np.array_equal(pixels, np.asarray(Image.open(tmp_path / "plain.png").convert("RGB")))


@pytest.mark.parametrize("case", BAD_CASES)
def test_sample_refuses_bad_loras_in_one_line(artifacts, loras, tmp_path, capsys, case):
    from ldm_rt.runtime.cli import main

    value, message = bad_inputs(loras)[case]
    out = tmp_path / "x.png"
    try:
        code = main(["sample", "--model", str(artifacts), "--prompt", "a cat", "--steps", "2", "--lora", value, "--out", str(out)])
    except SystemExit as e:
        code = e.code
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1 and message in err, err
    assert err.startswith("ldm-rt: error: ")
    assert not out.exists() and list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("case", BAD_CASES)
def test_export_refuses_bad_loras_in_one_line(tiny_sd_v1, loras, tmp_path, capsys, case):
    from ldm_rt.export.build_engines import main

    value, message = bad_inputs(loras)[case]
    out = tmp_path / "art"
    try:
        code = main(["--model", str(tiny_sd_v1), "--out", str(out), "--onnx-only", "--lora", value])
    except SystemExit as e:
        code = e.code
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and message in err[-1], err
    assert err[-1].startswith("build_engines.py: error: ")
    assert all("error" not in line for line in err[:-1])  # the rest are progress lines
    assert list(tmp_path.iterdir()) == []  # no output folder, no lock file, no leftovers


def test_backends_without_lora_support_refuse_them(artifacts, loras):
    from ldm_rt.runtime.backends.base import open_components
    from ldm_rt.runtime.lora import read_lora
    from ldm_rt.runtime.manifest import Manifest

    with pytest.raises(BackendError, match="backend 'torch' cannot apply LoRAs at run time"):
        open_components("torch", artifacts, Manifest.read(artifacts), loras=[(read_lora(loras.good), 1.0)])


@pytest.mark.parametrize("external", [False, True], ids=["weights in the file", "external data"])
def test_patched_weights_reach_every_graph_optimisation(tmp_path, external):
    """The backend loads the file's graph with its weights referred to in place and the patched ones given as
    external initializers (runtime/lora.external_model_bytes), so ONNX Runtime's NCHWc pass, which reorders Conv
    weights and ignores add_initializer overrides, sees the patched Conv; a MatMul's patched weight holds too."""
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    from ldm_rt.runtime.backends.onnxruntime_backend import EXTERNAL_FOLDER, open_session, session_options
    from ldm_rt.runtime.lora import external_model_bytes

    rng = np.random.default_rng(0)
    w, m = rng.standard_normal((16, 8, 3, 3)).astype(np.float32), rng.standard_normal((16, 16)).astype(np.float32)
    new = {"w": w + rng.standard_normal(w.shape).astype(np.float32), "m": m + rng.standard_normal(m.shape).astype(np.float32)}

    def model(weights: dict, path: Path, external: bool) -> Path:
        graph = helper.make_graph(
            [helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1]), helper.make_node("Transpose", ["c"], ["t"], perm=[0, 2, 3, 1]),
             helper.make_node("MatMul", ["t", "m"], ["y"])], "g",
            [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8, 16, 16])],
            [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 16, 16, 16])], [numpy_helper.from_array(v, k) for k, v in weights.items()],
        )  # fmt: skip
        onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path),
                  save_as_external_data=external, all_tensors_to_one_file=True, location=path.name + ".data", size_threshold=0)  # fmt: skip
        return path

    x = rng.standard_normal((1, 8, 16, 16)).astype(np.float32)
    expected = open_session(model(new, tmp_path / "new.onnx", False), session_options(), None).run(None, {"x": x})[0]
    base = model({"w": w, "m": m}, tmp_path / "base.onnx", external)
    options = session_options()
    options.add_session_config_entry(EXTERNAL_FOLDER, str(tmp_path))
    values = [ort.OrtValue.ortvalue_from_numpy(new[k]) for k in ("w", "m")]
    options.add_external_initializers(["w", "m"], values)
    got = open_session(base, options, None, model=external_model_bytes(base, {"w", "m"})).run(None, {"x": x})[0]
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)


class FakeRefitter:
    """trt.Refitter as documented: set_named_weights -> bool, get_missing_weights, refit_cuda_engine -> bool."""

    def __init__(self, engine, logger) -> None:
        self.engine = engine

    def set_named_weights(self, name, weights) -> bool:
        if name not in self.engine.refittable:
            return False
        self.engine.pending[name] = np.array(weights.array)
        return True

    def get_missing_weights(self) -> list[str]:
        return [n for n in self.engine.together if n not in self.engine.pending]

    def refit_cuda_engine(self) -> bool:
        self.engine.weights.update(self.engine.pending)
        return self.engine.refit_ok


def fake_trt():
    class Logger:
        WARNING = 2

        def __init__(self, severity) -> None:
            pass

    return SimpleNamespace(Refitter=FakeRefitter, Weights=lambda a: SimpleNamespace(array=a), Logger=Logger)


def test_tensorrt_refit_sets_every_weight_then_refits_once():
    from ldm_rt.runtime.backends.tensorrt_backend import refit_engine

    engine = SimpleNamespace(refittable={"a", "b"}, together=[], pending={}, weights={}, refit_ok=True)
    refit_engine(fake_trt(), engine, {"a": np.ones((2, 2), np.float16), "b": np.zeros(3, np.float32)}, "unet.plan")
    assert engine.weights["a"].dtype == np.float16 and set(engine.weights) == {"a", "b"}
    with pytest.raises(BackendError, match="cannot refit c"):
        refit_engine(fake_trt(), engine, {"c": np.ones(1, np.float32)}, "unet.plan")
    needy = SimpleNamespace(refittable={"a", "b"}, together=["b"], pending={}, weights={}, refit_ok=True)
    with pytest.raises(BackendError, match=r"needs weights the LoRA does not change \(b\)"):
        refit_engine(fake_trt(), needy, {"a": np.ones(1, np.float32)}, "unet.plan")
    refused = SimpleNamespace(refittable={"a"}, together=[], pending={}, weights={}, refit_ok=False)
    with pytest.raises(BackendError, match="refused the refit"):
        refit_engine(fake_trt(), refused, {"a": np.ones(1, np.float32)}, "unet.plan")


def refit_rig(artifacts: Path, tmp_path: Path, monkeypatch, precision: str, refittable: bool = True):
    """A copy of the artifacts with a fake engine file and manifest record per component (cache keys matching a
    fake GPU), and a fake `tensorrt` whose engines remember what they were refit with; (folder, manifest, trt)."""
    import shutil
    from dataclasses import asdict

    from gpu_fakes import FakeCudart
    from test_gpu_backend import install_cuda

    from ldm_rt.runtime.backends.tensorrt_backend import device_description, engine_key
    from ldm_rt.runtime.manifest import FileEntry, Manifest

    folder = Path(shutil.copytree(artifacts, tmp_path / "art"))
    manifest = Manifest.read(folder)
    cudart = FakeCudart()
    trt = fake_trt_module(cudart, {name: e.contract for name, e in manifest.components.items()})
    install_cuda(monkeypatch, cudart, trt=trt)
    gpu = device_description(cudart)
    flags = {"strongly_typed": True, "refittable": refittable, "static": False}
    for name, entry in manifest.components.items():
        plan = folder / "engines" / f"{name}.{precision}.plan"
        plan.parent.mkdir(exist_ok=True)
        plan.write_bytes(name.encode())  # the fake runtime deserialises the component named in the file
        onnx_sha = entry.precisions[precision].onnx.sha256
        entry.engines = {"k": {
            "key": engine_key(name, precision, onnx_sha, trt.__version__, gpu, {}, flags), "precision": precision,
            "engine": asdict(FileEntry.of(folder, plan.relative_to(folder).as_posix())), "tensorrt_version": trt.__version__,
            "gpu": gpu, "profile": {}, "flags": flags,
        }}  # fmt: skip
    return folder, manifest, trt


def fake_trt_module(cudart, contracts: dict):
    """gpu_fakes' tensorrt 11 with a Runtime (engines that remember their refits) and the Refitter above."""
    from gpu_fakes import FakeEngine, tensorrt_11

    trt = tensorrt_11()
    trt.engines = {}  # component -> the engine deserialised for it

    class Runtime:
        def __init__(self, logger) -> None:
            pass

        def deserialize_cuda_engine(self, data: bytes):
            name = data.decode()
            engine = FakeEngine(cudart, contracts[name])
            engine.refittable, engine.together, engine.pending, engine.weights, engine.refit_ok = _AllNames(), [], {}, {}, True
            trt.engines[name] = engine
            return engine

    trt.Runtime, trt.Refitter, trt.Weights = Runtime, FakeRefitter, lambda a: SimpleNamespace(array=a)
    return trt


class _AllNames:
    """Every weight name is refittable (an engine built with --refit from the ONNX file)."""

    def __contains__(self, name: str) -> bool:
        return True


def expected_q_weight(artifacts: Path, lora: Path, precision: str, scale: float) -> tuple[str, np.ndarray]:
    """(initializer, the weight a refit must set) for the test LoRA's one UNet module, computed here: the base
    weight read by the onnx package, the LoRA's layer by safetensors, W^T + scale * (alpha / rank) * (up @ down)^T."""
    import onnx
    from onnx import numpy_helper
    from safetensors.numpy import load_file

    from ldm_rt.runtime.manifest import Manifest

    rel = Manifest.read(artifacts).components["unet"].precisions[precision].onnx.file
    target = LoraTargets.read(artifacts).files[rel]["targets"][Q]
    assert target.transposed  # a bias-free Linear is exported as a MatMul on W^T
    model = onnx.load(str(artifacts / rel))
    base = next(numpy_helper.to_array(i) for i in model.graph.initializer if i.name == target.initializer)
    t = load_file(str(lora))
    down, up, alpha = (next(v for k, v in t.items() if k.endswith(s)) for s in (".lora_down.weight", ".lora_up.weight", ".alpha"))
    delta = scale * (float(alpha) / down.shape[0]) * (up.astype(np.float64) @ down)
    return target.initializer, (base.astype(np.float64) + delta.T).astype(base.dtype)


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_tensorrt_refits_the_adapted_weights_with_the_scale(artifacts, loras, tmp_path, monkeypatch, precision):
    from ldm_rt.runtime.backends.tensorrt_backend import open_components
    from ldm_rt.runtime.lora import read_lora

    folder, manifest, trt = refit_rig(artifacts, tmp_path, monkeypatch, precision)
    components = open_components(folder, manifest, precision, loras=[(read_lora(loras.good), 0.8)])
    assert set(components) == set(trt.engines) == set(manifest.components)
    init, expected = expected_q_weight(artifacts, loras.good, precision, 0.8)
    unet = trt.engines["unet"]
    assert list(unet.weights) == [init]  # the one adapted weight; nothing else is refit
    assert all(e.weights == {} for name, e in trt.engines.items() if name != "unet")
    got = unet.weights[init]
    assert got.dtype == expected.dtype and got.shape == expected.shape
    tol = 1e-5 if precision == "fp32" else 2e-3
    np.testing.assert_allclose(got.astype(np.float32), expected.astype(np.float32), rtol=tol, atol=tol)
    # The oracle tells the scale apart: the same weight at scale 0.4 is off by far more than the tolerance.
    _, half = expected_q_weight(artifacts, loras.good, precision, 0.4)
    assert np.abs(got.astype(np.float32) - half.astype(np.float32)).max() > 100 * tol
    for component in components.values():
        component.close()


def test_tensorrt_refuses_a_lora_for_an_engine_built_without_refit(artifacts, loras, tmp_path, monkeypatch):
    from ldm_rt.runtime.backends.tensorrt_backend import open_components
    from ldm_rt.runtime.lora import read_lora

    folder, manifest, trt = refit_rig(artifacts, tmp_path, monkeypatch, "fp32", refittable=False)
    with pytest.raises(BackendError) as info:
        open_components(folder, manifest, "fp32", loras=[(read_lora(loras.good), 1.0)])
    assert str(info.value) == (
        "engines/unet.fp32.plan was built without --refit, so a LoRA cannot be applied to it; "
        "rebuild with --refit or fuse the LoRA at export (--lora)"
    )
    assert trt.engines == {}  # refused before any engine was read
    assert set(open_components(folder, manifest, "fp32")) == set(manifest.components)  # without a LoRA they open


def test_tensorrt_refuses_a_lora_for_a_component_or_weight_the_artifacts_lack(artifacts, loras, tmp_path, monkeypatch):
    """As ONNX Runtime: a LoRA adapting a component with no ONNX file (a refiner's missing first text encoder),
    or a module whose weight the export did not locate, is one line, before anything is refit."""
    from ldm_rt.runtime.backends.tensorrt_backend import open_components
    from ldm_rt.runtime.lora import read_lora
    from ldm_rt.runtime.manifest import FileEntry

    folder, manifest, trt = refit_rig(artifacts, tmp_path, monkeypatch, "fp32")
    module, info = next(iter(LoraTargets.read(artifacts).modules["text_encoder"].items()))
    flat = "lora_te_" + module.replace(".", "_")
    rng = np.random.default_rng(1)
    te = write_safetensors(tmp_path / "te.safetensors", {
        f"{flat}.lora_down.weight": rng.standard_normal((2, info.shape[1])), f"{flat}.lora_up.weight": rng.standard_normal((info.shape[0], 2)),
    })  # fmt: skip
    del manifest.components["text_encoder"]
    with pytest.raises(LoraError, match=r"^the LoRA adapts text_encoder, which .* has no ONNX file for; rebuild the artifacts$"):
        open_components(folder, manifest, "fp32", loras=[(read_lora(te), 1.0)])
    assert trt.engines == {}
    # A UNet module whose weight the export did not locate (recorded so in lora_targets.json): refused, nothing refit.
    targets_path = folder / "lora_targets.json"
    d = json.loads(targets_path.read_text())
    for f in d["files"].values():
        f["targets"].pop(Q, None)
    targets_path.write_text(json.dumps(d))
    manifest.lora_targets = FileEntry.of(folder, "lora_targets.json")
    with pytest.raises(LoraError, match=r"whose weights the export could not locate \(input_blocks.1.1.transformer_blocks.0.attn1.to_q\); fuse"):
        open_components(folder, manifest, "fp32", loras=[(read_lora(loras.good), 1.0)])
    assert all(e.weights == {} for e in trt.engines.values())


def test_old_artifacts_without_targets_say_to_rebuild(tmp_path):
    import json
    import shutil

    old = Path(shutil.copytree(default_artifacts_dir(), tmp_path / "old"))
    manifest = json.loads((old / "manifest.json").read_text())
    manifest["lora_targets"] = None  # as builds made before LoRA support recorded it
    (old / "manifest.json").write_text(json.dumps(manifest))
    (old / "lora_targets.json").unlink()
    with pytest.raises(LoraError, match="built before LoRA support; rebuild"):
        LoraTargets.read(old)


def test_a_changed_targets_file_is_refused(artifacts, tmp_path):
    import shutil

    copy = Path(shutil.copytree(artifacts, tmp_path / "copy"))
    (copy / "lora_targets.json").write_text((copy / "lora_targets.json").read_text().replace('"W"', '"T"', 1))
    with pytest.raises(ArtifactError, match="does not match the manifest's hash"):
        LoraTargets.read(copy)


def test_info_lists_what_loras_can_adapt_and_what_each_file_does(artifacts, loras, capsys):
    from ldm_rt.runtime.cli import main

    assert main(["info", "--model", str(artifacts), "--lora", str(loras.good), "--lora", str(loras.good.parent)]) == 0
    out = capsys.readouterr().out
    tail = out[out.index("loras (modules a LoRA may adapt):") :].splitlines()
    modules = LoraTargets.read(artifacts).modules
    unet, text = tail[1], tail[2]
    assert unet.startswith(f"  unet: {len(modules['unet'])} modules (") and "LoCon" in unet
    assert unet.endswith(f"at run time {len(modules['unet'])} patchable")  # every weight located
    assert text.startswith(f"  text_encoder: {len(modules['text_encoder'])} modules (")
    assert tail[3] == "  good.safetensors: adapts unet 1 (1 linear); applies at run time"
    # the folder: its .safetensors files, sorted; the ones that do not fit say why in the same line
    assert tail[4] == tail[3] and tail[5].startswith("  sdxl.safetensors: cannot be applied: ") and "none of its 4 keys" in tail[5]
    assert tail[6].startswith("  truncated.safetensors: cannot be applied: ") and "truncated" in tail[6]
    assert tail[7].startswith("  wider.safetensors: cannot be applied: ") and "a LoRA for another architecture" in tail[7]
    try:
        code = main(["info", "--model", str(artifacts), "--lora", str(loras.good.parent / "nope")])
    except SystemExit as e:
        code = e.code
    assert code == 2 and "nope does not exist; name a LoRA file or a folder of them" in capsys.readouterr().err
