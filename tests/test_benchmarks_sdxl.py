"""benchmarks/: the SDXL-shaped workload is SDXL's structure (two text encoders, the second projected; text_time
add-embedding; per-level transformer depth with no attention at the first level; linear projections; SDXL's VAE
scale), diffusers' SDXL pipeline and ldm-rt's reference read the folder as SDXL; its peers run SDXL's pipeline
classes and say so in their labels; the native row is labelled. The --quick smoke run is not a CI test."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `benchmarks` is imported from the checkout's root
from benchmarks import harness, run, workloads  # noqa: E402

pytest.importorskip("diffusers")

# The workload's structure at test widths (the benchmark's own is 64/128/256 wide; see SDXLShape).
TINY = workloads.SDXLShape(unet_channels=(32, 64, 64), unet_layers_per_block=1, transformer_depth=(0, 1, 2), unet_head_width=32,
                           text_hidden=64, text_layers=2, text_2_hidden=64, text_2_layers=2, text_2_projection=32,
                           addition_time_embed_dim=8, vae_channels=(32, 32, 32, 32), vae_layers_per_block=1)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return workloads.make_sdxl_shaped(tmp_path_factory.mktemp("sdxl") / "m", TINY)


def test_the_default_shape_scales_sdxl_down_by_five():
    shape = workloads.SDXLShape()
    assert shape.unet_channels == tuple(c // 5 for c in (320, 640, 1280))
    assert shape.transformer_depth[0] == 0 and list(shape.transformer_depth) == sorted(shape.transformer_depth)  # SDXL: 0, 2, 10
    assert shape.heads_per_level() == (1, 2, 4) and shape.cross_attention_dim == shape.text_hidden + shape.text_2_hidden
    assert workloads.SDXL_SIZES == (256,)


def test_folder_is_sdxl_for_diffusers(folder):
    unet = json.loads((folder / "unet" / "config.json").read_text())
    assert unet["addition_embed_type"] == "text_time" and unet["use_linear_projection"] is True
    assert unet["down_block_types"] == ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"]
    assert unet["up_block_types"] == ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"]
    assert unet["transformer_layers_per_block"][1:] == [1, 2] and unet["cross_attention_dim"] == 128
    assert unet["projection_class_embeddings_input_dim"] == 32 + 6 * 8  # pooled text + 6 Fourier-embedded time ids
    assert json.loads((folder / "vae" / "config.json").read_text())["scaling_factor"] == workloads.SDXL_VAE_SCALE

    from diffusers import StableDiffusionXLPipeline

    pipe = StableDiffusionXLPipeline.from_pretrained(folder)
    assert pipe.config.force_zeros_for_empty_prompt is True
    assert type(pipe.text_encoder_2).__name__ == "CLIPTextModelWithProjection" and pipe.text_encoder_2.config.projection_dim == 32
    prompt = "a photo of an astronaut riding a horse on the moon"
    ids = pipe.tokenizer(prompt, padding="max_length", max_length=TINY.max_length)["input_ids"]
    assert ids == pipe.tokenizer_2(prompt, padding="max_length", max_length=TINY.max_length)["input_ids"]
    assert pipe.tokenizer.unk_token_id not in ids  # every benchmark word is known


def test_the_reference_reads_it_as_sdxl(folder):
    from ldm_rt.reference.attention import CrossAttention
    from ldm_rt.reference.checkpoints import load_model

    loaded = load_model(folder)
    config = loaded.model.config
    assert config.text_encoder_2 is not None and loaded.tokenizer_2 is not None
    assert config.unet.adm_in_channels == 32 + 6 * 8 and config.force_zeros_for_empty_prompt is True
    # Per-level depth: no attention at the first level; 1 then 2 transformer blocks (x2 in the up path's extra layer).
    heads = sorted({(m.heads, m.heads * m.dim_head) for m in loaded.model.unet.modules() if isinstance(m, CrossAttention)})
    assert heads == [(2, 64)]  # 32-wide heads at 64 channels
    counts = workloads.parameter_counts(folder)
    assert set(counts) == {"unet", "vae", "text_encoder", "text_encoder_2"} and all(v > 0 for v in counts.values())


def _prepared(pipeline: str) -> workloads.Prepared:
    return workloads.Prepared("sdxl-shaped", "d", {}, Path("art"), Path("src"), Path("src"), Path("opt"),
                              single_file_reason=workloads.SDCPP_SHAPES, pipeline=pipeline)


def test_sdxl_peers_run_sdxl_pipelines_and_say_so():
    envs = {"openvino-genai": (None, "no venv"), "sdcpp": (None, "no venv")}
    peers = {p.name: p for p in run.peers_for(_prepared(harness.SDXL_PIPELINE), Path("/venv/bin/python"), envs, (Path("/b/native_bench_worker"), None))}
    assert peers["diffusers"].label == "diffusers StableDiffusionXLPipeline (PyTorch)"
    assert peers["optimum"].label == "Optimum ORTStableDiffusionXLPipeline (ONNX Runtime CPU)"
    assert peers["diffusers"].extra["pipeline"] == peers["optimum"].extra["pipeline"] == harness.SDXL_PIPELINE  # what the workers run
    assert peers["sdcpp"].skip_reason == workloads.SDCPP_SHAPES  # reduced widths: it refuses them
    assert peers["ours-native"].argv == ("/b/native_bench_worker",) and peers["ours-native"].skip_reason is None
    assert peers["ours-native"].label.startswith("ldm-rt native C++")
    # The SD workloads keep SD's classes, and their labels stay what the README's earlier tables said.
    sd = {p.name: p for p in run.peers_for(_prepared(harness.SD_PIPELINE), Path("/venv/bin/python"))}
    assert sd["diffusers"].label == "diffusers StableDiffusionPipeline (PyTorch)" == harness.PEER_LABELS["diffusers"]
    assert sd["optimum"].label == "Optimum ORTStableDiffusionPipeline (ONNX Runtime CPU)" == harness.PEER_LABELS["optimum"]
    assert sd["ours-native"].skip_reason == "not built"
    from benchmarks import targets

    assert targets.LABELS["diffusers"] == "diffusers StableDiffusion(XL)Pipeline (PyTorch)"  # a target spans both workloads
    with pytest.raises(harness.BenchError, match="StableDiffusion3Pipeline"):
        harness.pipeline_extra("StableDiffusion3Pipeline")


def test_torch_peers_draw_the_same_sdxl_image(folder, tmp_path):
    """The reference worker and the diffusers worker (told to run StableDiffusionXLPipeline) on the SDXL-shaped
    folder, same noise and DDIM: the same non-trivial image, with both encoders timed as the text stage."""
    import numpy as np
    from test_benchmarks_harness import torch_peer_images

    np.save(tmp_path / "noise.npy", np.random.default_rng(0).standard_normal((1, 4, 8, 8), dtype=np.float32))
    spec = {**harness.RunSpec(64, 64, steps=2, runs=1).to_dict(), "threads": 2, "noise_file": str(tmp_path / "noise.npy"),
            **harness.pipeline_extra(harness.SDXL_PIPELINE)}  # fmt: skip
    reference, diffusers = torch_peer_images(harness.Peer("reference", harness.worker_argv("reference"), str(folder)), "diffusers", folder, spec, tmp_path)
    assert reference.shape == (1, 64, 64, 3) and reference.std() > 5
    assert np.abs(reference.astype(int) - diffusers.astype(int)).max() <= 2


def test_openvino_genai_export_converts_both_sdxl_tokenizers(folder, tmp_path, monkeypatch):
    """Text2ImagePipeline reads tokenizer_2/ of an SDXL export as an OpenVINO model too: the export converts every
    tokenizer the diffusers folder has (one for SD, two for SDXL), each checked on the prompts."""
    from benchmarks.peers import openvino_genai_env

    commands = []
    monkeypatch.setattr(openvino_genai_env.subprocess, "run", lambda cmd, **_: commands.append(cmd) or type("Done", (), {"returncode": 0})())
    openvino_genai_env.export(folder, tmp_path / "ir", prompts=("a photo",))
    converted = [Path(c[3]).name for c in commands if c[2] == "tokenizer"]
    assert converted == ["tokenizer", "tokenizer_2"] and all(c[-2:] == ["--check", "a photo"] for c in commands[1:])
    (sd := tmp_path / "sd").mkdir()
    (sd / "tokenizer").mkdir()
    commands.clear()
    openvino_genai_env.export(sd, tmp_path / "ir_sd")
    assert [Path(c[3]).name for c in commands if c[2] == "tokenizer"] == ["tokenizer"]
