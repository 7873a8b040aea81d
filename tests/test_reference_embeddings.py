"""Textual-inversion embeddings baked in at export (build_engines.py --embedding) through the torch backend
(reference/torch_backend.py: it rebuilds the text encoders from the source, so it must add the baked rows itself,
from the files the manifest records, sha256 checked), run-time embeddings on top, prompt weighting and previews
through the same loop, and `ldm-rt info` listing what was baked. Vectors are drawn large, so that an embedding
moves the image far below the parity bar (measured in each test)."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
from test_runtime_fixtures import one_line_error, psnr, run_cli
from test_textual_inversion import FP32_DB, GUIDANCE, SENSITIVE_DB, SIZE, STEPS, latents, vectors

from ldm_rt.runtime.embeddings import EmbeddingError, read_embedding
from ldm_rt.runtime.manifest import Manifest
from ldm_rt.runtime.pipeline import Pipeline

torch = pytest.importorskip("torch")
safetensors_torch = pytest.importorskip("safetensors.torch")
pytestmark = pytest.mark.usefixtures("torch_one_thread")

BAKED, RUN_TIME = "mytok", "othertok"


def write_embedding(folder: Path, token: str, n: int, seed: int) -> Path:
    """A diffusers learned_embeds.safetensors: {token: (n, WIDTH)}."""
    folder.mkdir(parents=True, exist_ok=True)
    safetensors_torch.save_file({token: vectors(n, seed=seed)}, str(path := folder / "learned_embeds.safetensors"))
    return path


def draw(pipe, prompt: str, **kwargs) -> np.ndarray:
    return pipe.generate(
        prompt, negative_prompt="blurry", steps=STEPS, guidance=GUIDANCE, scheduler="ddim", latents=latents(), height=SIZE, width=SIZE, **kwargs
    ).images  # fmt: skip


@pytest.fixture(scope="module")
def baked(tmp_path_factory, tiny_sd_v1) -> tuple[Path, Path]:
    """(artifacts of the tiny SD with a 3-vector embedding baked in, the embedding's file)."""
    from ldm_rt.export.build_engines import main

    tmp = tmp_path_factory.mktemp("reference_embeddings")
    path = write_embedding(tmp / "embedding", BAKED, 3, seed=0)
    ranges = ["--batch-range", "1:1:1", "--height-range", f"{SIZE}:{SIZE}:{SIZE}", "--width-range", f"{SIZE}:{SIZE}:{SIZE}"]  # one shape: fewer parity runs
    code, _, err = run_cli(main, ["--model", str(tiny_sd_v1), "--out", str(out := tmp / "artifacts"), "--onnx-only", "--embedding", str(path), *ranges])
    assert code == 0, err
    return out, path


def test_the_torch_backend_draws_the_baked_embedding_as_onnx_runtime_does(baked, tiny_sd_v1, tmp_path):
    """Baked rows (from the recorded file) and run-time rows on top (numbered after them), prompt weighting and full
    previews: the torch backend's images equal ONNX Runtime's; without the embedding the image is far from it."""
    from ldm_rt.reference.torch_backend import torch_pipeline

    root, _ = baked
    manifest = Manifest.read(root)  # the export's parity drew the 3 baked ids too: the contract has the grown table
    assert manifest.components["text_encoder"].contract.extra["vocab_size"] == manifest.facts.vocab_size + 3
    extra = write_embedding(tmp_path / "extra", RUN_TIME, 2, seed=5)
    ort, ref = (Pipeline.load(root, backend=b, embeddings=[extra]) for b in ("onnxruntime", "torch"))
    assert [(e["token"], e["applied"]) for e in ref.embeddings] == [(BAKED, "export"), (RUN_TIME, "run time")]
    prompt = f"a {BAKED} cat"
    theirs = draw(ort, prompt)
    assert psnr(draw(ref, prompt), theirs) >= FP32_DB
    # Without the embedding (the source model alone) the trigger is ordinary text: far below the bar.
    assert psnr(draw(torch_pipeline(tiny_sd_v1), prompt), theirs) < SENSITIVE_DB
    both = f"a {BAKED} cat, {RUN_TIME}"
    theirs_both = draw(ort, both)
    assert psnr(draw(ref, both), theirs_both) >= FP32_DB and psnr(theirs_both, theirs) < SENSITIVE_DB
    # Prompt weighting and step previews run in the same loop on either backend.
    weighted, images, seen = f"a ({BAKED}:1.6) cat, [{RUN_TIME}]", {}, {"onnxruntime": [], "torch": []}
    for name, pipe in (("onnxruntime", ort), ("torch", ref)):
        images[name] = draw(pipe, weighted, prompt_weighting=True, preview=lambda i, n, im, p=seen[name]: p.append(im), preview_every=2, preview_kind="full")
    assert psnr(images["torch"], images["onnxruntime"]) >= FP32_DB and psnr(images["onnxruntime"], theirs_both) < SENSITIVE_DB
    assert len(seen["torch"]) == len(seen["onnxruntime"]) == 2
    assert all(psnr(a, b) >= FP32_DB for a, b in zip(seen["torch"], seen["onnxruntime"]))


def test_the_torch_backend_refuses_a_baked_embedding_gone_or_changed_in_one_line(baked, tmp_path, capsys):
    from ldm_rt.runtime.cli import main

    root, path = baked
    args = ["sample", "--model", str(root), "--backend", "torch", "--prompt", "a cat", "--steps", "1", "--out", str(tmp_path / "x.png")]
    kept = shutil.copy(path, tmp_path / "kept.safetensors")
    try:
        path.unlink()
        assert "is not there any more; the torch backend needs it" in one_line_error(*run_cli(main, args)[::2], "ldm-rt")
        write_embedding(path.parent, BAKED, 3, seed=1)
        with pytest.raises(EmbeddingError, match="has changed since the export; put the original back or rebuild"):
            Pipeline.load(root, backend="torch")
    finally:
        shutil.copy(kept, path)
    assert not (tmp_path / "x.png").exists()


def test_info_lists_the_baked_embeddings(baked):
    from ldm_rt.runtime.cli import main

    root, path = baked
    code, out, _ = run_cli(main, ["info", "--model", str(root)])
    assert code == 0
    assert f"  {BAKED}: 3 vector(s), {path.name} sha256 {read_embedding(path).sha256[:16]}" in out.splitlines()
    code, out, _ = run_cli(main, ["info"])  # the shipped model: nothing baked
    assert code == 0 and "embeddings: none baked in (add them at run time: --embedding FILE[:TOKEN])" in out.splitlines()
