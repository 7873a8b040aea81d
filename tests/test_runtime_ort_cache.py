"""ONNX Runtime's optimised graphs in the compile cache (runtime/backends/onnxruntime_backend._open_optimized):
large components open from the graph an earlier session optimised, with the same outputs; a broken cache entry
falls back to optimising again. Run on the shipped default model with the size threshold lowered to 0."""

from __future__ import annotations

import numpy as np
import pytest

from ldm_rt.runtime.backends import base, onnxruntime_backend
from ldm_rt.runtime.backends.base import unwrap
from ldm_rt.runtime.pipeline import Pipeline

PROMPT = "a red circle on a white background"


@pytest.fixture()
def every_component_cached(monkeypatch):
    monkeypatch.setattr(onnxruntime_backend, "OPTIMIZED_FROM_BYTES", 0)
    monkeypatch.setattr(base, "VERIFIED_FROM_BYTES", 0)  # the encoder's files, checked at load before it opens


def _image(pipe: Pipeline) -> np.ndarray:
    return pipe.generate(PROMPT, steps=2, seed=3).images


def test_optimised_graphs_are_kept_and_reopened_with_the_same_images(tmp_path, every_component_cached):
    cache = tmp_path / "cache"
    first = Pipeline.load(threads=1, compile_cache=cache)
    for component in first.components.values():
        unwrap(component)  # the encoder opens on first use (tests/test_lazy_encoder.py)
    entries = sorted(p for p in (cache / "onnxruntime").iterdir())
    assert len(entries) == len(first.components) and all((e / "model.onnx").is_file() for e in entries)
    assert not [p for p in (cache / "onnxruntime").iterdir() if p.name.startswith(".tmp-")]
    stamps = {e: (e / "model.onnx").stat().st_mtime_ns for e in entries}
    again = Pipeline.load(threads=1, compile_cache=cache)
    assert {e: (e / "model.onnx").stat().st_mtime_ns for e in entries} == stamps  # read, not rewritten
    plain = Pipeline.load(threads=1, compile_cache=False)
    np.testing.assert_array_equal(_image(again), _image(plain))
    np.testing.assert_array_equal(_image(first), _image(plain))


def test_a_broken_cache_entry_is_optimised_again(tmp_path, every_component_cached, caplog):
    cache = tmp_path / "cache"
    Pipeline.load(threads=1, compile_cache=cache)
    victim = sorted((cache / "onnxruntime").iterdir())[0] / "model.onnx"
    victim.write_bytes(b"not a model")
    pipe = Pipeline.load(threads=1, compile_cache=cache)
    assert "optimising it again" in caplog.text
    assert victim.stat().st_size > 100  # replaced by a good one
    np.testing.assert_array_equal(_image(pipe), _image(Pipeline.load(threads=1, compile_cache=False)))


def test_small_components_and_no_cache_write_nothing(tmp_path):
    cache = tmp_path / "cache"
    Pipeline.load(threads=1, compile_cache=cache)  # the default model's files are far below the threshold
    assert not (cache / "onnxruntime").exists() or not any((cache / "onnxruntime").iterdir())


def test_a_verified_file_is_not_hashed_again_until_it_changes(tmp_path, every_component_cached, monkeypatch):
    import shutil

    from ldm_rt.runtime.artifacts import default_artifacts_dir
    from ldm_rt.runtime.manifest import ArtifactError, Manifest

    art, cache = tmp_path / "artifacts", tmp_path / "cache"
    shutil.copytree(default_artifacts_dir(), art)
    Pipeline.load(art, threads=1, compile_cache=cache)
    assert len(list((cache / "verified").iterdir())) >= 4  # one record per component file
    hashed = []
    real = Manifest.verify_file
    monkeypatch.setattr(Manifest, "verify_file", lambda self, folder, entry: hashed.append(entry.file) or real(self, folder, entry))
    Pipeline.load(art, threads=1, compile_cache=cache)
    assert not [f for f in hashed if f.startswith("onnx/")]  # the ONNX files were taken as verified
    fp32 = Manifest.read(art).components["unet"].precisions["fp32"]
    unet = art / (fp32.ort.onnx.file if fp32.ort is not None else fp32.onnx.file)  # the file the backend opens
    data = bytearray(unet.read_bytes())
    data[-10] ^= 0xFF  # same size, new content: a write, so a new change time
    unet.write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match="does not match the manifest"):
        Pipeline.load(art, threads=1, compile_cache=cache)
