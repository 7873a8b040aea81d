"""The VAE encoder opens on first use (runtime/backends/base.py LazyComponent, LAZY_COMPONENTS): text-to-image never
opens it, img2img and inpainting open it once (threads racing included), images are byte-identical to opening
everything at load, and its files are still hash-checked at load with today's one-line error. The native runtime's
counterpart (cpp/native/src/pipeline.cpp) is checked at the end, through its compile cache."""

from __future__ import annotations

import importlib.util
import shutil
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from test_native_runtime import Native, default_model, native, native_build  # noqa: F401  (fixtures: the session's native build)

from ldm_rt.runtime.artifacts import Artifacts, default_artifacts_dir
from ldm_rt.runtime.backends import base, onnxruntime_backend
from ldm_rt.runtime.backends.base import Component, HostOptions, LazyComponent, backend_factory, unwrap
from ldm_rt.runtime.manifest import ArtifactError, Manifest
from ldm_rt.runtime.pipeline import Pipeline

NO_OPENVINO = importlib.util.find_spec("openvino") is None
BACKENDS = ["onnxruntime", pytest.param("openvino", marks=pytest.mark.skipif(NO_OPENVINO, reason="OpenVINO is not installed (pip install 'ldm-rt[openvino]')"))]
PROMPT = "a large red circle on the left on a white background"
ARGS = {"steps": 4, "seed": 3, "guidance": 5.0}


@pytest.fixture(scope="module")
def init_and_mask(tmp_path_factory) -> tuple[Path, Path]:
    folder = tmp_path_factory.mktemp("inputs")
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(folder / "init.png")
    mask = np.zeros((64, 64), np.uint8)
    mask[16:48] = 255
    Image.fromarray(mask).save(folder / "mask.png")
    return folder / "init.png", folder / "mask.png"


class CountingFactory:
    """The backend's factory, recording which components each call opens; `delay` seconds before each open of the
    encoder, so threads that race to open it pile up while the first is inside."""

    def __init__(self, backend: str, delay: float = 0.0) -> None:
        self.inner, self.delay, self.calls = backend_factory(backend), delay, []
        self.lock = threading.Lock()

    def __call__(self, artifacts_dir, manifest, precision, providers=None, host=None, **kw):
        with self.lock:
            self.calls.append(sorted(manifest.components))
        if "vae_encoder" in manifest.components:
            time.sleep(self.delay)
        return self.inner(artifacts_dir, manifest, precision, providers, host=host or HostOptions(), **kw)


def load_counting(monkeypatch, backend: str, root: Path | None = None, delay: float = 0.0, **kw) -> tuple[Pipeline, CountingFactory]:
    factory = CountingFactory(backend, delay)
    monkeypatch.setattr(base, "backend_factory", lambda name: factory)
    return Pipeline.load(root, backend=backend, threads=1, **kw), factory


def eager(backend: str, root: Path | None = None) -> Pipeline:
    """Today's behaviour: the backend's factory opens every component at load."""
    artifacts = Artifacts.open(root)
    components = backend_factory(backend)(artifacts.root, artifacts.manifest, "fp32", host=HostOptions(threads=1))
    assert not any(isinstance(c, LazyComponent) for c in components.values())
    return Pipeline.from_artifacts(artifacts, components, backend, "fp32")


@pytest.mark.parametrize("backend", BACKENDS)
def test_txt2img_never_opens_the_encoder_img2img_opens_it_once_with_the_eager_images(backend, init_and_mask, monkeypatch, tmp_path):
    init, mask = init_and_mask
    pipe, factory = load_counting(monkeypatch, backend, compile_cache=tmp_path)
    others = sorted({"text_encoder", "unet", "vae_decoder"})
    assert factory.calls == [others]
    encoder = pipe.components["vae_encoder"]
    assert isinstance(encoder, LazyComponent) and isinstance(encoder, Component) and not encoder.opened
    assert encoder.contract == pipe.artifacts.manifest.components["vae_encoder"].contract  # known without opening
    assert list(pipe.components) == list(pipe.artifacts.manifest.components)  # the manifest's order, as before

    reference = eager(backend)
    text = pipe.generate(PROMPT, **ARGS).images
    assert factory.calls == [others] and not encoder.opened
    np.testing.assert_array_equal(text, reference.generate(PROMPT, **ARGS).images)

    img2img = pipe.generate(PROMPT, init_image=init, strength=0.6, **ARGS)
    assert factory.calls == [others, ["vae_encoder"]] and encoder.opened
    assert "vae_encoder" in img2img.timings  # the first call's time includes the open
    inpaint = pipe.generate(PROMPT, init_image=init, mask=mask, **ARGS).images
    assert factory.calls == [others, ["vae_encoder"]]  # opened once, kept
    np.testing.assert_array_equal(img2img.images, reference.generate(PROMPT, init_image=init, strength=0.6, **ARGS).images)
    np.testing.assert_array_equal(inpaint, reference.generate(PROMPT, init_image=init, mask=mask, **ARGS).images)
    # The comparison can fail: another seed, or img2img against text-to-image, gives other pixels.
    assert not np.array_equal(img2img.images, pipe.generate(PROMPT, init_image=init, strength=0.6, **{**ARGS, "seed": 4}).images)
    assert not np.array_equal(img2img.images, text)
    assert type(unwrap(encoder)) is type(unwrap(pipe.components["unet"]))  # the backend's own component inside


def test_threads_racing_to_encode_open_it_once(init_and_mask, monkeypatch):
    init, _ = init_and_mask
    pipe, factory = load_counting(monkeypatch, "onnxruntime", delay=0.3, compile_cache=False)
    expected = eager("onnxruntime").generate(PROMPT, init_image=init, strength=0.6, **ARGS).images
    start = threading.Barrier(4)
    results: list = [None] * 4

    def worker(k: int) -> None:
        start.wait()
        results[k] = pipe.generate(PROMPT, init_image=init, strength=0.6, **ARGS).images

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert factory.calls.count(["vae_encoder"]) == 1, factory.calls
    for images in results:
        np.testing.assert_array_equal(images, expected)


@pytest.fixture()
def copy(tmp_path) -> Path:
    return Path(shutil.copytree(default_artifacts_dir(), tmp_path / "artifacts"))


def corrupt(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size, other content
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("cache", [False, True])
def test_a_corrupted_encoder_still_fails_the_load_with_todays_error(backend, cache, copy, monkeypatch, tmp_path):
    compile_cache = tmp_path / "cache" if cache else False
    if cache:  # verified once (a record in the cache), then changed: the record no longer applies
        monkeypatch.setattr(base, "VERIFIED_FROM_BYTES", 0)
        Pipeline.load(copy, backend=backend, threads=1, compile_cache=compile_cache)
    encoder = copy / "onnx/fp32/vae_encoder.onnx"
    corrupt(encoder)
    with pytest.raises(ArtifactError) as today:  # what opening every component at load says
        backend_factory(backend)(copy, Manifest.read(copy), "fp32", host=HostOptions(threads=1))
    factory = CountingFactory(backend)
    monkeypatch.setattr(base, "backend_factory", lambda name: factory)
    with pytest.raises(ArtifactError) as lazy:
        Pipeline.load(copy, backend=backend, threads=1, compile_cache=compile_cache)
    assert str(lazy.value) == str(today.value) == f"{encoder} does not match the manifest's hash (truncated or changed); rebuild the artifacts"
    assert factory.calls == [sorted({"text_encoder", "unet", "vae_decoder"})]  # never the encoder


def test_an_encoder_gone_after_load_fails_its_first_use_in_one_line_and_the_next_call_retries(copy, init_and_mask):
    init, _ = init_and_mask
    pipe = Pipeline.load(copy, threads=1, compile_cache=False)
    encoder = copy / "onnx/fp32/vae_encoder.onnx"
    kept = encoder.read_bytes()
    encoder.unlink()
    text = pipe.generate(PROMPT, **ARGS)  # text-to-image does not need it
    with pytest.raises(ArtifactError) as info:
        pipe.generate(PROMPT, init_image=init, strength=0.6, **ARGS)
    assert str(info.value) == f"{encoder} is missing; rebuild the artifacts"  # Manifest.verify_file's, as at load
    assert not pipe.components["vae_encoder"].opened
    encoder.write_bytes(kept)  # a failed open is not remembered
    again = pipe.generate(PROMPT, init_image=init, strength=0.6, **ARGS)
    assert pipe.components["vae_encoder"].opened and not np.array_equal(again.images, text.images)


def test_the_record_written_at_load_is_the_one_onnx_runtime_reads(copy, init_and_mask, monkeypatch, tmp_path):
    """The encoder hashed at load (base.verified_file) is not hashed again when ONNX Runtime opens it (the same
    function and record); and a second start hashes it not at all."""
    init, _ = init_and_mask
    monkeypatch.setattr(base, "VERIFIED_FROM_BYTES", 0)
    monkeypatch.setattr(onnxruntime_backend, "OPTIMIZED_FROM_BYTES", 0)
    hashed: list[str] = []
    real = Manifest.verify_file
    monkeypatch.setattr(Manifest, "verify_file", lambda self, folder, entry: hashed.append(entry.file) or real(self, folder, entry))
    cache = tmp_path / "cache"
    pipe = Pipeline.load(copy, threads=1, compile_cache=cache)
    assert "onnx/fp32/vae_encoder.onnx" in hashed  # checked at load (first start: no record yet)
    hashed.clear()
    pipe.generate(PROMPT, init_image=init, strength=0.6, **ARGS)
    assert pipe.components["vae_encoder"].opened and hashed == []  # ONNX Runtime took base's record
    Pipeline.load(copy, threads=1, compile_cache=cache)
    assert not [f for f in hashed if f.startswith("onnx/")]
    # And the other way round: a record ONNX Runtime wrote (eager open) spares base's check at the next start.
    (cache / "verified").rename(tmp_path / "old")
    hashed.clear()
    eager_components = onnxruntime_backend.open_components(copy, Manifest.read(copy), "fp32", host=HostOptions(compile_cache=cache))
    assert "onnx/fp32/vae_encoder.onnx" in hashed and "vae_encoder" in eager_components
    hashed.clear()
    base.check_unopened(copy, Manifest.read(copy), "vae_encoder", "fp32", HostOptions(compile_cache=cache))
    assert hashed == []


def test_plugin_backends_and_loras_that_adapt_the_encoder_open_it_at_load(monkeypatch):
    manifest = Manifest.read(default_artifacts_dir())
    root = default_artifacts_dir()
    assert base._lazy_names("onnxruntime", root, manifest, ()) == {"vae_encoder"}
    assert base._lazy_names("tensorrt", root, manifest, ()) == {"vae_encoder"}
    # "torch" loads the whole model at once: opening the encoder later would load it all a second time.
    assert base._lazy_names("torch", root, manifest, ()) == set()
    from ldm_rt.runtime import lora

    adapted = {"unet": {}}
    monkeypatch.setattr(lora, "run_time_deltas", lambda root, manifest, loras: (None, adapted))
    assert base._lazy_names("onnxruntime", root, manifest, [("lora", 1.0)]) == {"vae_encoder"}
    adapted["vae_encoder"] = {}  # no LoRA prefix names the VAE today; if one did, its deltas would apply at load
    assert base._lazy_names("onnxruntime", root, manifest, [("lora", 1.0)]) == set()


def test_closing_a_pipeline_closes_an_opened_encoder_only():
    closed = []

    class Closing:
        contract = Manifest.read(default_artifacts_dir()).components["vae_encoder"].contract

        def run(self, inputs):
            return {}

        def close(self):
            closed.append(self)

    never = LazyComponent(Closing.contract, Closing)
    never.close()
    opened = LazyComponent(Closing.contract, Closing)
    opened.run({})
    opened.close()
    assert closed == [unwrap(opened)] and not never.opened


# ---- the native runtime (cpp/native/src/pipeline.cpp LazyComponent) ---------------------------------------------


def compiled_graphs(cache: Path) -> int:
    """OpenVINO's compile cache holds one blob per compiled network, each in its file's own folder: how many
    components a process compiled."""
    folder = cache / "ldm-rt" / "openvino"
    return sum(1 for p in folder.rglob("*") if p.is_file()) if folder.is_dir() else 0


def test_native_txt2img_never_compiles_the_encoder_and_racing_img2img_requests_agree(native: Native, default_model, init_and_mask, tmp_path):  # noqa: F811
    init, mask = init_and_mask
    own = Native(native.exe.parent, tmp_path / "cache")  # a fresh compile cache: what it holds is what was compiled
    common = ["--model", default_model, "--prompt", PROMPT, "--steps", 4, "--seed", 3, "--height", 64, "--width", 64]
    own.image(tmp_path / "t2i.png", *common)
    assert compiled_graphs(tmp_path / "cache") == 3  # text_encoder, unet, vae_decoder (the eager build compiled 4)
    one = own.image(tmp_path / "i2i.png", *common, "--init-image", init, "--strength", 0.6)
    assert compiled_graphs(tmp_path / "cache") == 4
    # One process, four threads whose first request encodes: one compile between them, each the lone CLI's image.
    fresh = Native(native.exe.parent, tmp_path / "cache2")
    request = {"prompt": PROMPT, "steps": 4, "seed": 3, "height": 64, "width": 64, "init_image": str(init), "strength": 0.6}
    raced = fresh.images(default_model, [request] * 4, tmp_path)
    assert compiled_graphs(tmp_path / "cache2") == 4
    for image in raced:
        np.testing.assert_array_equal(image, one)
    inpaint = fresh.images(default_model, [{**request, "mask": str(mask), "strength": 1.0}], tmp_path)[0]
    assert not np.array_equal(inpaint, one)  # the comparison can fail: another request, other pixels
