"""cpp/native's few-step and remaining `ldm-rt sample` features against the Python runtime on OpenVINO (both fp32: images
agree to the rounding of two engines, PSNR >= 45 dB as tests/test_native_runtime.py; measured: identical): an
LCM-distilled UNet (guidance as its w-embedding `timestep_cond`, no unconditional batch; tests/test_fewstep_lcm.py's
tiny model), a Turbo-configured folder (trailing Euler ancestral at guidance 0; tests/test_fewstep_turbo.py's
scheduler), `--eta` (DDIM's eta, TCD's gamma, DPM++ 2S a's eta), `--grid`, a class-conditional UNet (the synthetic one
of tests/test_runtime_fixtures.py, through the library: `ldm-rt sample` has no flag for labels) and the API's
init_latents / denoising_start / denoising_end / decode. Each wrong input that matters (another w, the default eta,
another label) is measured far below the bar; refusals are the Python runtime's one-line messages. Requests that need
the library go through one native process (native_generate_many) per model; the tiny SD export and the native build are
the session's."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from test_fewstep_turbo import TURBO_SCHEDULER
from test_native_sdxl import cli_errors, native  # noqa: F401  (native: the session's native build, a fixture)
from test_runtime_fixtures import exported, psnr, synthetic

from ldm_rt.runtime.cli import main as ldm_rt_main
from ldm_rt.runtime.params import GenerationError
from ldm_rt.runtime.pipeline import Pipeline

pytest.importorskip("openvino")
pytest.importorskip("diffusers")

NATIVE_DB = 45.0
WRONG_DB = 35.0  # a wrong w, eta or label lands below this (measured, printed)
SIZE = 16
PROMPT = "a photo of a red car"


def read_png(path: Path) -> tuple[np.ndarray, dict]:
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB")), dict(im.text)


def both(native, tmp_path: Path, *args) -> tuple[tuple[np.ndarray, dict], tuple[np.ndarray, dict], str]:  # noqa: F811
    """(`ldm-rt sample --backend openvino`'s image and text, ldm-rt-native's, native's stderr) for the same arguments."""
    assert ldm_rt_main(["sample", "--backend", "openvino", *map(str, args), "--out", str(tmp_path / "py.png")]) == 0
    done = native.run(*args, "--out", tmp_path / "c.png")
    assert done.returncode == 0, done.stderr
    return read_png(tmp_path / "py.png"), read_png(tmp_path / "c.png"), done.stderr


def same_text(py_text: dict, c_text: dict) -> None:
    """The text chunks of both runtimes' files: the same but for Software (the parameters JSON included)."""
    assert (py_text.pop("Software"), c_text.pop("Software")) == ("ldm-rt", "ldm-rt-native")
    assert json.loads(c_text.pop("parameters")) == json.loads(py_text.pop("parameters"))
    assert c_text == py_text


@pytest.fixture(scope="module")
def sd(native, tmp_path_factory, tiny_sd_v1) -> Path:  # noqa: F811
    """The tiny SD model's session export (shared with the other native tests)."""
    return exported(tmp_path_factory, tiny_sd_v1, False)


# ---- LCM-distilled and Turbo ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def lcm(native, tmp_path_factory, tiny_sd_v1) -> Path:  # noqa: F811
    """tests/test_fewstep_lcm.py's tiny LCM (w-embedding width 32), its session export (one image of 16 x 16)."""
    from test_fewstep_lcm import SIZE as LCM_SIZE
    from test_fewstep_lcm import tiny_lcm_export

    assert LCM_SIZE == SIZE
    return tiny_lcm_export(tmp_path_factory, tiny_sd_v1)[1]


def test_lcm_distilled_model_matches_ldm_rt_sample_and_its_w_matters(native, lcm, tmp_path):  # noqa: F811
    """The folder's own scheduler (lcm), guidance 8 as the w-embedding: ldm-rt sample's image and parameters, and its
    warning that the negative prompt is not used. Through the library: without the negative prompt the same image,
    guidance 3 far below the bar."""
    args = ["--model", lcm, "--prompt", PROMPT, "--negative-prompt", "blurry", "--steps", 4, "--guidance", 8.0, "--seed", 5,
            "--height", SIZE, "--width", SIZE]  # fmt: skip
    (py, py_text), (c, c_text), err = both(native, tmp_path, *args)
    assert json.loads(c_text["parameters"])["scheduler"] == "lcm"
    assert "ldm-rt-native: WARNING: this LCM-distilled model takes guidance as an embedding, with no unconditional batch: " \
           "the negative prompt is not used" in err  # fmt: skip
    same_text(py_text, c_text)
    db = psnr(c, py)
    request = {"prompt": PROMPT, "steps": 4, "seed": 5, "height": SIZE, "width": SIZE}
    (plain, w3), errors = native.serve(lcm, [{**request, "guidance": 8.0}, {**request, "guidance": 3.0}], tmp_path)
    assert not errors
    wrong = psnr(w3, py)
    print(f"LCM: native vs ldm-rt sample {db:.1f} dB; guidance 3 vs 8: {wrong:.1f} dB")
    assert db >= NATIVE_DB and wrong < WRONG_DB
    np.testing.assert_array_equal(plain, c)


@pytest.fixture(scope="module")
def turbo(sd, tmp_path_factory, tiny_sd_v1) -> Path:
    """What an export of tests/test_fewstep_turbo.py's folder (the tiny SD with SD-Turbo's scheduler: trailing Euler
    ancestral) holds, without a second export of the same weights: the tiny SD export with that scheduler_config.json
    and the manifest entries export/build.py derives from it (default scheduler, file hash, sampler spec)."""
    from dataclasses import replace

    from ldm_rt.runtime.manifest import FileEntry, Manifest
    from ldm_rt.runtime.sampler_spec import sampler_spec
    from ldm_rt.runtime.scheduler_choice import default_scheduler

    root = tmp_path_factory.mktemp("native_turbo") / "artifacts"
    shutil.copytree(sd, root)
    config = {**json.loads((tiny_sd_v1 / "scheduler" / "scheduler_config.json").read_text()), **TURBO_SCHEDULER}
    (root / "scheduler_config.json").write_text(json.dumps(config, indent=2) + "\n")
    manifest = replace(Manifest.read(root), default_scheduler=default_scheduler(config).name, scheduler=FileEntry.of(root, "scheduler_config.json"))
    manifest.sampler_spec = sampler_spec(config, manifest=manifest)
    manifest.write(root)
    return root


def test_turbo_model_at_guidance_0_matches_ldm_rt_sample(native, turbo, tmp_path):  # noqa: F811
    args = ["--model", turbo, "--prompt", PROMPT, "--steps", 2, "--guidance", 0.0, "--seed", 3, "--height", SIZE, "--width", SIZE]
    (py, py_text), (c, c_text), _ = both(native, tmp_path, *args)
    assert json.loads(c_text["parameters"])["scheduler"] == "euler-a"  # the folder's own
    same_text(py_text, c_text)
    print(f"Turbo: native vs ldm-rt sample {psnr(c, py):.1f} dB")
    assert psnr(c, py) >= NATIVE_DB


# ---- --eta and --grid -------------------------------------------------------------------------------------------
ETAS = {"ddim": 0.8, "tcd": 0.0, "dpmpp-2s-a": 0.2}  # each far from the scheduler's default (0, 0.3, 1)


@pytest.fixture(scope="module")
def sd_pipe(sd) -> Pipeline:
    return Pipeline.load(sd, backend="openvino")


def test_eta_matches_the_python_runtime_and_moves_the_image(native, sd, sd_pipe, tmp_path):  # noqa: F811
    """Each scheduler that takes eta (DDIM's eta, TCD's gamma, DPM++ 2S a's eta), through the library: Python's image and
    recorded eta; the scheduler's default eta (none given) is another image, far below the bar."""
    request = {"prompt": PROMPT, "steps": 3, "seed": 2, "height": SIZE, "width": SIZE}
    asked = [{**request, "scheduler": name, **extra} for name, eta in ETAS.items() for extra in ({"eta": eta}, {})]
    images, errors = native.serve(sd, [*asked, {**request, "scheduler": "tcd", "eta": 1.5}], tmp_path)
    with pytest.raises(GenerationError) as refused:
        sd_pipe.generate(**request, scheduler="tcd", eta=1.5)
    assert errors == {len(asked): str(refused.value)} and "eta must be a number in [0, 1]" in errors[len(asked)]
    for k, (name, eta) in enumerate(ETAS.items()):
        want = sd_pipe.generate(**request, scheduler=name, eta=eta)
        _, text = read_png(tmp_path / f"request_{2 * k}.png")
        assert json.loads(text["parameters"]) == json.loads(json.dumps(want.params)) and want.params["eta"] == eta
        assert "eta" not in json.loads(read_png(tmp_path / f"request_{2 * k + 1}.png")[1]["parameters"])
        db, default = psnr(images[2 * k], want.images[0]), psnr(images[2 * k + 1], want.images[0])
        print(f"{name} eta {eta}: native vs Python {db:.1f} dB, the default eta instead {default:.1f} dB")
        assert db >= NATIVE_DB and default < WRONG_DB


def test_the_cli_takes_eta_and_grid_as_ldm_rt_sample(native, sd, tmp_path):  # noqa: F811
    """`--eta` recorded as ldm-rt sample records it; `--batch 2 --grid`: one grid image at --out (ceil(sqrt(2)) columns,
    one row) with Result.metadata(None)'s text, no NAME_0/NAME_1 files."""
    args = ["--model", sd, "--prompt", PROMPT, "--steps", 2, "--seed", 1, "--height", SIZE, "--width", SIZE, "--scheduler", "tcd",
            "--eta", 0.6, "--batch", 2, "--grid"]  # fmt: skip
    (py, py_text), (c, c_text), _ = both(native, tmp_path, *args)
    assert json.loads(c_text["parameters"])["eta"] == 0.6 and "batch_index" not in c_text
    assert c.shape == (SIZE, 2 * SIZE, 3)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.png", "py.png"]
    same_text(py_text, c_text)
    assert psnr(c, py) >= NATIVE_DB


@pytest.mark.parametrize(
    "extra",
    [["--scheduler", "euler", "--eta", "0.5"], ["--eta", "x"], ["--grid=1"]],
)  # fmt: skip
def test_bad_eta_and_grid_get_ldm_rt_samples_messages(native, sd, tmp_path, extra):  # noqa: F811
    args = ["--model", sd, "--prompt", PROMPT, "--steps", 2, "--height", SIZE, "--width", SIZE, *extra, "--out", tmp_path / "x.png"]
    python, ours = cli_errors(native, *args)
    assert ours == python
    assert not any(tmp_path.iterdir())


# ---- class-conditional, and the hand-off's halves through the library -------------------------------------------
def test_class_conditional_model_matches_the_python_runtime_and_its_labels_matter(native, tmp_path_factory, tmp_path):  # noqa: F811
    model = synthetic(tmp_path_factory, "class")[0]
    pipe = Pipeline.load(model, backend="openvino")
    request = {"steps": 3, "seed": 1, "scheduler": "euler-a", "batch": 2}
    asked = [{**request, "class_labels": [1, 3]}, {**request, "class_labels": [2, 3]}, {**request, "class_labels": [4]},
             {**request, "class_labels": [5]}, request, {**request, "class_labels": [1], "prompt": "a cat"}]  # fmt: skip
    images, errors = native.serve(model, asked, tmp_path)
    want = pipe.generate(**request, class_labels=[1, 3])
    _, text = read_png(tmp_path / "request_0_3.png")  # the second label's second image
    assert json.loads(text["parameters"])["class_labels"] == want.params["class_labels"] == [1, 1, 3, 3]
    got = read_png(tmp_path / "request_0_3.png")[0]
    print(f"class labels: native vs Python {psnr(images[0], want.images[0]):.1f} / {psnr(got, want.images[3]):.1f} dB;"
          f" label 2 for 1: {psnr(images[1], want.images[0]):.1f} dB")  # fmt: skip
    assert psnr(images[0], want.images[0]) >= NATIVE_DB and psnr(got, want.images[3]) >= NATIVE_DB
    assert psnr(images[1], want.images[0]) < WRONG_DB
    assert images[2] is not None
    for k, message in ((3, "class_labels must be ints in [0, 5), got [5]"), (4, "this model is class-conditional: pass class_labels (ints in [0, 5))"),
                       (5, "this model has no text encoder and takes no prompt; pass prompt=''")):  # fmt: skip
        assert errors[k] == message, errors
    # ldm-rt sample has no flag for labels: both command lines refuse the model with the runtime's message.
    python, ours = cli_errors(native, "--model", model, "--steps", 2, "--out", tmp_path / "x.png")
    assert ours == python == "this model is class-conditional: pass class_labels (ints in [0, 5))"


def run_many(native, model: Path, requests: list[dict], folder: Path) -> list[str]:  # noqa: F811
    """native_generate_many on `requests` as given (their own "out"); its error lines."""
    lines = folder / "requests.jsonl"
    lines.write_text("".join(json.dumps(r) + "\n" for r in requests))
    done = subprocess.run([str(native.many), str(model), str(lines)], check=False, capture_output=True, text=True, timeout=300, env=native.env)
    return done.stderr.splitlines()


def test_denoising_end_and_start_split_a_run_as_the_python_api(native, sd, sd_pipe, tmp_path):  # noqa: F811
    """generate(denoising_end=0.5, decode=False) then generate(init_latents=those, denoising_start=0.5): Python's latents,
    image and parameters; the refusals of a start without latents and a fraction outside (0, 1) are Python's."""
    pipe = sd_pipe
    request = {"prompt": PROMPT, "steps": 6, "seed": 7, "height": SIZE, "width": SIZE, "scheduler": "euler"}
    first = pipe.generate(**request, denoising_end=0.5, decode=False)
    second = pipe.generate(**request, init_latents=first.latents, denoising_start=0.5)
    latents, out = tmp_path / "first.npy", tmp_path / "second.png"
    refused = [{**request, "denoising_start": 0.5, "out": str(tmp_path / "x.png")},
               {**request, "denoising_end": 1.5, "out": str(tmp_path / "y.png")}]  # fmt: skip
    messages = []
    for k, r in enumerate(refused, 1):
        with pytest.raises(GenerationError) as e:
            pipe.generate(**{key: v for key, v in r.items() if key != "out"})
        messages.append(f"native_generate_many: error: request {k}: {e.value}")
    assert "denoising_start needs init_latents" in messages[0] and "denoising_end must be a fraction" in messages[1]
    assert run_many(native, sd, [{**request, "denoising_end": 0.5, "decode": False, "out": str(latents)}, *refused], tmp_path) == messages
    ours = np.load(latents)
    assert ours.shape == first.latents.shape and np.abs(ours - first.latents).max() < 1e-3
    assert run_many(native, sd, [{**request, "init_latents": str(latents), "denoising_start": 0.5, "out": str(out)}], tmp_path) == []
    image, text = read_png(out)
    params = json.loads(text["parameters"])
    assert (params["denoising_start"], params["denoising_end"], params["mode"]) == (0.5, None, "img2img")
    assert params == json.loads(json.dumps(second.params))
    print(f"denoising_start/end: native vs Python {psnr(image, second.images[0]):.1f} dB")
    assert psnr(image, second.images[0]) >= NATIVE_DB
