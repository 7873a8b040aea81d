"""The OpenVINO backend (OpenVINO's own runtime on the portable ONNX, ldm-rt[openvino]) on any x86 CPU, Intel or
AMD: the shipped default model draws what the CPU provider draws (f32; bf16 within a few levels where the CPU has
it), at several sizes from one compiled model; threads, precision and the compile cache reach OpenVINO; concurrent
calls are safe; without the package, or asked for as an onnxruntime provider, one line names the fix."""

from __future__ import annotations

import json
import shutil
import sys
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from test_runtime_fixtures import build_synthetic_artifacts, synthetic

from ldm_rt.runtime.backends import base, openvino_backend
from ldm_rt.runtime.backends.base import BackendError, unwrap
from ldm_rt.runtime.cli import main
from ldm_rt.runtime.images import read_image_text
from ldm_rt.runtime.pipeline import Pipeline

try:
    import openvino as ov
except ImportError:  # the test extra installs it; without it only the missing-package test runs
    ov = None
needs_openvino = pytest.mark.skipif(ov is None, reason="OpenVINO is not installed (pip install 'ldm-rt[openvino]')")

PROMPTS = ["a small blue square at the top on a gray background", "a large red circle on the left on a white background"]
ARGS = dict(steps=25, guidance=5.0, seed=3)
BF16 = ov is not None and "BF16" in ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")


def properties(pipe: Pipeline, key: str) -> set:
    return {unwrap(c).compiled.get_property(key) for c in pipe.components.values()}  # opens the encoder (on first use otherwise)


def levels(a: np.ndarray, b: np.ndarray) -> tuple[float, int]:
    d = np.abs(a.astype(np.int16) - b.astype(np.int16))
    return float(d.mean()), int(d.max())


@pytest.fixture(scope="module")
def cpu() -> Pipeline:
    return Pipeline.load(providers=["cpu"])


@needs_openvino
def test_the_default_model_on_openvino_matches_the_cpu_provider_at_every_size(cpu, tmp_path):
    pipe = Pipeline.load(backend="openvino", threads=1, compile_cache=tmp_path)
    # The settings reach compile_model: one thread, f32 (OpenVINO would pick bf16 on CPUs with AMX), the cache.
    assert properties(pipe, "INFERENCE_NUM_THREADS") == {1}
    assert properties(pipe, "INFERENCE_PRECISION_HINT") == {ov.Type.f32}
    assert properties(pipe, "LOADED_FROM_CACHE") == {False}
    cache = tmp_path / "openvino"
    blobs = {p.relative_to(cache): p.stat().st_mtime_ns for p in cache.rglob("*") if p.is_file()}
    assert len(blobs) == len(list(cache.iterdir())) == len(pipe.components)  # one folder per file, one compiled graph in each
    # One compiled model serves every size of the profile (dynamic shapes), each the CPU provider's image:
    # measured identical here (AMD EPYC, AVX-512); other kernels may round a pixel by a level.
    drawn = {}
    for height, width, steps in ((64, 64, 25), (128, 96, 10)):
        a = cpu.generate(PROMPTS, height=height, width=width, **{**ARGS, "steps": steps}).images
        drawn[height] = pipe.generate(PROMPTS, height=height, width=width, **{**ARGS, "steps": steps}).images
        assert drawn[height].shape == (2, height, width, 3)
        mean, most = levels(a, drawn[height])
        assert mean < 0.05 and most <= 2, (height, width, mean, most)
    # The next process reads the compiled graphs back: nothing is compiled or written again, same images.
    again = Pipeline.load(backend="openvino", threads=1, compile_cache=tmp_path)
    assert properties(again, "LOADED_FROM_CACHE") == {True}
    assert {p.relative_to(cache): p.stat().st_mtime_ns for p in cache.rglob("*") if p.is_file()} == blobs
    np.testing.assert_array_equal(again.generate(PROMPTS, **ARGS).images, drawn[64])


@needs_openvino
def test_a_model_rebuilt_at_the_same_path_is_compiled_afresh(tmp_path):
    """OpenVINO keys a cached graph compiled from a path on the path and the settings, not on the file's bytes: the
    backend's cache folder per file, named after its manifest hash, keeps a model rebuilt in place (same contracts,
    other weights) from running the old model's compiled graphs."""
    folder, cache = tmp_path / "artifacts", tmp_path / "cache"
    request = dict(prompt="a red cube", steps=2, seed=1, height=16, width=16)
    drawn = []
    for seed in (0, 1):
        shutil.rmtree(folder, ignore_errors=True)
        build_synthetic_artifacts(folder, seed=seed)
        drawn.append(Pipeline.load(folder, backend="openvino", compile_cache=cache).generate(**request).images)
        np.testing.assert_array_equal(drawn[-1], Pipeline.load(folder, backend="openvino", compile_cache=False).generate(**request).images)
    assert np.abs(drawn[0].astype(int) - drawn[1].astype(int)).max() > 10


@needs_openvino
def test_compile_settings_by_default():
    # One thread per physical core, f32, no cache folder unless given one.
    config = openvino_backend.compile_config(ov.Core(), base.HostOptions())
    assert config == {"INFERENCE_NUM_THREADS": base.physical_cores(), "INFERENCE_PRECISION_HINT": "f32"}


@needs_openvino
@pytest.mark.skipif(not BF16, reason="this CPU has no bf16 for OpenVINO (no BF16 in its OPTIMIZATION_CAPABILITIES: it needs AVX512_BF16, as on AMX CPUs, or AVX2-VNNI-2)")
def test_bf16_is_opt_in_and_stays_within_a_few_levels(cpu):
    pipe = Pipeline.load(backend="openvino", compile_cache=False, reduced_precision=True)
    assert properties(pipe, "INFERENCE_PRECISION_HINT") == {ov.Type.bf16}
    mean, most = levels(cpu.generate(PROMPTS, **ARGS).images, pipe.generate(PROMPTS, **ARGS).images)
    # Measured 0.17 mean, 6 max on an AMD EPYC (AVX512_BF16); 0.06 mean, 7 max on a Xeon with AMX.
    assert mean < 0.5 and most <= 16, (mean, most)


def test_bf16_where_the_cpu_lacks_it_computes_in_f32(caplog, tmp_path):
    class NoBf16Core:
        def get_property(self, device, name):
            assert (device, name) == ("CPU", "OPTIMIZATION_CAPABILITIES")
            return ["FP32", "INT8"]

    config = openvino_backend.compile_config(NoBf16Core(), base.HostOptions(threads=2, compile_cache=tmp_path, reduced_precision=True))
    assert config == {"INFERENCE_NUM_THREADS": 2, "INFERENCE_PRECISION_HINT": "f32", "CACHE_DIR": str(tmp_path / "openvino")}
    assert "no bf16 support" in caplog.text


@needs_openvino
def test_bf16_is_recorded_in_the_image_parameters(tmp_path_factory, tmp_path, capsys):
    model = synthetic(tmp_path_factory)[0]
    for bf16, name in ((True, "bf16.png"), (False, "f32.png")):
        code = main(["sample", "--model", str(model), "--backend", "openvino", "--no-compile-cache", "--steps", "2", "--seed", "1",
                     "--out", str(tmp_path / name), *(["--bf16"] if bf16 else [])])
        assert code == 0, capsys.readouterr().err
        params = json.loads(read_image_text(tmp_path / name)["parameters"])
        assert params["backend"] == "openvino" and params["reduced_precision"] is bf16


@needs_openvino
def test_threads_sharing_an_openvino_pipeline_get_the_single_threaded_images(tmp_path_factory):
    pipe = Pipeline.load(synthetic(tmp_path_factory)[0], backend="openvino", compile_cache=False)
    requests = [dict(prompt=f"a red cube {k}", steps=3, seed=k, scheduler=("ddim", "euler-a")[k % 2], height=(16, 32, 8)[k % 3],
                     width=(16, 32, 8)[k % 3]) for k in range(8)]
    expected = [pipe.generate(**r).images for r in requests]
    with ThreadPoolExecutor(4) as pool:
        got = list(pool.map(lambda r: pipe.generate(**r).images, requests))
    for k, (a, b) in enumerate(zip(expected, got)):
        np.testing.assert_array_equal(a, b, err_msg=f"request {k}")


def test_without_openvino_the_error_names_the_extra(monkeypatch, tmp_path, capsys):
    monkeypatch.setitem(sys.modules, "openvino", None)  # `import openvino` raises ImportError
    with pytest.raises(BackendError) as info:
        Pipeline.load(backend="openvino")
    assert str(info.value) == "the openvino backend needs OpenVINO: pip install 'ldm-rt[openvino]' (or use --backend onnxruntime)"
    code = main(["sample", "--backend", "openvino", "--out", str(tmp_path / "x.png")])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "pip install 'ldm-rt[openvino]'" in err
    assert not (tmp_path / "x.png").exists()


def test_openvino_as_an_onnxruntime_provider_points_to_the_backend(tmp_path, capsys):
    with pytest.raises(BackendError, match=r"use --backend openvino \(Pipeline.load\(backend='openvino'\)\)"):
        Pipeline.load(providers=["OpenVINO"])
    with pytest.raises(SystemExit) as exit_:
        main(["sample", "--provider", "openvino", "--out", str(tmp_path / "x.png")])
    assert exit_.value.code == 2
    assert capsys.readouterr().err == "ldm-rt: error: argument --provider: openvino is a backend now: use --backend openvino; see --help\n"
    with pytest.raises(BackendError, match="the openvino backend takes no providers"):
        Pipeline.load(backend="openvino", providers=["cpu"])


def test_bf16_without_the_openvino_backend_is_refused(tmp_path, capsys):
    code = main(["sample", "--bf16", "--out", str(tmp_path / "x.png")])
    assert code == 2 and capsys.readouterr().err == (
        "ldm-rt: error: --bf16 needs --backend openvino (the onnxruntime backend computes in the artifacts' precision)\n")


def test_compile_cache_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert base.default_compile_cache() == tmp_path / "xdg" / "ldm-rt"
    assert base.cache_folder(tmp_path / "c", "openvino") == tmp_path / "c" / "openvino"
    assert (tmp_path / "c" / "openvino").is_dir()
    assert base.cache_folder(None, "openvino") is None
    blocker = tmp_path / "file"
    blocker.write_text("x")
    # A folder that cannot be made means no cache, not a failed load.
    assert base.cache_folder(blocker / "sub", "openvino") is None
    with pytest.raises(BackendError, match="is a file; give a folder"):
        Pipeline.load(backend="openvino", compile_cache=blocker)
