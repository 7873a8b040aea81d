"""benchmarks/workloads.py: the SD-v1- and SD-v2-shaped models are what their names say (head counts,
projections), written by diffusers and read the same way by ldm-rt's reference; their tokenizer folder gives
transformers and ldm-rt the same ids."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `benchmarks` is imported from the checkout's root
from benchmarks import workloads  # noqa: E402

pytest.importorskip("diffusers")


def test_head_rules():
    assert workloads.SDShape().heads_per_level() == (8, 8, 8, 8) and workloads.SDShape().generation == 1
    assert workloads.SD2_SHAPE.heads_per_level() == (1, 2, 4, 4) and workloads.SD2_SHAPE.generation == 2


@pytest.mark.parametrize("head_width", [None, 32])
def test_the_reference_reads_the_heads_diffusers_wrote(tmp_path, head_width):
    from ldm_rt.reference.attention import CrossAttention
    from ldm_rt.reference.checkpoints import load_model

    shape = workloads.SDShape(unet_channels=(32, 64), unet_layers_per_block=1, unet_heads=4, unet_head_width=head_width,
                              text_hidden=32, text_layers=1, text_heads=2, text_intermediate=64, vae_channels=(32, 32), vae_layers_per_block=1)
    folder = workloads.make_sd_shaped(tmp_path / "m", shape)
    config = json.loads((folder / "unet" / "config.json").read_text())
    assert config["use_linear_projection"] is (head_width is not None)
    unet = load_model(folder).model.unet
    widths = sorted({(m.heads, m.heads * m.dim_head) for m in unet.modules() if isinstance(m, CrossAttention)}, key=lambda hw: hw[1])
    # SD v1's rule: 4 heads whatever the width; SD v2's: 32-wide heads, so 1 and 2 heads.
    assert widths == ([(4, 32), (4, 64)] if head_width is None else [(1, 32), (2, 64)])
    # The word-level tokenizer folder: transformers' fast tokenizer (what diffusers and Optimum load) and
    # ldm-rt's loader give the same ids for a benchmark prompt.
    from transformers import PreTrainedTokenizerFast

    from ldm_rt.runtime.tokenizer import PromptTokenizer

    prompt = "a photo of an astronaut riding a horse on the moon"
    theirs = PreTrainedTokenizerFast.from_pretrained(folder / "tokenizer")(prompt, padding="max_length", max_length=shape.max_length)["input_ids"]
    ours = PromptTokenizer.from_diffusers_folder(folder / "tokenizer")([prompt]).ids[0]
    assert list(ours) == theirs and len(set(theirs)) > 5  # every word known: no <|unk|> runs
