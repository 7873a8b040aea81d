"""ldm-rt-native --lora FILE[:SCALE] (cpp/native/src/lora.cpp) against `ldm-rt sample --backend openvino --lora`
(runtime/lora.py): the same image (both engines fp32: >= 45 dB, as test_native_runtime.py) and the same PNG
`parameters` JSON for a diffusers/PEFT file (alpha from its metadata, LoCon 3x3 convs, text encoder), a kohya file
(`.alpha` keys, flattened names, LoCon, `lora_te_*`) with a PEFT one of other alpha rules (alpha_pattern, rsLoRA) and
dtypes (F16, F64) at scales, a manifest's LoRAs fused at export recorded first, the fp16 build, and an
SDXL base (`lora_te1_` / `lora_te2_` / `lora_unet_`); each comparison also shown to fail without the LoRA or with
another scale (measured well below the bar). Bad input (a missing, truncated or non-float file, a pickle, a LoRA for
another model or with unmatched keys, DoRA, too many files, a scale that is not a number or out of range) gets
Python's one line, exit 2, nothing written. The LoRA files are
tests/test_lora_fixtures.py's; the native build and the exports are the session's shared ones."""

from __future__ import annotations

import json
import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest
from test_lora_fixtures import make_kohya_lora, make_peft_lora
from sdxl_small_models import SIZE as SDXL_SIZE
from test_lora_formats import write_safetensors
from test_native_sdxl import cli_errors, native, native_sample, python_sample  # noqa: F401  (native: the session's native build)
from test_runtime_fixtures import exported, psnr

from ldm_rt.runtime.lora import LoraTargets

pytest.importorskip("openvino")
pytest.importorskip("peft")

NATIVE_DB = 45.0  # both engines fp32 (test_native_runtime.py)
WRONG_DB = 30.0  # a missing LoRA or another scale lands far below the bar
SIZE = 16  # the tiny SD export's profile: 8..24
COMMON = ["--prompt", "a red car", "--steps", "2", "--seed", "3", "--height", str(SIZE), "--width", str(SIZE)]
SDXL_COMMON = [*COMMON[:-4], "--height", str(SDXL_SIZE), "--width", str(SDXL_SIZE)]


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory, tiny_sd_v1) -> Path:
    return exported(tmp_path_factory, tiny_sd_v1, fp16=True)  # the LoRA tests' shared export (fp32 and fp16 files)


def peft_variant(peft: Path, out: Path) -> Path:
    """The PEFT file with PEFT's other alpha rules in its metadata (an alpha_pattern, one entry a regex; rsLoRA; another
    text-encoder alpha) and its tensors stored as F16, F64 and F32 in turn."""
    from safetensors import safe_open
    from safetensors.numpy import load_file, save_file

    with safe_open(str(peft), "np") as f:
        config = json.loads(f.metadata()["lora_adapter_metadata"])
    config |= {"unet.alpha_pattern": {"to_q": 2.0, "down_blocks.0.*conv1": 16}, "unet.use_rslora": True, "text_encoder.lora_alpha": 3}
    dtypes = (np.float16, np.float64, np.float32)
    tensors = {k: v.astype(dtypes[i % 3]) for i, (k, v) in enumerate(load_file(str(peft)).items())}
    save_file(tensors, str(out), metadata={"lora_adapter_metadata": json.dumps(config)})
    return out


@pytest.fixture(scope="module")
def made(tiny_sd_v1, tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("native_loras")
    peft = make_peft_lora(tiny_sd_v1, folder).file
    return {"peft": peft, "kohya": make_kohya_lora(tiny_sd_v1, folder).file, "peft_variant": peft_variant(peft, folder / "variant.safetensors")}


@pytest.fixture(scope="module")
def fused(artifacts, tmp_path_factory) -> Path:
    """A copy of the artifacts whose manifest says LoRAs were fused at export (source.loras, written by hand): Python
    records each as the manifest holds it plus "applied": "export", before the run-time ones."""
    copy = shutil.copytree(artifacts, tmp_path_factory.mktemp("native_fused") / "artifacts")
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["source"]["loras"] = [
        {"file": "styl\u00e9.safetensors", "sha256": "ab" * 32, "scale": 0.7, "path": "/loras/styl\u00e9.safetensors", "rank": 4},
        "not a record", {"scale": 1e-7, "applied": "elsewhere", "nested": {"b": [1, 2.5], "a": None}},
    ]
    (copy / "manifest.json").write_text(json.dumps(manifest))
    return copy


@pytest.fixture(scope="module")
def plain(native, artifacts, tmp_path_factory) -> np.ndarray:  # noqa: F811
    """Native's image without a LoRA (the effect of each LoRA is measured against it)."""
    return native_sample(native, artifacts, tmp_path_factory.mktemp("native_plain") / "plain.png", *COMMON)[0]


def lora_args(made: dict[str, Path], case: list[tuple[str, str]]) -> list[str]:
    return [a for name, scale in case for a in ("--lora", f"{made[name]}{scale}")]


CASES = {
    "peft": [("peft", "")],
    "both, scaled": [("peft_variant", ":0.5"), ("kohya", ":-0.8")],  # kohya's part moves the image too (measured below)
}


@pytest.mark.parametrize("case", list(CASES))
def test_native_applies_loras_as_ldm_rt_sample(native, artifacts, fused, made, plain, tmp_path, case):  # noqa: F811
    model = fused if case == "both, scaled" else artifacts  # the same weights; its manifest records fused LoRAs too
    args = [*COMMON, *lora_args(made, CASES[case])]
    want, want_params = python_sample(model, tmp_path / "py.png", *args)
    got, got_params = native_sample(native, model, tmp_path / "c.png", *args)
    db = psnr(got, want)
    assert db >= NATIVE_DB, f"{case}: native vs ldm-rt sample {db:.1f} dB"
    assert got_params == want_params
    records = json.loads(got_params)["loras"]
    run_time = [(r["file"], r["scale"]) for r in records if r["applied"] == "run time"]
    assert run_time == [(Path(made[n]).name, float(s[1:] or 1)) for n, s in CASES[case]]
    assert len(records) == len(run_time) + (2 if model == fused else 0)
    # The LoRA's effect, measured: without it, or at another scale, native lands far from Python's image.
    other = [("peft_variant", ":0.5")] if case != "peft" else [("peft", ":0")]
    rescaled, _ = native_sample(native, artifacts, tmp_path / "rescaled.png", *COMMON, *lora_args(made, other))
    print(f"{case}: native vs ldm-rt sample {db:.1f} dB; without the LoRA {psnr(plain, want):.1f} dB; {other} {psnr(rescaled, want):.1f} dB")
    assert psnr(plain, want) < WRONG_DB and psnr(rescaled, want) < WRONG_DB


def test_native_applies_loras_to_the_fp16_build(native, artifacts, made, tmp_path):  # noqa: F811
    """fp16 weights are patched as Python patches them: widened, the float32 delta added, rounded back to fp16."""
    args = [*COMMON, "--precision", "fp16", *lora_args(made, CASES["both, scaled"])]
    want, want_params = python_sample(artifacts, tmp_path / "py.png", *args)
    got, got_params = native_sample(native, artifacts, tmp_path / "c.png", *args)
    print(f"fp16: native vs ldm-rt sample {psnr(got, want):.1f} dB")
    assert psnr(got, want) >= NATIVE_DB and got_params == want_params


def sdxl_lora(base: Path, path: Path) -> Path:
    """A kohya LoRA for the small SDXL base drawn from its own module table: two patchable modules of each text encoder
    (`lora_te1_`, `lora_te2_`) and of the UNet (`lora_unet_`, SD's original names; a k x k conv among them: LoCon)."""
    targets = LoraTargets.read(base)
    patchable = {c: [m for m in ms if all(m in f["targets"] and m not in f["unused"] for f in targets.files.values() if f["component"] == c)]
                 for c, ms in targets.modules.items()}  # fmt: skip
    rng = np.random.default_rng(5)
    tensors: dict[str, np.ndarray] = {}
    for component, prefix in (("text_encoder", "lora_te1_"), ("text_encoder_2", "lora_te2_"), ("unet", "lora_unet_")):
        table = targets.modules[component]
        chosen = patchable[component][:2]
        if component == "unet":
            chosen += [m for m in patchable[component] if len(table[m].shape) == 4 and table[m].shape[2:] != (1, 1)][:1]
        for module in chosen:
            info = table[module]
            name = (info.aliases[0] if component == "unet" and info.aliases else module).replace(".", "_")
            out, rest = info.shape[0], int(np.prod(info.shape[1:]))
            down = rng.standard_normal((2, rest)) / np.sqrt(rest)
            up = 2.0 * rng.standard_normal((out, 2))
            if len(info.shape) == 4:
                down, up = down.reshape(2, *info.shape[1:]), up.reshape(out, 2, 1, 1)
            tensors |= {f"{prefix}{name}.lora_down.weight": down, f"{prefix}{name}.lora_up.weight": up, f"{prefix}{name}.alpha": np.float32(1.0)}
    return write_safetensors(path, tensors)


def test_native_applies_a_lora_to_sdxl(native, small_sdxl_base, tmp_path):  # noqa: F811
    base = small_sdxl_base[1]
    lora = sdxl_lora(base, tmp_path / "sdxl_lora.safetensors")
    args = [*SDXL_COMMON, "--lora", f"{lora}:0.9"]
    want, want_params = python_sample(base, tmp_path / "py.png", *args)
    got, got_params = native_sample(native, base, tmp_path / "c.png", *args)
    plain, _ = native_sample(native, base, tmp_path / "plain.png", *SDXL_COMMON)
    print(f"SDXL: native vs ldm-rt sample {psnr(got, want):.1f} dB; without the LoRA {psnr(plain, want):.1f} dB")
    assert psnr(got, want) >= NATIVE_DB and got_params == want_params
    assert psnr(plain, want) < WRONG_DB


@pytest.fixture(scope="module")
def bad(artifacts, tmp_path_factory) -> dict[str, str | list[str]]:
    """--lora value(s) per refusal."""
    folder = tmp_path_factory.mktemp("bad_loras")
    pickled = folder / "evil.ckpt"
    pickled.write_bytes(pickle.dumps({"x": 1}))
    rng = np.random.default_rng(0)
    foreign = write_safetensors(folder / "sdxl_only.safetensors", {
        "lora_unet_input_blocks_4_1_transformer_blocks_0_attn2_to_k.lora_down.weight": rng.standard_normal((4, 2048)),
        "lora_unet_input_blocks_4_1_transformer_blocks_0_attn2_to_k.lora_up.weight": rng.standard_normal((640, 4)),
        "lora_te2_text_model_encoder_layers_0_mlp_fc1.lora_down.weight": rng.standard_normal((4, 1280)),
        "lora_te2_text_model_encoder_layers_0_mlp_fc1.lora_up.weight": rng.standard_normal((5120, 4)),
    })  # fmt: skip
    module, info = next(iter(LoraTargets.read(artifacts).modules["unet"].items()))
    out_dim, rest = info.shape[0], int(np.prod(info.shape[1:]))
    known = {f"unet.{module}.lora_A.weight": rng.standard_normal((2, rest)), f"unet.{module}.lora_B.weight": rng.standard_normal((out_dim, 2))}
    half_known = write_safetensors(folder / "half_known.safetensors", {
        **known, "unet.no.such.module.lora_A.weight": rng.standard_normal((2, 4)),
        "unet.no.such.module.lora_B.weight": rng.standard_normal((4, 2)), "unet.x.hada_w1_a": rng.standard_normal((2, 4)),
        f"unet.{module}.lora_magnitude_vector": rng.standard_normal(out_dim),
    })  # fmt: skip
    wider = write_safetensors(folder / "wider.safetensors", {
        f"unet.{module}.lora_A.weight": rng.standard_normal((2, 2 * rest)), f"unet.{module}.lora_B.weight": rng.standard_normal((out_dim, 2)),
    })  # fmt: skip
    truncated = folder / "truncated.safetensors"
    truncated.write_bytes(foreign.read_bytes()[:-16])
    int8 = folder / "int8.safetensors"
    header = json.dumps({"a": {"dtype": "I8", "shape": [2], "data_offsets": [0, 2]}}).encode()
    int8.write_bytes(len(header).to_bytes(8, "little") + header + b"12")
    dora = write_safetensors(folder / "dora.safetensors", known, metadata={"lora_adapter_metadata": json.dumps({"unet.use_dora": True})})
    return {
        "truncated": str(truncated),
        "not a float tensor": str(int8),
        "DoRA": str(dora),
        "too many": [str(folder / "nowhere.safetensors")] * 33,
        "missing file": str(folder / "nowhere.safetensors"),
        "pickle": str(pickled),
        "another architecture": str(foreign),
        "unmatched keys": str(half_known),
        "another architecture, same names": str(wider),
        "scale not a number": f"{foreign}:lots",
        "scale out of range": f"{foreign}:5e3",
        "scale not finite": f"{foreign}:-inf",
        "not safetensors": str(folder / "style.TXT"),  # the suffix as written, in both runtimes
        "pickle, capitals": str(folder / "style.CKPT"),
    }


def test_native_refuses_bad_loras_with_pythons_line(native, artifacts, bad, tmp_path):  # noqa: F811
    for case, value in bad.items():
        out = tmp_path / f"{case}.png"
        loras = [a for v in ([value] if isinstance(value, str) else value) for a in ("--lora", v)]
        want, got = cli_errors(native, "--model", artifacts, *loras, "--out", out, backend="openvino")
        assert got == want, case
        assert not out.exists()
