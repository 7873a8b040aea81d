"""runtime/lora.py without any model: file reading (safetensors parsed by us, bf16 widened, truncation and pickles
refused), "FILE[:SCALE]", key layouts (PEFT, kohya, LoCon), alpha (keys, PEFT metadata, default = rank), name
resolution against a module table (kohya's flattened names included), refusals naming the keys, and the
ONNX initializer reader and the graph with its weights referred to in place checked against the onnx package."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np
import pytest

from ldm_rt.runtime.lora import (
    LoraError,
    LoraFile,
    LoraSpec,
    ModuleInfo,
    as_specs,
    external_model_bytes,
    file_deltas,
    lazy_deltas,
    onnx_initializers,
    parse_lora_arg,
    read_lora,
)

BF16 = "BF16"


def write_safetensors(path: Path, tensors: dict[str, np.ndarray], metadata: dict[str, str] | None = None, bf16: bool = False) -> Path:
    """A .safetensors file written by hand (the format: u64 header length, JSON header, raw little-endian data)."""
    header: dict = {"__metadata__": metadata} if metadata else {}
    blobs, offset = [], 0
    for key, value in tensors.items():
        value = np.asarray(value, np.float32)
        if bf16:
            raw = (value.view(np.uint32) >> 16).astype(np.uint16).tobytes()  # truncation: exact for bf16-representable values
            dtype = BF16
        else:
            raw, dtype = value.tobytes(), "F32"
        header[key] = {"dtype": dtype, "shape": list(value.shape), "data_offsets": [offset, offset + len(raw)]}
        blobs.append(raw)
        offset += len(raw)
    text = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(text)) + text + b"".join(blobs))
    return path


TABLE = {
    "unet": {
        "input_blocks.1.1.transformer_blocks.0.attn1.to_q": ModuleInfo((8, 8), ("down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q",)),
        "input_blocks.1.0.in_layers.2": ModuleInfo((8, 4, 3, 3), ("down_blocks.0.resnets.0.conv1",)),
        "input_blocks.1.1.proj_in": ModuleInfo((8, 8, 1, 1), ("down_blocks.0.attentions.0.proj_in",)),
    },
    "text_encoder": {"text_model.encoder.layers.0.self_attn.q_proj": ModuleInfo((6, 6), ("encoder.layers.0.self_attn.q_proj",))},
}
Q = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"


def rand(*shape: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed + sum(shape)).standard_normal(shape).astype(np.float32)


def lora(tensors: dict[str, np.ndarray], metadata: dict[str, str] | None = None) -> LoraFile:
    return LoraFile(Path("x.safetensors"), "0" * 64, tensors, metadata or {})


def test_parse_lora_arg_scales_and_refusals():
    assert parse_lora_arg("a/style.safetensors") == LoraSpec(Path("a/style.safetensors"), 1.0)
    assert parse_lora_arg("a/style.safetensors:0.5") == LoraSpec(Path("a/style.safetensors"), 0.5)
    assert parse_lora_arg("dir:with:colons/x.safetensors:-1") == LoraSpec(Path("dir:with:colons/x.safetensors"), -1.0)
    with pytest.raises(LoraError, match="scale 'strong' is not a number"):
        parse_lora_arg("style.safetensors:strong")
    for bad in ("nan", "inf", "1e9"):
        with pytest.raises(LoraError, match="finite number"):
            parse_lora_arg(f"style.safetensors:{bad}")
    assert as_specs([("a.safetensors", 2), "b.safetensors:0.25"]) == [LoraSpec(Path("a.safetensors"), 2.0), LoraSpec(Path("b.safetensors"), 0.25)]
    with pytest.raises(LoraError, match="finite"):
        as_specs([("a.safetensors", "1")])
    with pytest.raises(LoraError, match=r"^a LoRA is a file, FILE:SCALE or a \(file, scale\) pair; got 3$"):
        as_specs([3])
    with pytest.raises(LoraError, match=r"^33 LoRAs given; at most 32 can be applied at once$"):
        as_specs(["a.safetensors"] * 33)


def test_read_safetensors_widens_bf16_and_keeps_metadata(tmp_path):
    down, up = rand(2, 8), rand(8, 2)
    f = write_safetensors(tmp_path / "l.safetensors", {f"unet.{Q}.lora_A.weight": down, f"unet.{Q}.lora_B.weight": up}, {"k": "v"}, bf16=True)
    got = read_lora(f)
    assert got.metadata == {"k": "v"} and len(got.sha256) == 64
    a = got.tensors[f"unet.{Q}.lora_A.weight"]
    assert a.dtype == np.float32 and a.shape == (2, 8)
    np.testing.assert_allclose(a, down, rtol=1 / 128)  # bf16 keeps 8 bits of mantissa
    assert not np.array_equal(a, down)  # really went through bf16


def test_truncated_non_safetensors_and_pickles_are_refused_in_one_line(tmp_path):
    f = write_safetensors(tmp_path / "l.safetensors", {"unet.x.lora_A.weight": rand(2, 8)})
    data = f.read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[:-5])
    (tmp_path / "tiny.safetensors").write_bytes(data[:4])
    (tmp_path / "junk.safetensors").write_bytes(b"\xff" * 64)
    (tmp_path / "model.ckpt").write_bytes(b"\x80\x04K\x01.")
    for name, match in (("cut", "truncated"), ("tiny", "truncated"), ("junk", "truncated or not a safetensors"), ("missing", "is missing; pass a LoRA .safetensors file")):
        with pytest.raises(LoraError, match=match) as e:
            read_lora(tmp_path / f"{name}.safetensors")
        assert "\n" not in str(e.value)
    with pytest.raises(LoraError, match="pickle .* never loads; convert it to .safetensors"):
        read_lora(tmp_path / "model.ckpt")


def test_peft_kohya_and_locon_deltas_with_their_alphas():
    down, up = rand(4, 8), rand(8, 4)
    conv_down, conv_up = rand(2, 4, 3, 3), rand(8, 2, 1, 1)
    # PEFT with alpha in diffusers' metadata (alpha_pattern for one module), alpha != rank.
    meta = {"lora_adapter_metadata": json.dumps({"unet.lora_alpha": 8, "unet.r": 4, "unet.alpha_pattern": {"conv1": 1}})}
    peft = lora({
        f"unet.{Q}.lora_A.weight": down, f"unet.{Q}.lora_B.weight": up,
        "unet.down_blocks.0.resnets.0.conv1.lora_A.weight": conv_down, "unet.down_blocks.0.resnets.0.conv1.lora_B.weight": conv_up,
    }, meta)  # fmt: skip
    d = file_deltas(peft, TABLE)["unet"]
    np.testing.assert_allclose(d["input_blocks.1.1.transformer_blocks.0.attn1.to_q"], 2.0 * up @ down, rtol=1e-6)
    expected_conv = (0.5 * conv_up.reshape(8, 2) @ conv_down.reshape(2, -1)).reshape(8, 4, 3, 3)  # alpha 1 / rank 2
    np.testing.assert_allclose(d["input_blocks.1.0.in_layers.2"], expected_conv, rtol=1e-6)
    # Without alpha anywhere: alpha = rank (diffusers' rule).
    plain = lora({f"unet.{Q}.lora_A.weight": down, f"unet.{Q}.lora_B.weight": up})
    np.testing.assert_allclose(file_deltas(plain, TABLE)["unet"]["input_blocks.1.1.transformer_blocks.0.attn1.to_q"], up @ down, rtol=1e-6)
    # kohya: flattened names (diffusers' or ours), .alpha keys; a Linear-shaped LoRA on a 1x1 conv; text encoder.
    kohya = lora({
        "lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": down, "lora_unet_down_blocks_0_attentions_0_proj_in.lora_up.weight": up,
        "lora_unet_down_blocks_0_attentions_0_proj_in.alpha": np.float32(2.0),
        "lora_unet_input_blocks_1_0_in_layers_2.lora_down.weight": conv_down, "lora_unet_input_blocks_1_0_in_layers_2.lora_up.weight": conv_up,
        "lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight": rand(3, 6), "lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight": rand(6, 3),
    })  # fmt: skip
    k = file_deltas(kohya, TABLE)
    np.testing.assert_allclose(k["unet"]["input_blocks.1.1.proj_in"], (0.5 * up @ down).reshape(8, 8, 1, 1), rtol=1e-6)
    assert k["unet"]["input_blocks.1.0.in_layers.2"].shape == (8, 4, 3, 3)
    np.testing.assert_allclose(k["text_encoder"]["text_model.encoder.layers.0.self_attn.q_proj"], rand(6, 3) @ rand(3, 6), rtol=1e-6)
    # Two files add up, each at its scale.
    both = lazy_deltas([(plain, 0.5), (peft, -1.0)], TABLE)["unet"]["input_blocks.1.1.transformer_blocks.0.attn1.to_q"].array()
    np.testing.assert_allclose(both, 0.5 * up @ down - 2.0 * up @ down, rtol=1e-5)


def test_kohya_names_are_resolved_against_real_names_not_guessed():
    table = {"unet": {"a.b_c": ModuleInfo((2, 2)), "a_b.c": ModuleInfo((2, 2)), "x.y_z": ModuleInfo((2, 2))}}
    ok = lora({"lora_unet_x_y_z.lora_down.weight": rand(1, 2), "lora_unet_x_y_z.lora_up.weight": rand(2, 1)})
    assert list(file_deltas(ok, table)["unet"]) == ["x.y_z"]
    ambiguous = lora({"lora_unet_a_b_c.lora_down.weight": rand(1, 2), "lora_unet_a_b_c.lora_up.weight": rand(2, 1)})
    with pytest.raises(LoraError, match="none of its 2 keys"):
        file_deltas(ambiguous, table)


def test_foreign_partial_and_unsupported_files_are_refused_naming_keys():
    sdxl = lora({"lora_te2_text_model_encoder_layers_0_mlp_fc1.lora_down.weight": rand(1, 4), "lora_te2_text_model_encoder_layers_0_mlp_fc1.lora_up.weight": rand(4, 1)})
    with pytest.raises(LoraError, match=r"none of its 2 keys .*text_encoder_2, which this model lacks.*another architecture"):
        file_deltas(sdxl, TABLE)
    partial = lora({f"unet.{Q}.lora_A.weight": rand(2, 8), f"unet.{Q}.lora_B.weight": rand(8, 2), "unet.mid_block.nothing.lora_A.weight": rand(2, 8),
                    "unet.mid_block.nothing.lora_B.weight": rand(8, 2), "unet.x.hada_w1_a": rand(2, 2)})  # fmt: skip
    with pytest.raises(LoraError, match=r"2 of its layers/keys .*unet\.mid_block\.nothing, unet\.x\.hada_w1_a") as e:
        file_deltas(partial, TABLE)
    assert "\n" not in str(e.value)
    wrong_shape = lora({f"unet.{Q}.lora_A.weight": rand(2, 16), f"unet.{Q}.lora_B.weight": rand(8, 2)})  # SD 2.x width on SD 1.x
    with pytest.raises(LoraError, match="delta for unet .* another architecture"):
        file_deltas(wrong_shape, TABLE)
    half = lora({f"unet.{Q}.lora_A.weight": rand(2, 8)})
    with pytest.raises(LoraError, match="no up matrix"):
        file_deltas(half, TABLE)


def test_onnx_initializer_reader_and_weights_referred_in_place_agree_with_onnx(tmp_path):
    onnx = pytest.importorskip("onnx")
    from onnx import TensorProto, helper, numpy_helper

    w = rand(3, 5)
    h = rand(5, 3).astype(np.float16)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"]), helper.make_node("MatMul", ["y", "h"], ["z"])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3])], [helper.make_tensor_value_info("z", TensorProto.FLOAT16, [1, 3])],
        [numpy_helper.from_array(w, "w"), numpy_helper.from_array(h, "h")],
    )  # fmt: skip
    path = tmp_path / "m.onnx"
    onnx.save(helper.make_model(graph), str(path))
    got = onnx_initializers(path, {"w", "h"})
    assert got["w"].dtype == np.float32 and np.array_equal(got["w"], w)
    assert got["h"].dtype == np.float16 and np.array_equal(got["h"], h)
    with pytest.raises(LoraError, match="has no initializer nope"):
        onnx_initializers(path, {"nope"})
    # The graph with the weights referred to in place (external data into the file itself): onnx reads the same
    # tensors back through those references; what is under INLINE_BYTES and not named stays inline.
    referred = onnx.load_from_string(external_model_bytes(path, {"w"}))
    kinds = {t.name: t.data_location for t in referred.graph.initializer}
    assert kinds == {"w": TensorProto.EXTERNAL, "h": TensorProto.DEFAULT}
    onnx.external_data_helper.load_external_data_for_model(referred, str(tmp_path))
    reread = {t.name: numpy_helper.to_array(t) for t in referred.graph.initializer}
    assert np.array_equal(reread["w"], w) and np.array_equal(reread["h"], h)
    with pytest.raises(LoraError, match="has no initializer nope"):
        external_model_bytes(path, {"nope"})
    # Past 2 GB the weights live in an external .data file beside the model: read from there.
    external = tmp_path / "ext.onnx"
    onnx.save(helper.make_model(graph), str(external), save_as_external_data=True, all_tensors_to_one_file=True,
              location="ext.onnx.data", size_threshold=0)  # fmt: skip
    got = onnx_initializers(external, {"w", "h"})
    assert np.array_equal(got["w"], w) and np.array_equal(got["h"], h)
    again = onnx.load_from_string(external_model_bytes(external, {"w"}))  # already external: kept as they are
    assert {e.key: e.value for e in again.graph.initializer[0].external_data}["location"] == "ext.onnx.data"
