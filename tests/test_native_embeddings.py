"""ldm-rt-native --embedding FILE[:TOKEN] (cpp/native/src/embeddings.cpp) against `ldm-rt sample --backend openvino
--embedding` (runtime/embeddings.py): the same image (both engines fp32: >= 45 dB, as test_native_runtime.py) and the
same PNG `parameters` JSON, byte for byte, for a diffusers file in the prompt, an A1111 `emb_params` file under
another trigger (FILE:TOKEN) in the negative prompt of the fp16 build, a folder with an embedding baked in at export
plus one added at run time (the records of both), and the small SDXL base reading `clip_l` / `clip_g` into its two
encoders; each comparison also shown to fail without the embedding (measured well below the bar). Bad input (a
missing, truncated or foreign file, a wrong width, a bad or taken trigger, two files with one trigger, too many files)
gets Python's one line, exit 2, nothing written; a torch file (.pt, .bin), which Python reads through its restricted
unpickler, gets native's own line naming the conversion. The files are tests/test_textual_inversion.py's; the native
build and the exports are the session's shared ones."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
from sdxl_small_models import SIZE as SDXL_SIZE
from test_native_sdxl import cli_errors, native, native_sample, python_sample  # noqa: F401  (native: the session's native build)
from test_runtime_fixtures import exported, one_line_error, psnr
from test_textual_inversion import vectors, write_file
from tiny_models import TINY_SDXL_TEXT_2_DIM, TINY_SDXL_TEXT_DIM

from ldm_rt.runtime.embeddings import TokenRows, read_embedding, token_table
from ldm_rt.runtime.tokenizer import PromptTokenizer

pytest.importorskip("openvino")
onnx = pytest.importorskip("onnx")
safetensors_torch = pytest.importorskip("safetensors.torch")

NATIVE_DB = 45.0  # both engines fp32 (test_native_runtime.py)
WRONG_DB = 30.0  # without the embedding the image lands far below the bar
SIZE = 16  # the tiny SD export's profile: 8..24
COMMON = ["--steps", "2", "--seed", "3", "--height", str(SIZE), "--width", str(SIZE)]


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory, tiny_sd_v1) -> Path:
    return exported(tmp_path_factory, tiny_sd_v1, fp16=True)  # the session's shared export (fp32 and fp16 files)


@pytest.fixture(scope="module")
def made(tmp_path_factory) -> dict[str, tuple[Path, str]]:
    """name -> (file, trigger): diffusers' learned_embeds (3 vectors, the key is the trigger) and A1111's emb_params
    (2 vectors, the stem is the trigger)."""
    folder = tmp_path_factory.mktemp("native_embeddings")
    made = {}
    for name, fmt in (("diffusers", "diffusers.safetensors"), ("a1111", "a1111.safetensors")):
        path, token, _ = write_file(folder / name, fmt, seed=len(made))
        made[name] = (path, token)
    return made


def compare(native, model: Path, folder: Path, args: list[str], embedding_args: list[str]) -> tuple[float, float, str]:  # noqa: F811
    """(native vs Python dB with the embeddings, native without them vs Python dB, the parameters), both runtimes'
    parameters asserted equal."""
    want, want_params = python_sample(model, folder / "py.png", *args, *embedding_args)
    got, got_params = native_sample(native, model, folder / "native.png", *args, *embedding_args)
    assert got_params == want_params
    plain, _ = native_sample(native, model, folder / "plain.png", *args)
    return psnr(got, want), psnr(plain, want), got_params


def test_native_reads_a_diffusers_file_in_the_prompt(native, artifacts, made, tmp_path):  # noqa: F811
    path, token = made["diffusers"]
    db, without, params = compare(native, artifacts, tmp_path, ["--prompt", f"a {token.upper()} cat", "--negative-prompt", "blurry", *COMMON],
                                  ["--embedding", str(path)])  # fmt: skip
    print(f"diffusers: native vs ldm-rt sample {db:.1f} dB; without the embedding {without:.1f} dB")
    assert db >= NATIVE_DB and without < WRONG_DB
    record = {"applied": "run time", "file": path.name, "sha256": read_embedding(path).sha256, "token": token, "vectors": 3}
    assert json.loads(params)["embeddings"] == [record]


def test_native_reads_an_a1111_file_under_another_trigger_in_the_negative_prompt_of_the_fp16_build(native, artifacts, made, tmp_path):  # noqa: F811
    """fp16 token tables grow as Python grows them: the rows rounded to float16 as numpy's astype."""
    path, _ = made["a1111"]
    args = ["--prompt", "a red car", "--negative-prompt", "ugly, myneg", "--precision", "fp16", "--guidance", "9", *COMMON]
    db, without, params = compare(native, artifacts, tmp_path, args, ["--embedding", f"{path}:myneg"])
    print(f"A1111, fp16: native vs ldm-rt sample {db:.1f} dB; without the embedding {without:.1f} dB")
    assert db >= NATIVE_DB and without < WRONG_DB
    assert [(r["file"], r["token"], r["vectors"]) for r in json.loads(params)["embeddings"]] == [(path.name, "myneg", 2)]


@pytest.fixture(scope="module")
def baked(artifacts, made, tmp_path_factory) -> Path:
    """A copy of the export with the A1111 file baked in as build_engines.py --embedding bakes it: the tokenizer.json
    PromptTokenizer.with_added_tokens writes, the fp32 text encoder's token table grown by runtime/embeddings.token_table,
    the manifest's hashes, vocabulary size and source.embeddings record (reference/embeddings.bake_embeddings' keys)."""
    root = shutil.copytree(artifacts, tmp_path_factory.mktemp("native_baked") / "artifacts")
    embedding = read_embedding(made["a1111"][0])
    manifest = json.loads((root / "manifest.json").read_text())
    tokenizer, ids = PromptTokenizer.from_file(root / manifest["tokenizer"]["file"]).with_added_tokens([(embedding.token, embedding.count)])
    tokenizer.save(root / manifest["tokenizer"]["file"])
    entry = manifest["components"]["text_encoder"]["precisions"]["fp32"]["onnx"]
    name, table = token_table(root / entry["file"], TokenRows(ids[0][0], embedding.vectors[""]))
    model = onnx.load(str(root / entry["file"]))
    (init,) = [i for i in model.graph.initializer if i.name == name]
    init.CopyFrom(onnx.numpy_helper.from_array(table, name))
    onnx.save(model, str(root / entry["file"]))
    for e in (entry, manifest["tokenizer"]):
        data = (root / e["file"]).read_bytes()
        e |= {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
    manifest["components"]["text_encoder"]["contract"]["extra"]["vocab_size"] = tokenizer.vocab_size
    manifest["source"]["embeddings"] = [{**embedding.record(), "path": str(embedding.path.resolve())}, "not a record"]
    (root / "manifest.json").write_text(json.dumps(manifest))
    return root


def test_native_records_a_baked_embedding_before_a_run_time_one(native, baked, made, tmp_path):  # noqa: F811
    """The baked trigger reads through tokenizer.json's Replace normalizer, the run-time one is added after it (its ids
    and private-use character after the baked ones); the parameters list both, "export" first, as Python does."""
    path, token = made["diffusers"]
    baked_token = made["a1111"][1]
    args = ["--prompt", f"a {token} cat, {baked_token}", "--negative-prompt", "blurry", *COMMON]
    db, without, params = compare(native, baked, tmp_path, args, ["--embedding", str(path)])
    print(f"baked + run time: native vs ldm-rt sample {db:.1f} dB; without the run-time embedding {without:.1f} dB")
    assert db >= NATIVE_DB and without < WRONG_DB
    assert [(r["token"], r["applied"]) for r in json.loads(params)["embeddings"]] == [(baked_token, "export"), (token, "run time")]


def test_native_reads_clip_l_and_clip_g_into_sdxls_two_encoders(native, small_sdxl_base, tmp_path):  # noqa: F811
    base = small_sdxl_base[1]
    path = tmp_path / "xlstyle.safetensors"
    safetensors_torch.save_file({"clip_l": vectors(2, TINY_SDXL_TEXT_DIM, seed=1), "clip_g": vectors(2, TINY_SDXL_TEXT_2_DIM, seed=2)}, str(path))
    args = ["--prompt", "a xlstyle cat", "--negative-prompt", "blurry", "--guidance", "5", *COMMON[:-4], "--height", str(SDXL_SIZE), "--width", str(SDXL_SIZE)]
    db, without, _ = compare(native, base, tmp_path, args, ["--embedding", str(path)])
    print(f"SDXL: native vs ldm-rt sample {db:.1f} dB; without the embedding {without:.1f} dB")
    assert db >= NATIVE_DB and without < WRONG_DB


@pytest.fixture(scope="module")
def bad(made, tmp_path_factory) -> dict[str, list[str]]:
    """--embedding value(s) per refusal Python and native word alike."""
    folder = tmp_path_factory.mktemp("bad_embeddings")
    safetensors_torch.save_file({"wide": vectors(1, 16)}, str(wide := folder / "wide.safetensors"))
    safetensors_torch.save_file({"a": vectors(1)}, str(taken := folder / "taken.safetensors"))
    safetensors_torch.save_file({"a.lora_down.weight": vectors(2), "a.lora_up.weight": vectors(2)}, str(lora := folder / "lora.safetensors"))
    safetensors_torch.save_file({"clip_l": vectors(2)}, str(sdxl := folder / "sdxl.safetensors"))
    safetensors_torch.save_file({"emb_params": vectors(76)}, str(long := folder / "long.safetensors"))
    diffusers, token = made["diffusers"]
    (cut := folder / "cut.safetensors").write_bytes(diffusers.read_bytes()[:-8])
    twin = folder / "twin" / "badhands.safetensors"
    twin.parent.mkdir()
    shutil.copy(made["a1111"][0], twin)
    return {
        "missing": [str(folder / "nope.safetensors")],
        "missing .pt": [str(folder / "nope.pt")],
        "unknown type": [str(folder / "x.CKPT")],
        "truncated": [str(cut)],
        "a LoRA": [str(lora)],
        "an SDXL file": [str(sdxl)],
        "too many vectors": [str(long)],
        "wrong width": [str(wide)],
        "token in the vocabulary": [str(taken)],
        "trigger with a space": [f"{diffusers}:my tok"],
        "empty trigger": [f"{diffusers}:"],
        "two files, one trigger": [str(made["a1111"][0]), str(twin)],
        "twins to the tokenizer": [f"{diffusers}:MyStyle", f"{made['a1111'][0]}:mystyle"],
        "too many files": [str(diffusers)] * 65,
    }


def test_native_refuses_bad_embeddings_with_pythons_line(native, artifacts, bad, tmp_path):  # noqa: F811
    for case, values in bad.items():
        out = tmp_path / f"{case}.png"
        args = [a for v in values for a in ("--embedding", v)]
        want, got = cli_errors(native, "--model", artifacts, *args, "--out", out, backend="openvino")
        assert got == want, case
        assert not out.exists()


def test_native_refuses_torch_files_naming_the_conversion(native, artifacts, tmp_path):  # noqa: F811
    """Python reads .pt / .bin through its restricted unpickler; native reads no pickles and says how to convert one
    (with that reader), in one line, before anything loads."""
    path, _, _ = write_file(tmp_path, "a1111.pt")
    out = tmp_path / "out.png"
    done = native.run("--model", artifacts, "--prompt", "a cat", "--embedding", path, "--out", out)
    line = one_line_error(done.returncode, done.stderr, "ldm-rt-native")
    assert f"embedding {path} is a torch file (.pt), which ldm-rt-native does not read; convert it to .safetensors" in line
    assert "read_embedding" in line and not out.exists()
