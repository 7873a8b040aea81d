"""The ONNX Runtime attention rewrite (export/ort_attention.py): what it fuses, that it keeps the function,
that the build records the variant and the ONNX Runtime backend opens it."""

from __future__ import annotations

import io
import logging
import shutil
import warnings
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from test_runtime_fixtures import EXPORT_PROFILE, exported
from tiny_models import make_tiny_ldm_rt_model

from ldm_rt.export.build import BuildOptions, build
from ldm_rt.export.errors import ExportError
from ldm_rt.export.graph_cleanup import clean_model
from ldm_rt.export.ort_attention import FUSED_OP, MS_DOMAIN, find_attention, fuse_attention, write_ort_variant
from ldm_rt.export.parity import ort_session, sample_sets
from ldm_rt.reference.attention import CrossAttention
from ldm_rt.reference.model_folder import load_model_folder
from ldm_rt.runtime.backends.onnxruntime_backend import open_components
from ldm_rt.runtime.manifest import FileEntry, Manifest

PROFILE = EXPORT_PROFILE  # batch 1-2, 8-24 px: the shared export's (`built`)


class _Built:
    def __init__(self, model: Path, out: Path) -> None:
        self.model, self.out = model, out
        self.manifest = Manifest.read(out)


@pytest.fixture(scope="module")
def built(tmp_path_factory, tiny_ldm_rt_model) -> _Built:
    """The tiny ldm-rt model (UNet with 4 heads at one level) built ONNX-only: the session's export of it (PROFILE),
    shared with tests/test_runtime_parity.py."""
    return _Built(tiny_ldm_rt_model, exported(tmp_path_factory, tiny_ldm_rt_model, fp16=False))


def _ops(path: Path) -> list[onnx.NodeProto]:
    return list(onnx.load(str(path), load_external_data=False).graph.node)


def test_every_attention_block_of_the_unet_is_fused(built):
    unet = load_model_folder(built.model).model.unet
    blocks = [m for m in unet.modules() if isinstance(m, CrossAttention)]
    assert len(blocks) == 8  # self- and cross-attention in 4 spatial transformers
    variant = built.manifest.components["unet"].precisions["fp32"].ort
    assert variant is not None and variant.fused == {FUSED_OP: len(blocks)}

    portable = _ops(built.out / "onnx/fp32/unet.onnx")
    fused = _ops(built.out / variant.onnx.file)
    assert sum(n.op_type == "Softmax" for n in portable) == len(blocks)
    assert not any(n.domain == MS_DOMAIN for n in portable)  # the portable file (TensorRT's) is untouched
    mha = [n for n in fused if n.op_type == FUSED_OP]
    assert len(mha) == len(blocks) and all(n.domain == MS_DOMAIN for n in mha)
    assert not any(n.op_type == "Softmax" for n in fused)
    assert len(fused) < len(portable) - 10 * len(blocks)  # the head split/merge and its shape arithmetic are gone
    attrs = [{a.name: onnx.helper.get_attribute_value(a) for a in node.attribute} for node in mha]
    assert sorted(a["num_heads"] for a in attrs) == sorted(b.heads for b in blocks)
    assert {b.dim_head for b in blocks} == {8, 16}  # two widths at 4 heads: heads and scale are read per block
    np.testing.assert_allclose(sorted(a["scale"] for a in attrs), sorted(b.dim_head**-0.5 for b in blocks), rtol=1e-6)


def test_the_variant_computes_what_the_portable_file_computes(built):
    entry = built.manifest.components["unet"]
    portable = ort_session(built.out / entry.precisions["fp32"].onnx.file)
    fused = ort_session(built.out / entry.precisions["fp32"].ort.onnx.file)
    for feeds in sample_sets(entry.contract, seed=3):  # min, opt, max and an odd size
        (want,) = portable.run(None, feeds)
        (got,) = fused.run(None, feeds)
        assert got.shape == want.shape
        assert np.max(np.abs(got - want)) <= entry.contract.tolerance["fp32"].bound(want)
    parity = entry.precisions["fp32"].ort.parity
    assert parity["passed"] is True and parity["backend"] == "onnxruntime-fused" and len(parity["shapes"]) == 4


def test_the_manifest_records_the_variant_and_the_backend_opens_it(built, caplog):
    m = built.manifest
    variant = m.components["unet"].precisions["fp32"].ort
    assert variant.onnx.file == "onnx/fp32/unet.onnxruntime.onnx"
    m.verify_file(built.out, variant.onnx)
    # The text encoder's attention is masked (causal) and the VAE's is single-head bmm: nothing to fuse, no file.
    for name in ("text_encoder", "vae_decoder", "vae_encoder"):
        assert m.components[name].precisions["fp32"].ort is None
    assert [p.name for p in (built.out / "onnx/fp32").glob("*.onnxruntime.onnx")] == ["unet.onnxruntime.onnx"]

    with caplog.at_level(logging.INFO, logger="ldm_rt.runtime.backends.onnxruntime_backend"):
        fused = open_components(built.out, m, "fp32", ["cpu"])
        portable = open_components(built.out, m, "fp32", ["cpu"], fused=False)
    opened = [r.getMessage() for r in caplog.records if r.getMessage().startswith("opened unet")]
    assert "from onnx/fp32/unet.onnxruntime.onnx" in opened[0] and "from onnx/fp32/unet.onnx " in opened[1]
    feeds = sample_sets(m.components["unet"].contract)[1]
    want = portable["unet"].run(feeds)["out_sample"]
    np.testing.assert_allclose(fused["unet"].run(feeds)["out_sample"], want, atol=1e-4)


def test_an_unloadable_variant_falls_back_to_the_portable_file(built, tmp_path, caplog):
    art = tmp_path / "artifacts"
    shutil.copytree(built.out, art)
    m = Manifest.read(art)
    pe = m.components["unet"].precisions["fp32"]
    model = onnx.load(str(art / pe.ort.onnx.file))
    for node in model.graph.node:
        if node.op_type == FUSED_OP:
            node.op_type = "NoSuchAttention"  # as an onnxruntime build without this contrib op would see it
    onnx.save(model, str(art / pe.ort.onnx.file))
    pe.ort.onnx = FileEntry.of(art, pe.ort.onnx.file)  # a consistent manifest: only loading fails
    with caplog.at_level(logging.WARNING):
        components = open_components(art, m, "fp32", ["cpu"])
    assert any("using the portable onnx/fp32/unet.onnx instead" in r.getMessage() for r in caplog.records)
    feeds = sample_sets(m.components["unet"].contract)[0]
    assert np.all(np.isfinite(components["unet"].run(feeds)["out_sample"]))


def test_a_model_without_attention_passes_through_unchanged(built, tmp_path):
    for name in ("vae_decoder", "text_encoder"):
        src = built.out / f"onnx/fp32/{name}.onnx"
        model = onnx.load(str(src))
        assert find_attention(model) == []
        fused, count = fuse_attention(model)
        assert count == 0 and fused.SerializeToString() == model.SerializeToString()
        copy = tmp_path / f"{name}.onnx"
        shutil.copy(src, copy)
        assert write_ort_variant(copy, tmp_path / f"{name}.onnxruntime.onnx") == {}
        assert not (tmp_path / f"{name}.onnxruntime.onnx").exists()


class _Cross(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.attn = CrossAttention(16, 12, heads=2, dim_head=8)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        return self.attn(x, context)


def test_external_weights_are_shared_with_the_portable_file(tmp_path):
    """A model past 2 GiB keeps its weights in <name>.onnx.data: the variant refers to that same file."""
    torch.manual_seed(0)
    module, x, context = _Cross().eval(), torch.randn(2, 10, 16), torch.randn(2, 7, 12)
    buffer = io.BytesIO()
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(module, (x, context), buffer, dynamo=False, opset_version=17, input_names=["x", "context"],
                          output_names=["out"], dynamic_axes={"x": {0: "b", 1: "n"}, "context": {0: "b"}})
    src = tmp_path / "attn.onnx"
    onnx.save_model(clean_model(onnx.load_from_string(buffer.getvalue())), str(src), save_as_external_data=True,
                    all_tensors_to_one_file=True, location="attn.onnx.data", size_threshold=64)
    dst = tmp_path / "attn.onnxruntime.onnx"
    assert write_ort_variant(src, dst) == {FUSED_OP: 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["attn.onnx", "attn.onnx.data", "attn.onnxruntime.onnx"]
    def external(path: Path) -> dict[str, list[tuple[str, str]]]:
        inits = onnx.load(str(path), load_external_data=False).graph.initializer
        return {t.name: [(e.key, e.value) for e in t.external_data] for t in inits if t.external_data}

    assert len(external(src)) == 5  # q, k, v, out weights and the out bias: all the weights
    assert external(dst) == external(src)  # same file, same offsets: nothing copied
    feeds = {"x": x.numpy(), "context": context.numpy()}
    with torch.no_grad():
        want = module(x, context).numpy()
    (got,) = ort_session(dst).run(None, feeds)
    np.testing.assert_allclose(got, want, atol=1e-5)

    with pytest.raises(ExportError, match="must sit beside"):
        write_ort_variant(src, tmp_path / "elsewhere" / "attn.onnxruntime.onnx")


def test_models_past_two_gib_are_folded_fused_and_estimated_like_small_ones(tmp_path, monkeypatch, caplog):
    """Past 2 GiB (SD 1.5's UNet) the proto cannot be serialised for shape inference: the clean-up infers on the
    weightless graph instead. Before, nothing folded there, the fused-attention variant found 0 blocks and the
    parity memory estimate failed on the external weights; simulated here by lowering the limit."""
    from ldm_rt.export import graph_cleanup

    monkeypatch.setattr(graph_cleanup, "PROTO_LIMIT_BYTES", 1000)
    model = make_tiny_ldm_rt_model(tmp_path / "model")
    with caplog.at_level(logging.WARNING):
        build(BuildOptions(model=model, out=tmp_path / "artifacts", profile=PROFILE, onnx_only=True, progress=False))
    assert (tmp_path / "artifacts/onnx/fp32/unet.onnx.data").is_file()  # the external-data path was taken
    fp32 = Manifest.read(tmp_path / "artifacts").components["unet"].precisions["fp32"]
    assert fp32.ort is not None and fp32.ort.fused == {FUSED_OP: 8}
    assert fp32.parity["largest_checked"] == {"unet_batch": 4, "latent_height": 12, "latent_width": 12}
    assert "bounded" not in fp32.parity and "shape inference failed" not in caplog.text
