"""tau_theta: the CLIPTextModel wrapper, config import, SD v1 / OpenCLIP (SD v2) key maps, ONNX export."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ldm_rt.reference.checkpoint_errors import CheckpointError
from ldm_rt.reference.configs import ConfigError, TextEncoderConfig
from ldm_rt.reference.keymap_text_encoder import (
    text_encoder_parameter_shapes,
    text_encoder_state_dict_from_openclip,
    text_encoder_state_dict_from_sd_v1,
    text_encoder_state_dict_to_openclip,
)
from ldm_rt.reference.text_encoder import TextEncoder, build_text_encoder, text_encoder_config_from_transformers
from ldm_rt.runtime.tokenizer import PromptTokenizer

TOL = 1e-5


def tiny_config(layers: int = 3, hidden_act: str = "gelu") -> TextEncoderConfig:
    return TextEncoderConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=layers, num_attention_heads=4,
        max_position_embeddings=16, hidden_act=hidden_act, bos_token_id=62, eos_token_id=63, pad_token_id=0,
    )


def randomise_(module: torch.nn.Module, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if "norm" in name and name.endswith("weight"):
                p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(0.2 * torch.randn(p.shape, generator=g))


def random_ids(batch: int, length: int, seed: int) -> torch.Tensor:
    return torch.randint(0, 64, (batch, length), generator=torch.Generator().manual_seed(seed))


def test_wrapper_keys_and_output_match_transformers():
    config = tiny_config()
    hf = build_text_encoder(config, attn_implementation="sdpa").eval()  # another attention code path
    randomise_(hf, 0)
    ours = TextEncoder(config).eval()
    # Canonical checkpoint keys: "text_model." + transformers' own (prefix-less in transformers 5).
    assert all(k.startswith("text_model.") for k in ours.state_dict())
    ours.load_state_dict({f"text_model.{k}": v for k, v in hf.state_dict().items()})
    ids = random_ids(3, 16, 1)
    with torch.no_grad():
        out = ours(ids)
        assert out.shape == (3, 16, 32)
        assert (out - hf(input_ids=ids).last_hidden_state).abs().max() < TOL


def test_causal_mask():
    ours = TextEncoder(tiny_config()).eval()
    randomise_(ours, 2)
    ids = random_ids(1, 16, 3)
    changed = ids.clone()
    changed[0, 9] = (ids[0, 9] + 1) % 64
    with torch.no_grad():
        a, b = ours(ids), ours(changed)
    assert (a[:, :9] - b[:, :9]).abs().max() == 0  # earlier tokens never see later ones
    assert (a[:, 9:] - b[:, 9:]).abs().amax(dim=-1).min() > 1e-3  # every later one does


def test_openclip_conversion_drops_the_last_layer():
    """SD v2 layout: a 3-layer HF model written as OpenCLIP with an extra random 4th layer converts
    back to the 3-layer model (penultimate-layer conditioning)."""
    config = tiny_config(layers=3)
    hf = build_text_encoder(config).eval()
    randomise_(hf, 4)
    ours = TextEncoder(config)
    ours.load_state_dict({f"text_model.{k}": v for k, v in hf.state_dict().items()})
    openclip = text_encoder_state_dict_to_openclip(ours.state_dict(), config)
    g = torch.Generator().manual_seed(5)
    for key in [k for k in openclip if k.startswith("transformer.resblocks.2.")]:
        openclip[key.replace("resblocks.2.", "resblocks.3.")] = torch.randn(openclip[key].shape, generator=g)
    checkpoint = {f"cond_stage_model.model.{k}": v for k, v in openclip.items()}
    checkpoint["cond_stage_model.model.text_projection"] = torch.randn(32, 24, generator=g)
    checkpoint["model.diffusion_model.out.2.bias"] = torch.zeros(4)  # other components are ignored
    state, inferred = text_encoder_state_dict_from_openclip(checkpoint, num_attention_heads=4)
    assert inferred.num_hidden_layers == 3 and inferred.hidden_act == "gelu" and inferred.projection_dim == 24
    assert (inferred.vocab_size, inferred.hidden_size, inferred.intermediate_size, inferred.max_position_embeddings) == (64, 32, 64, 16)
    converted = TextEncoder(inferred).eval()
    converted.load_state_dict(state, strict=True)
    ids = random_ids(2, 16, 6)
    with torch.no_grad():
        assert (converted(ids) - hf(input_ids=ids).last_hidden_state).abs().max() < TOL
    # Without dropping, from_openclip inverts to_openclip exactly.
    full, full_config = text_encoder_state_dict_from_openclip(text_encoder_state_dict_to_openclip(ours.state_dict(), config), 4, drop_last_layer=False)
    assert full_config.num_hidden_layers == 3
    assert full.keys() == ours.state_dict().keys() and all(torch.equal(full[k], v) for k, v in ours.state_dict().items())


def test_openclip_errors_name_the_key():
    config = tiny_config(layers=2)
    openclip = text_encoder_state_dict_to_openclip(TextEncoder(config).state_dict(), config)
    missing = {k: v for k, v in openclip.items() if k != "transformer.resblocks.1.mlp.c_fc.bias"}
    with pytest.raises(CheckpointError, match=r"transformer\.resblocks\.1\.mlp\.c_fc\.bias"):
        text_encoder_state_dict_from_openclip(missing, num_attention_heads=4)
    with pytest.raises(CheckpointError, match=r"unexpected.*transformer\.extra"):
        text_encoder_state_dict_from_openclip({**openclip, "transformer.extra": torch.zeros(1)}, num_attention_heads=4)
    misshaped = {**openclip, "transformer.resblocks.0.ln_2.bias": torch.zeros(31)}
    with pytest.raises(CheckpointError, match=r"layers\.0\.layer_norm2\.bias"):
        text_encoder_state_dict_from_openclip(misshaped, num_attention_heads=4, drop_last_layer=False)
    with pytest.raises(CheckpointError, match="num_attention_heads"):
        text_encoder_state_dict_from_openclip(openclip, num_attention_heads=5)
    with pytest.raises(CheckpointError, match="OpenCLIP"):
        text_encoder_state_dict_from_openclip({"token_embedding.weight": torch.zeros(4, 4)})


def test_real_sd_v2_openclip_layout_on_meta():
    # OpenCLIP ViT-H/14 text tower as SD 2.x stores it: 24 resblocks of width 1024.
    with torch.device("meta"):
        checkpoint = {
            "positional_embedding": torch.empty(77, 1024),
            "token_embedding.weight": torch.empty(49408, 1024),
            "ln_final.weight": torch.empty(1024),
            "ln_final.bias": torch.empty(1024),
            "text_projection": torch.empty(1024, 1024),
            "logit_scale": torch.empty(()),
        }
        for n in range(24):
            p = f"transformer.resblocks.{n}."
            checkpoint.update({
                p + "attn.in_proj_weight": torch.empty(3072, 1024), p + "attn.in_proj_bias": torch.empty(3072),
                p + "attn.out_proj.weight": torch.empty(1024, 1024), p + "attn.out_proj.bias": torch.empty(1024),
                p + "ln_1.weight": torch.empty(1024), p + "ln_1.bias": torch.empty(1024),
                p + "ln_2.weight": torch.empty(1024), p + "ln_2.bias": torch.empty(1024),
                p + "mlp.c_fc.weight": torch.empty(4096, 1024), p + "mlp.c_fc.bias": torch.empty(4096),
                p + "mlp.c_proj.weight": torch.empty(1024, 4096), p + "mlp.c_proj.bias": torch.empty(1024),
            })
    state, config = text_encoder_state_dict_from_openclip({f"cond_stage_model.model.{k}": v for k, v in checkpoint.items()})
    # diffusers' stable-diffusion-2 text_encoder/config.json: 23 layers, 16 heads, gelu, projection 1024.
    assert (config.num_hidden_layers, config.num_attention_heads, config.hidden_act, config.projection_dim) == (23, 16, "gelu", 1024)
    assert (config.bos_token_id, config.eos_token_id, config.pad_token_id) == (49406, 49407, 0)
    assert state["text_model.encoder.layers.22.self_attn.v_proj.weight"].shape == (1024, 1024)
    assert "text_model.encoder.layers.23.mlp.fc1.weight" not in state


def test_sd_v1_layout():
    shapes = text_encoder_parameter_shapes(TextEncoderConfig())
    # SD v1's 197 cond_stage_model.transformer.* tensors less the position_ids buffer.
    assert len(shapes) == 196
    assert shapes["text_model.embeddings.token_embedding.weight"] == (49408, 768)
    assert shapes["text_model.embeddings.position_embedding.weight"] == (77, 768)
    assert shapes["text_model.encoder.layers.11.mlp.fc1.weight"] == (3072, 768)
    assert shapes["text_model.final_layer_norm.bias"] == (768,)
    config = tiny_config()
    ours = TextEncoder(config).state_dict()
    checkpoint = {f"cond_stage_model.transformer.{k}": v for k, v in ours.items()}
    checkpoint["cond_stage_model.transformer.text_model.embeddings.position_ids"] = torch.arange(16)[None]
    checkpoint["first_stage_model.quant_conv.bias"] = torch.zeros(8)
    TextEncoder(config).load_state_dict(text_encoder_state_dict_from_sd_v1(checkpoint), strict=True)
    with pytest.raises(CheckpointError, match="cond_stage_model.transformer"):
        text_encoder_state_dict_from_sd_v1({"model.x": torch.zeros(1)})


def test_config_from_transformers_json():
    sd_v1 = {  # openai/clip-vit-large-patch14 text config as in SD v1 text_encoder/config.json
        "architectures": ["CLIPTextModel"], "model_type": "clip_text_model", "hidden_act": "quick_gelu",
        "hidden_size": 768, "intermediate_size": 3072, "num_attention_heads": 12, "num_hidden_layers": 12,
        "max_position_embeddings": 77, "vocab_size": 49408, "projection_dim": 768, "bos_token_id": 0,
        "eos_token_id": 2, "pad_token_id": 1, "dropout": 0.0, "torch_dtype": "float32",
    }
    config = text_encoder_config_from_transformers(sd_v1)
    assert config.hidden_size == 768 and config.eos_token_id == 2 and config.projection_dim == 768
    full = {"model_type": "clip", "text_config": {**sd_v1, "hidden_act": "gelu"}}
    assert text_encoder_config_from_transformers(full).hidden_act == "gelu"
    with pytest.raises(ConfigError):
        text_encoder_config_from_transformers({"model_type": "t5"})


def test_small_jointly_trained_encoder_with_word_tokenizer(tmp_path):
    """The paper's tau_theta at toy scale: word-level ids feed the same wrapper; exports with dynamic batch."""
    import onnxruntime as ort

    tokenizer = PromptTokenizer.word_level(["a", "red", "blue", "circle", "square", "left", "right", "of", "the"], max_length=16)
    config = TextEncoderConfig(
        vocab_size=64, hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=tokenizer.max_length, hidden_act="gelu",
        bos_token_id=tokenizer.bos_id, eos_token_id=tokenizer.eos_id, pad_token_id=tokenizer.pad_id,
    )
    assert tokenizer.vocab_size <= config.vocab_size
    model = TextEncoder(config).eval()
    ids = torch.from_numpy(tokenizer(["a red circle left of a blue square", "the square"]).ids)
    with torch.no_grad():
        expected = model(ids)
    assert expected.shape == (2, 16, 128)
    path = tmp_path / "text_encoder.onnx"
    torch.onnx.export(
        model, (ids,), str(path), input_names=["input_ids"], output_names=["hidden"], opset_version=17,
        dynamo=False, dynamic_axes={"input_ids": {0: "B"}, "hidden": {0: "B"}},
    )
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for prompts in (["a red circle"], ["a", "blue square right of the circle", "red"]):
        batch = tokenizer(prompts).ids
        got = session.run(None, {"input_ids": batch})[0]
        with torch.no_grad():
            reference = model(torch.from_numpy(batch)).numpy()
        assert got.shape == (len(prompts), 16, 128)
        assert np.abs(got - reference).max() < 1e-4
