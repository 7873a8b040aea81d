"""Textual inversion (runtime/embeddings.py): embedding files as diffusers, A1111 and Civitai users bring them, their
trigger words in prompts and negative prompts, against diffusers' `load_textual_inversion` on the tiny SD and the
small SDXL (both encoders), on ONNX Runtime and OpenVINO. The vectors are drawn large, so that an embedding moves
the image far below the parity bar: the oracle with the embedding and without it, or with other vectors under the
same trigger, differ by far more than the bar allows (measured in each test)."""

from __future__ import annotations

import json
import os
import pickle
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from test_runtime_fixtures import exported, one_line_error, psnr, run_cli

from ldm_rt.runtime.embeddings import EmbeddingError, TokenRows, as_specs, parse_embedding_arg, read_embedding
from ldm_rt.runtime.manifest import Manifest
from ldm_rt.runtime.pipeline import Pipeline

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
safetensors_torch = pytest.importorskip("safetensors.torch")
pytestmark = pytest.mark.usefixtures("torch_one_thread")

SIZE, STEPS, SEED, GUIDANCE = 16, 4, 3, 7.5
WIDTH = 32  # the tiny SD's token width
GAIN = 3.0  # vectors ~3x a token's: the embedding dominates the prompt
FP32_DB, SENSITIVE_DB = 50.0, 40.0
PROMPTS = {"prompt": ("a {} cat", "blurry"), "negative prompt": ("a red car", "{} blurry")}


def vectors(n: int, width: int = WIDTH, seed: int = 0) -> torch.Tensor:
    return (torch.randn(n, width, generator=torch.Generator().manual_seed(seed)) * GAIN).contiguous()


def latents(size: int = SIZE) -> np.ndarray:
    return np.random.default_rng(SEED).standard_normal((1, 4, size // 2, size // 2), dtype=np.float32)


# ---- the files, as each tool writes them -------------------------------------------------------------------------
def write_file(folder: Path, fmt: str, seed: int = 0) -> tuple[Path, str, torch.Tensor]:
    """(file, its trigger word, its vectors (N, D)) in format `fmt`."""
    folder.mkdir(parents=True, exist_ok=True)
    if fmt == "diffusers.safetensors":  # learned_embeds.safetensors: {token: (N, D)}, 3 vectors
        v = vectors(3, seed=seed)
        safetensors_torch.save_file({"mytok": v}, str(path := folder / "learned_embeds.safetensors"))
        return path, "mytok", v
    if fmt == "diffusers.bin":  # torch.save({token: (D,)}), one bf16 vector
        v = vectors(1, seed=seed)
        torch.save({"sksstyle": v[0].bfloat16()}, path := folder / "learned_embeds.bin")
        return path, "sksstyle", v.bfloat16().float()
    if fmt == "a1111.pt":  # A1111's training output: string_to_param, name = the file's stem; fp16
        v = vectors(2, seed=seed)
        data = {"string_to_token": {"*": 265}, "string_to_param": {"*": v.half().requires_grad_()}, "name": "easyneg",
                "step": 500, "sd_checkpoint": "0123abcd", "sd_checkpoint_name": "tiny"}  # fmt: skip
        torch.save(data, path := folder / "easyneg.pt")
        return path, "easyneg", v.half().float()
    if fmt == "a1111.safetensors":  # A1111 / Civitai: emb_params, the trigger is the file's stem
        v = vectors(2, seed=seed)
        safetensors_torch.save_file({"emb_params": v}, str(path := folder / "badhands.safetensors"))
        return path, "badhands", v
    raise ValueError(fmt)


def sd_oracle(folder: Path, prompt: str, negative: str, embedding: tuple[str, torch.Tensor | Path] | None) -> np.ndarray:
    """diffusers' image with the embedding (token, file or tensor) loaded by its load_textual_inversion."""
    pipe = diffusers.StableDiffusionPipeline.from_pretrained(folder, safety_checker=None, requires_safety_checker=False)
    pipe.scheduler = diffusers.DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    if embedding is not None:
        pipe.load_textual_inversion(embedding[1], token=embedding[0])
    with torch.no_grad():
        images = pipe(
            prompt, negative_prompt=negative, num_inference_steps=STEPS, guidance_scale=GUIDANCE,
            latents=torch.from_numpy(latents()), height=SIZE, width=SIZE, output_type="np",
        ).images  # fmt: skip
    return np.round(images * 255).astype(np.uint8)


def ours(pipe: Pipeline, prompt: str, negative: str) -> np.ndarray:
    return pipe.generate(prompt, negative_prompt=negative, steps=STEPS, guidance=GUIDANCE, scheduler="ddim", latents=latents(), height=SIZE, width=SIZE).images


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory, tiny_sd_v1) -> Path:
    return exported(tmp_path_factory, tiny_sd_v1, fp16=False)


@pytest.mark.parametrize("fmt", ["diffusers.safetensors", "diffusers.bin", "a1111.pt", "a1111.safetensors"])
def test_each_format_draws_what_diffusers_draws_in_the_prompt_and_the_negative_prompt(artifacts, tiny_sd_v1, tmp_path, fmt):
    path, token, v = write_file(tmp_path, fmt)
    pipe = Pipeline.load(artifacts, embeddings=[path])
    assert pipe.embeddings[0]["token"] == token and pipe.embeddings[0]["vectors"] == len(v)
    for where, (prompt, negative) in PROMPTS.items():
        prompt, negative = prompt.format(token), negative.format(token)
        # diffusers reads every layout but A1111's emb_params itself: the file, else the tensor the test wrote.
        theirs = sd_oracle(tiny_sd_v1, prompt, negative, (token, v if fmt == "a1111.safetensors" else path))
        assert psnr(ours(pipe, prompt, negative), theirs) >= FP32_DB, where
        # The oracle tells the embedding from none: without it the trigger is ordinary text, far below the bar.
        assert psnr(sd_oracle(tiny_sd_v1, prompt, negative, None), theirs) < SENSITIVE_DB, where


def test_openvino_and_wrong_vectors(artifacts, tiny_sd_v1, tmp_path):
    """OpenVINO grows the table as ONNX Runtime does; other vectors under the same trigger move the image well below
    the bar, and so does dropping the multi-vector expansion (the first vector alone)."""
    pytest.importorskip("openvino")
    path, token, v = write_file(tmp_path / "right", "diffusers.safetensors")
    wrong, _, _ = write_file(tmp_path / "wrong", "diffusers.safetensors", seed=7)
    prompt, negative = f"a {token} cat", "blurry"
    theirs = sd_oracle(tiny_sd_v1, prompt, negative, (token, v))
    result = Pipeline.load(artifacts, backend="openvino", embeddings=[path]).generate(
        prompt, negative_prompt=negative, steps=STEPS, guidance=GUIDANCE, scheduler="ddim", latents=latents(), height=SIZE, width=SIZE
    )  # fmt: skip
    assert psnr(result.images, theirs) >= FP32_DB
    record = {"file": path.name, "sha256": read_embedding(path).sha256, "token": token, "vectors": 3, "applied": "run time"}
    assert result.params["embeddings"] == [record]
    assert psnr(ours(Pipeline.load(artifacts, embeddings=[wrong]), prompt, negative), theirs) < SENSITIVE_DB
    assert psnr(ours(Pipeline.load(artifacts, embeddings=[f"{path}:{token}"]), f"a {token} cat", negative), theirs) >= FP32_DB
    first = tmp_path / "first.safetensors"
    safetensors_torch.save_file({token: v[:1].contiguous()}, str(first))
    assert psnr(ours(Pipeline.load(artifacts, embeddings=[first]), prompt, negative), theirs) < SENSITIVE_DB


def test_a_lora_on_the_text_encoder_and_an_embedding_apply_together(artifacts, tiny_sd_v1, tmp_path):
    """ONNX Runtime opens the text encoder with LoRA-patched weights and the grown token table in one session."""
    from test_lora_fixtures import PEFT_TE_TARGETS, MadeLora, _text_lora, fuse_text_encoder_oracle

    path, token, v = write_file(tmp_path, "a1111.safetensors")
    te = _text_lora(Path(tiny_sd_v1), PEFT_TE_TARGETS, rank=2, seed=5, gain=1.0)
    lora = tmp_path / "te_lora.safetensors"
    tensors = {}
    for module, (down, up) in te.items():
        tensors |= {f"text_encoder.{module}.lora_A.weight": down.contiguous(), f"text_encoder.{module}.lora_B.weight": up.contiguous()}
    safetensors_torch.save_file(tensors, str(lora))  # no alpha: alpha = rank (diffusers' rule)
    pipe = diffusers.StableDiffusionPipeline.from_pretrained(tiny_sd_v1, safety_checker=None, requires_safety_checker=False)
    pipe.scheduler = diffusers.DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    fuse_text_encoder_oracle(pipe.text_encoder, [(MadeLora(lora, lora, 2, 2.0, te), 1.0)])
    pipe.load_textual_inversion(v, token=token)
    prompt = f"a {token} cat"
    with torch.no_grad():
        theirs = pipe(prompt, negative_prompt="blurry", num_inference_steps=STEPS, guidance_scale=GUIDANCE,
                      latents=torch.from_numpy(latents()), height=SIZE, width=SIZE, output_type="np").images  # fmt: skip
    theirs = np.round(theirs * 255).astype(np.uint8)
    both = ours(Pipeline.load(artifacts, embeddings=[path], loras=[lora]), prompt, "blurry")
    assert psnr(both, theirs) >= FP32_DB
    assert psnr(ours(Pipeline.load(artifacts, embeddings=[path]), prompt, "blurry"), theirs) < SENSITIVE_DB


def test_sdxl_reads_clip_l_and_clip_g_into_its_two_encoders(small_sdxl_base, tmp_path):
    from sdxl_small_models import SIZE as XL
    from tiny_models import TINY_SDXL_TEXT_2_DIM, TINY_SDXL_TEXT_DIM

    folder, artifacts, _ = small_sdxl_base
    clip_l, clip_g = vectors(2, TINY_SDXL_TEXT_DIM, seed=1), vectors(2, TINY_SDXL_TEXT_2_DIM, seed=2)
    path = tmp_path / "xlstyle.safetensors"
    safetensors_torch.save_file({"clip_l": clip_l, "clip_g": clip_g}, str(path))
    lat = np.random.default_rng(SEED).standard_normal((1, 4, XL // 2, XL // 2), dtype=np.float32)  # its VAE: f = 2

    def oracle(prompt: str, negative: str, embedded: bool) -> np.ndarray:
        pipe = diffusers.StableDiffusionXLPipeline.from_pretrained(str(folder))
        pipe.scheduler = diffusers.EulerDiscreteScheduler.from_config(pipe.scheduler.config)
        pipe.set_progress_bar_config(disable=True)
        if embedded:  # diffusers' documented SDXL recipe: each half into its own encoder
            pipe.load_textual_inversion(clip_l, token="xlstyle", text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer)
            pipe.load_textual_inversion(clip_g, token="xlstyle", text_encoder=pipe.text_encoder_2, tokenizer=pipe.tokenizer_2)
        with torch.no_grad():
            images = pipe(prompt, negative_prompt=negative, num_inference_steps=STEPS, guidance_scale=5.0,
                          latents=torch.from_numpy(lat), height=XL, width=XL, output_type="np").images  # fmt: skip
        return np.round(images * 255).astype(np.uint8)

    pipe = Pipeline.load(artifacts, embeddings=[path])
    for where, (prompt, negative) in PROMPTS.items():
        prompt, negative = prompt.format("xlstyle"), negative.format("xlstyle")
        theirs = oracle(prompt, negative, True)
        got = pipe.generate(prompt, negative_prompt=negative, steps=STEPS, guidance=5.0, scheduler="euler", latents=lat).images
        assert psnr(got, theirs) >= FP32_DB, where
        assert psnr(oracle(prompt, negative, False), theirs) < SENSITIVE_DB, where
    # A file for SD 1.x/2.x (one table), or one without clip_g, is refused for SDXL, naming what it needs.
    single, _, _ = write_file(tmp_path / "sd", "a1111.safetensors")
    with pytest.raises(EmbeddingError, match="holds one table of width 32; this SDXL model's text_encoder reads its clip_l vectors"):
        Pipeline.load(artifacts, embeddings=[single])
    half = tmp_path / "half.safetensors"
    safetensors_torch.save_file({"clip_l": clip_l}, str(half))
    with pytest.raises(EmbeddingError, match="holds clip_l of width 32; this SDXL model's text_encoder_2 reads its clip_g vectors"):
        Pipeline.load(artifacts, embeddings=[half])


# ---- bad input: one line, nothing run, nothing written ----------------------------------------------------------------
class Evil:
    def __reduce__(self):
        return (os.system, ("touch pwned",))


def bad_files(folder: Path) -> dict[str, tuple[str, str]]:
    """case -> (--embedding value, the message's distinctive part)."""
    folder.mkdir(parents=True, exist_ok=True)
    safetensors_torch.save_file({"wide": vectors(1, 16)}, str(wide := folder / "wide.safetensors"))
    safetensors_torch.save_file({"a": vectors(1)}, str(taken := folder / "taken.safetensors"))
    torch.save({"string_to_param": {"*": Evil()}, "name": "evil"}, evil := folder / "evil.pt")
    good, _, _ = write_file(folder, "a1111.pt")
    (truncated := folder / "truncated.pt").write_bytes(good.read_bytes()[:300])
    safe, _, _ = write_file(folder, "diffusers.safetensors")
    (cut := folder / "cut.safetensors").write_bytes(safe.read_bytes()[:-8])
    safetensors_torch.save_file({"a.lora_down.weight": vectors(2), "a.lora_up.weight": vectors(2)}, str(lora := folder / "lora.safetensors"))
    return {
        "wrong width": (str(wide), "its vectors are 16 wide, text_encoder's tokens 32"),
        "token in the vocabulary": (str(taken), "'a' is already a token of the model's vocabulary; pass another trigger (FILE:TOKEN)"),
        "forbidden global": (str(evil), "asks for posix.system, which is not part of a tensor (refused, nothing ran); convert it to .safetensors"),
        "truncated .pt": (str(truncated), "is not a textual-inversion file we can read safely"),
        "truncated .safetensors": (str(cut), "truncated"),
        "a LoRA": (str(lora), "not a textual-inversion layout"),
        "trigger with a space": (f"{safe}:my tok", "without spaces"),
        "missing": (str(folder / "nope.safetensors"), "is missing"),
        "unknown type": (str(folder / "x.ckpt"), "unknown file type '.ckpt'"),
    }


@pytest.fixture(scope="module")
def bad(tmp_path_factory) -> dict[str, tuple[str, str]]:
    return bad_files(tmp_path_factory.mktemp("bad_embeddings"))


def test_the_cli_refuses_bad_embeddings_in_one_line_and_runs_nothing(artifacts, bad, tmp_path, capsys, monkeypatch):
    from ldm_rt.runtime.cli import main

    monkeypatch.chdir(tmp_path)
    out = tmp_path / "out.png"
    for case, (value, message) in bad.items():
        code, _, err = run_cli(main, ["sample", "--model", str(artifacts), "--prompt", "a cat", "--steps", "2", "--embedding", value, "--out", str(out)])
        assert message in one_line_error(code, err, "ldm-rt"), case
    assert list(tmp_path.iterdir()) == []  # no image, and os.system never ran (no "pwned")


def test_the_cli_applies_an_embedding_and_records_it_in_the_png(artifacts, tmp_path):
    from ldm_rt.runtime.cli import main

    path, _, _ = write_file(tmp_path / "e", "a1111.pt")
    common = ["sample", "--model", str(artifacts), "--prompt", "a trigger cat", "--steps", "2", "--seed", "1", "--height", "16", "--width", "16"]
    assert run_cli(main, [*common, "--out", str(tmp_path / "plain.png")])[0] == 0
    assert run_cli(main, [*common, "--embedding", f"{path}:trigger", "--out", str(tmp_path / "ti.png")])[0] == 0
    with Image.open(tmp_path / "ti.png") as im:
        params = json.loads(im.text["parameters"])
        pixels = np.asarray(im.convert("RGB"))
    assert [(r["file"], r["token"], r["vectors"]) for r in params["embeddings"]] == [("easyneg.pt", "trigger", 2)]
    assert psnr(pixels, np.asarray(Image.open(tmp_path / "plain.png").convert("RGB"))) < SENSITIVE_DB


def test_tensorrt_and_plugins_refuse_embeddings_before_opening_anything(artifacts):
    from ldm_rt.runtime.backends.base import open_components

    rows = {"text_encoder": TokenRows(642, np.zeros((1, WIDTH), np.float32))}
    with pytest.raises(EmbeddingError, match="TensorRT engines cannot add textual-inversion tokens at run time.*bake the embedding in at export .python export/build_engines.py --embedding FILE.:TOKEN.."):
        open_components("tensorrt", artifacts, Manifest.read(artifacts), embeddings=rows)


def test_triggers_arguments_and_restricted_pickles(tmp_path, artifacts):
    assert (parse_embedding_arg("a:b/x.pt:Tok").path, parse_embedding_arg("a:b/x.pt:Tok").token) == (Path("a:b/x.pt"), "Tok")
    assert parse_embedding_arg("dir:1/x.safetensors").token is None
    assert [(s.path, s.token) for s in as_specs([("x.pt", None), "y.bin:t"])] == [(Path("x.pt"), None), (Path("y.bin"), "t")]
    with pytest.raises(EmbeddingError, match=r"^an embedding is a file, FILE:TOKEN or a \(file, token\) pair; got 3$"):
        as_specs([3])
    with pytest.raises(EmbeddingError, match=r"^65 embeddings given; at most 64 can be loaded at once$"):
        as_specs(["x.pt"] * 65)
    # Two files with one trigger are refused, and so are triggers CLIP cannot tell apart (it lowercases prompts); a
    # trigger is found in any case, its vectors' ids after the vocabulary in file order.
    a, _, _ = write_file(tmp_path / "a", "a1111.safetensors")
    b, _, _ = write_file(tmp_path / "b", "a1111.safetensors", seed=1)
    with pytest.raises(EmbeddingError, match="both use the trigger 'badhands'"):
        Pipeline.load(artifacts, embeddings=[a, b])
    pipe = Pipeline.load(artifacts, embeddings=[f"{a}:MyStyle", f"{b}:other"])
    ids = pipe.tokenizer(["a MYSTYLE cat", "a mystyle cat", "other"]).ids
    first = pipe.tokenizer.vocab_size - 4
    with pytest.raises(EmbeddingError, match="normalises to 'mystyle'"):
        Pipeline.load(artifacts, embeddings=[f"{a}:MyStyle", f"{b}:mystyle"])
    assert ids[0].tolist() == ids[1].tolist() and ids[0][2:4].tolist() == [first, first + 1]
    assert ids[2][1:3].tolist() == [first + 2, first + 3]
    # A pickle's only way out is find_class: every global other than a tensor's is refused, nothing runs.
    class Eval:
        def __reduce__(self):
            return (eval, ("1+1",))

    z = tmp_path / "odd.pt"
    with zipfile.ZipFile(z, "w") as f:
        f.writestr("archive/data.pkl", pickle.dumps({"string_to_param": {"*": Eval()}}, protocol=4))
    with pytest.raises(EmbeddingError, match="asks for builtins.eval"):
        read_embedding(z)



def test_the_restricted_reader_reads_what_torch_load_reads(tmp_path):
    """Views (transposed, sliced, offset, strided), shared storages, fp16/bf16, parameters, plain values: as torch."""
    from ldm_rt.runtime.embeddings import read_torch_zip

    base = torch.randn(6, 8)
    saved = {"t": base.t(), "slice": base[2:4, 1:7], "half": base.half()[1], "bf16": base.bfloat16()[:, ::2],
             "param": torch.nn.Parameter(base[0].clone()), "shared": base, "empty": torch.zeros(0, 4), "n": 3, "s": "x"}  # fmt: skip
    torch.save(saved, path := tmp_path / "views.pt")
    ours, theirs = read_torch_zip(path, path.read_bytes()), torch.load(path, weights_only=True)
    for key, value in theirs.items():
        if isinstance(value, torch.Tensor):
            assert np.array_equal(ours[key].astype(np.float32), value.detach().float().numpy()), key
        else:
            assert ours[key] == value, key

# ---- baked in at export (build_engines.py --embedding): for TensorRT and the native runtime ---------------------------
def test_an_export_bakes_the_same_tokens_and_rows_the_runtime_adds(artifacts, tiny_sd_v1, tmp_path):
    """The text encoder exported after bake_embeddings, with the tokenizer.json it writes, computes what the run-time
    growth computes (a whole tiny build with --embedding draws the oracle's image too: README). The tokenizer.json
    carries the multi-vector expansion itself (a Replace normalizer), so every runtime reading it expands alike."""
    import onnxruntime as ort
    from ldm_rt.export.build import bake_embeddings
    from ldm_rt.export.onnx_export import export_component
    from ldm_rt.export.sources import load_source
    from ldm_rt.reference.export_wrappers import export_wrappers
    from ldm_rt.runtime.contracts import build_contracts
    from ldm_rt.runtime.tokenizer import PromptTokenizer

    path, token, _ = write_file(tmp_path / "e", "diffusers.safetensors")
    source = load_source(Path(tiny_sd_v1))
    records = bake_embeddings(source.loaded, [read_embedding(path)])
    assert [(r["token"], r["vectors"], r["path"]) for r in records] == [(token, 3, str(path.resolve()))]
    contract = build_contracts(source.facts, Manifest.read(artifacts).profile)["text_encoder"]
    export_component(export_wrappers(source.loaded.model)["text_encoder"], contract, onnx := tmp_path / "text_encoder.onnx")
    saved = PromptTokenizer.from_str(source.loaded.tokenizer.to_str())  # what the artifacts' tokenizer.json holds
    run_time = Pipeline.load(artifacts, embeddings=[path])
    prompts = [f"a {token.upper()} cat", "blurry"]
    ids = saved(prompts).ids
    assert np.array_equal(ids, run_time.tokenizer(prompts).ids) and ids[0][2:5].tolist() == [642, 643, 644]
    baked = ort.InferenceSession(str(onnx), providers=["CPUExecutionProvider"]).run(None, {"input_ids": ids})[0]
    np.testing.assert_allclose(baked, run_time.components["text_encoder"].run({"input_ids": ids})["last_hidden_state"], atol=1e-5)


def test_the_export_refuses_bad_embeddings_before_building(tiny_sd_v1, bad, tmp_path, capsys):
    from ldm_rt.export.build_engines import main as build_main

    for case in ("forbidden global", "truncated .pt", "trigger with a space"):
        value, message = bad[case]
        try:
            code = build_main(["--model", str(tiny_sd_v1), "--out", str(tmp_path / "x"), "--onnx-only", "--embedding", value])
        except SystemExit as e:  # argparse's usage errors (a bad FILE:TOKEN) exit from inside the parser
            code = e.code
        assert message in one_line_error(code, capsys.readouterr().err, "build_engines.py"), case
    assert not (tmp_path / "x").exists()


def test_the_native_tokenizer_reads_the_embeddings_from_tokenizer_json(artifacts, tmp_path, tmp_path_factory):
    """The native runtime (cpp/native) gets baked embeddings with no work of its own: its tokenizer reads the added
    tokens and the Replace normalizer of the tokenizer.json an export with --embedding writes, ids equal to ours."""
    import subprocess

    from cmake_build import built_probe, native_build

    path, token, _ = write_file(tmp_path / "e", "diffusers.safetensors")
    other, _, _ = write_file(tmp_path / "o", "a1111.pt")
    tokenizer = Pipeline.load(artifacts, embeddings=[path, other]).tokenizer
    tokenizer.save(saved := tmp_path / "tokenizer.json")
    prompts = [f"a {token} cat", f"A {token.upper()}, easyneg", f"x{token}y easyneg{token}", "blurry", "", f"{token} " * 30]
    probe = built_probe(native_build(tmp_path_factory))
    got = json.loads(subprocess.run([str(probe), "tokenize", str(saved)], input=json.dumps(prompts), capture_output=True, text=True, check=True, timeout=60).stdout)
    assert got["vocab_size"] == tokenizer.vocab_size == 642 + 5
    assert got["ids"] == tokenizer(prompts).ids.tolist()
    comma = tokenizer([","]).ids[0][1]
    assert tokenizer(prompts).ids[1][2:8].tolist() == [642, 643, 644, comma, 645, 646]  # any case; A1111 .pt: 2 vectors


def test_the_cli_gives_a_refiner_the_embedding_too(small_sdxl_base, small_sdxl_refiner, tmp_path):
    """`--embedding` with `--refiner`: the refiner (text_encoder_2 alone) reads the file's clip_g vectors, as diffusers'
    refiner pipeline does with clip_g loaded into its encoder; the hand-off equals diffusers' base then img2img."""
    from ldm_rt.runtime.cli import main
    from sdxl_small_models import SIZE as XL
    from tiny_models import TINY_SDXL_TEXT_2_DIM, TINY_SDXL_TEXT_DIM

    (base_folder, base, _), (refiner_folder, refiner, _) = small_sdxl_base, small_sdxl_refiner
    clip_l, clip_g = vectors(2, TINY_SDXL_TEXT_DIM, seed=3), vectors(2, TINY_SDXL_TEXT_2_DIM, seed=4)
    safetensors_torch.save_file({"clip_l": clip_l, "clip_g": clip_g}, str(path := tmp_path / "xlstyle.safetensors"))
    lat = np.random.default_rng(SEED).standard_normal((1, 4, XL // 2, XL // 2), dtype=np.float32)
    np.save(tmp_path / "noise.npy", lat)
    prompt, kw = "a xlstyle cat", dict(negative_prompt="blurry", num_inference_steps=4, guidance_scale=5.0)

    def theirs(embedded_in_refiner: bool) -> np.ndarray:
        first = diffusers.StableDiffusionXLPipeline.from_pretrained(str(base_folder))
        second = diffusers.StableDiffusionXLImg2ImgPipeline.from_pretrained(str(refiner_folder))
        first.load_textual_inversion(clip_l, token="xlstyle", text_encoder=first.text_encoder, tokenizer=first.tokenizer)
        for pipe in (first, second) if embedded_in_refiner else (first,):
            pipe.load_textual_inversion(clip_g, token="xlstyle", text_encoder=pipe.text_encoder_2, tokenizer=pipe.tokenizer_2)
        for pipe in (first, second):
            pipe.set_progress_bar_config(disable=True)
        with torch.no_grad():
            latents = first(prompt, latents=torch.from_numpy(lat), height=XL, width=XL, denoising_end=0.5, output_type="latent", **kw).images
            images = second(prompt, image=latents, denoising_start=0.5, aesthetic_score=7.0, output_type="np", **kw).images
        return np.round(images[0] * 255).astype(np.uint8)

    out = tmp_path / "refined.png"
    code, _, err = run_cli(main, [
        "sample", "--model", str(base), "--refiner", str(refiner), "--refiner-start", "0.5", "--embedding", str(path),
        "--prompt", prompt, "--negative-prompt", "blurry", "--steps", "4", "--guidance", "5", "--latents", str(tmp_path / "noise.npy"),
        "--aesthetic-score", "7", "--seed", "3", "--out", str(out),
    ])  # fmt: skip
    assert code == 0, err
    with Image.open(out) as im:
        ours = np.asarray(im.convert("RGB"))
    oracle = theirs(True)
    assert psnr(ours, oracle) >= FP32_DB
    assert psnr(theirs(False), oracle) < SENSITIVE_DB  # the refiner's half of the embedding shows
