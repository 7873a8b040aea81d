"""ldm-rt-native's step previews (`--preview FILE.png`, Request::preview) against the Python runtime's
(runtime/previews.py, tests/test_previews.py). The x0 estimate of every scheduler through the numerics test driver,
to the bit, on the samples and model outputs of Python's own loops; then on the tiny SD model's export (which
carries fitted preview factors): every preview of a run through the library (native_generate_many) equals Python's
for the same request, fast and full, and inpainting's (whose kept region is the init image's); the CLI's preview file
is Python's, it is refused for a user's file, a name not ending in .png, --preview-every 0 and flags without
--preview with `ldm-rt sample`'s one-line messages; previews do not change the image; a folder built before
previews falls back to full previews, saying so once. The native build is the session's shared one."""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from test_native_numerics import CONFIGS, bits, probe, run_probe  # noqa: F401  (the session's numerics test driver)
from test_native_sdxl import native  # noqa: F401  (the session's native build)
from test_runtime_fixtures import exported, one_line_error, psnr, run_cli

from ldm_rt.runtime.cli import build_parser
from ldm_rt.runtime.cli import main as ldm_rt_main
from ldm_rt.runtime.pipeline import Pipeline
from ldm_rt.runtime.previews import PREVIEW_FILE, PREVIEW_KEY
from ldm_rt.runtime.sampler_spec import vector_model_output
from ldm_rt.runtime.schedulers import SchedulerConfig, SchedulerConfigError, make_scheduler
from ldm_rt.runtime.schedulers.base import SchedulerStepError
from ldm_rt.runtime.schedulers.registry import SCHEDULERS

SHAPE = [2, 4, 3, 3]


# ---- the x0 estimate of every scheduler ---------------------------------------------------------------------------
def denoised_job(config: dict, name: str, steps: int, strength: float | None, learned: bool = False) -> tuple[dict, dict]:
    """(the driver's job: Python's samples and model outputs of a formula loop, what Python's denoised gives on them)."""
    job = {"config": config, "name": name, "steps": steps, "strength": strength, "shape": SHAPE}
    try:
        run = make_scheduler(name, SchedulerConfig.from_dict(config)).set_timesteps(steps)
        if strength is not None:
            run = run.with_strength(strength)
        rng = np.random.default_rng(steps)
        noise = rng.standard_normal(SHAPE, dtype=np.float32)
        x = run.add_noise(np.full(SHAPE, 0.5, np.float32), noise, 0) if strength else noise * np.float32(run.init_noise_sigma)
        samples, outputs, want = [], [], []
        for i, t in enumerate(run.timesteps):
            m = vector_model_output(run.scale_model_input(x, i), t)
            if learned:  # (B, 2C, h, w): the prediction, then the variance channels (in [-1, 1])
                m = np.concatenate([m, np.tanh(m)], axis=1)
            samples.append(x.ravel().tolist())
            outputs.append(m.ravel().tolist())
            want.append(run.denoised(m, i, x))
            x = run.step(m, i, x, generator=rng)
    except (SchedulerConfigError, SchedulerStepError) as e:
        return job, {"error": str(e)}
    job.update(samples=samples, outputs=outputs, **({"output_shape": [SHAPE[0], 2 * SHAPE[1], *SHAPE[2:]]} if learned else {}))
    return job, {"denoised": want}


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # UniPC's h -> 0 limit, as in its numerics test
def test_every_schedulers_x0_estimate_is_pythons_to_the_bit(probe, tmp_path):  # noqa: F811
    """SchedulerRun::denoised against runtime/schedulers/base.py's on the same inputs, every registered name over the
    numerics tests' configs (epsilon, v and sample prediction, zero-SNR, Karras, ...), from noise and from an image
    (a later start: the tables are read at begin_index + i), and DDPM's learned variance (split off first)."""
    cases = [(c, n, s, strength) for c in sorted(CONFIGS) for n in sorted(SCHEDULERS) for s in (1, 5) for strength in (None, 0.6)]
    jobs, wants = zip(*[denoised_job(CONFIGS[c], n, s, strength) for c, n, s, strength in cases],
                      denoised_job({**CONFIGS["sd-v1"], "variance_type": "learned_range"}, "ddpm", 5, None, learned=True))  # fmt: skip
    (tmp_path / "jobs.json").write_text(json.dumps(jobs))
    got = json.loads(run_probe(probe, "denoised", str(tmp_path / "jobs.json")).stdout)
    compared = 0
    for job, want, out in zip(jobs, wants, got, strict=True):
        label = f"{job['name']}/{job['steps']}/strength={job['strength']}/{json.dumps(job['config'])[:60]}"
        if "error" in want or "error" in out:
            assert out.get("error") == want.get("error"), label
            continue
        for i, (a, b) in enumerate(zip(out["denoised"], want["denoised"], strict=True)):
            assert np.array_equal(bits(a).reshape(SHAPE), b), f"{label} step {i}"
            compared += 1
    assert compared >= 2000  # most combinations sample (the rest compared their refusals)


# ---- previews of a run: the library and the CLI against Python's ---------------------------------------------------
NATIVE_DB = 45.0  # both engines fp32 (test_native_runtime.py)
SIZE, STEPS = 16, 5
ARGS = dict(prompt="a red car", negative_prompt="blurry", steps=STEPS, guidance=7.5, height=SIZE, width=SIZE, seed=3)


@pytest.fixture(scope="module")
def model(native, tmp_path_factory, tiny_sd_v1) -> Path:  # noqa: F811
    """The tiny SD model's session export (fitted preview factors listed in its manifest), made while the native
    build runs unless another file did already."""
    return exported(tmp_path_factory, tiny_sd_v1, False)


@pytest.fixture(scope="module")
def pipe(model) -> Pipeline:
    return Pipeline.load(model)


class Recorder:
    def __init__(self) -> None:
        self.calls: dict[int, tuple[int, np.ndarray]] = {}

    def __call__(self, i: int, n: int, images: np.ndarray) -> None:
        self.calls[i] = (n, images.copy())


def read_png(path: Path) -> tuple[np.ndarray, dict[str, str]]:
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB")), dict(im.text)


def inpainting_inputs(folder: Path) -> dict:
    """Test_previews.py's inpainting request: a random image, its right half repainted; as files for the native side."""
    init = np.random.default_rng(1).integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)
    mask = np.zeros((SIZE, SIZE), np.uint8)
    mask[:, SIZE // 2 :] = 255
    Image.fromarray(init).save(folder / "init.png")
    Image.fromarray(mask).save(folder / "mask.png")
    return {"init_image": init, "mask": mask.astype(np.float32) / 255, "mask_blur": 0.0}


def test_every_preview_of_a_run_is_pythons_and_previews_do_not_change_the_image(native, model, pipe, tmp_path):  # noqa: F811
    """Through the library (Request::preview, one loaded pipeline serving every request): fast and full previews every
    2 of 5 steps (and the last) of a stochastic sigma sampler, and of inpainting (whose previews keep the init image's
    pixels, pasted back as in the final image), each preview Python's for the same request; the images those runs
    return are the run without previews, pixel for pixel."""
    inpaint = inpainting_inputs(tmp_path)
    requests = {
        "plain": dict(ARGS, scheduler="euler-a"),
        "fast": dict(ARGS, scheduler="euler-a", preview_every=2),
        "full": dict(ARGS, scheduler="euler-a", preview_every=2, preview_kind="full"),
        "inpaint": dict(ARGS, scheduler="ddim", preview_every=2, preview_kind="full", **inpaint),
        "inpaint-fast": dict(ARGS, scheduler="ddim", preview_every=3, **inpaint),
    }
    files = {"init_image": str(tmp_path / "init.png"), "mask": str(tmp_path / "mask.png")}
    native_requests = [
        {**{k: files.get(k, v) for k, v in r.items()}, **({"preview": str(tmp_path / name)} if name != "plain" else {})}
        for name, r in requests.items()
    ]  # fmt: skip
    finals, errors = native.serve(model, native_requests, tmp_path)
    assert not errors
    finals = dict(zip(requests, finals))
    for name in ("fast", "full"):
        np.testing.assert_array_equal(finals[name], finals["plain"])
    compared, worst = 0, {}
    for name, r in requests.items():
        if name == "plain":
            continue
        seen = Recorder()
        result = pipe.generate(**r, preview=seen)
        steps = sorted(int(p.stem.rsplit("_", 1)[1]) for p in tmp_path.glob(f"{name}_*.png") if p.stem.rsplit("_", 1)[1].isdigit())
        assert steps == sorted(seen.calls), name
        for i, (n, (want,)) in seen.calls.items():
            got, text = read_png(tmp_path / f"{name}_{i}.png")
            assert text == {PREVIEW_KEY: f"step {i + 1}/{n}", "Software": "ldm-rt-native"}
            assert psnr(got, want) >= NATIVE_DB, (name, i, psnr(got, want))
            worst[name] = min(worst.get(name, np.inf), psnr(got, want))
            compared += 1
            if "inpaint" in name:  # the kept half is the init image's, at every step
                np.testing.assert_array_equal(got[:, : SIZE // 2], inpaint["init_image"][:, : SIZE // 2])
        assert psnr(finals[name], result.images[0]) >= NATIVE_DB
    print("native previews vs Python's, worst PSNR per request (dB):", {k: round(v, 1) for k, v in worst.items()})
    # The comparison tells steps apart: the first preview is far from the last (full ones: from the image itself).
    first, last = (read_png(tmp_path / f"full_{i}.png")[0] for i in (1, 4))
    np.testing.assert_array_equal(last, finals["full"])
    print("full previews, step 2 vs the final image:", round(psnr(first, last), 1), "dB")
    assert psnr(first, last) < NATIVE_DB - 15
    assert compared == 3 + 3 + 3 + 2


def cli_args(model: Path, folder: Path, *extra: str) -> list[str]:
    return ["--model", str(model), "--prompt", "a red car", "--steps", "3", "--height", str(SIZE), "--width", str(SIZE),
            "--seed", "1", "--scheduler", "dpmpp-2m", "--out", str(folder / "out.png"), *extra]  # fmt: skip


def test_the_cli_preview_file_is_ldm_rt_samples_and_each_runtime_replaces_the_others(native, model, tmp_path):  # noqa: F811
    """`--preview FILE.png` (fast: the folder's map on the final latents): the file `ldm-rt sample --preview` writes for
    the same arguments, marked as a preview; each runtime's preview is the other's to replace, the output image not."""
    (tmp_path / "py").mkdir()
    code, _, err = run_cli(ldm_rt_main, ["sample", *cli_args(model, tmp_path / "py", "--preview", str(tmp_path / "p.png"))])
    assert code == 0, err
    python_preview, python_text = read_png(tmp_path / "p.png")
    done = native.run(*cli_args(model, tmp_path, "--preview", tmp_path / "p.png", "--verbose"))  # over Python's preview
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == [str(tmp_path / "out.png")] and "preview " in done.stderr  # its timing line
    ours, text = read_png(tmp_path / "p.png")
    assert text == {PREVIEW_KEY: "step 3/3", "Software": "ldm-rt-native"} and python_text[PREVIEW_KEY] == "step 3/3"
    assert psnr(ours, python_preview) >= NATIVE_DB
    # A fast preview is the map at latent resolution (f x f blocks), not the image: far from it on this random VAE.
    f = pipe_factor(model)
    np.testing.assert_array_equal(ours, ours[::f, ::f].repeat(f, axis=0).repeat(f, axis=1))
    image, _ = read_png(tmp_path / "out.png")
    assert psnr(ours, image) < NATIVE_DB - 20
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.png", "p.png", "py"]  # no temp file left
    (tmp_path / "out.png").unlink()
    code, _, err = run_cli(ldm_rt_main, ["sample", *cli_args(model, tmp_path, "--preview", str(tmp_path / "p.png"))])
    assert code == 0, err  # ldm-rt sample replaces the native preview in turn


def pipe_factor(model: Path) -> int:
    return json.loads((model / "manifest.json").read_text())["facts"]["latent_factor"]


@pytest.mark.parametrize(
    "setup,extra",
    [
        ("user", ["--preview", "{p}"]),  # a file of the user's, not an image
        ("user-png", ["--preview", "{p}"]),  # a PNG of the user's (an image, not a preview)
        (None, ["--preview", "{tmp}/p.jpg"]),
        (None, ["--preview", "{tmp}/out.png"]),
        (None, ["--preview", "{tmp}/missing/p.png"]),
        (None, ["--preview", "{tmp}"]),
        (None, ["--preview-every", "2"]),
        (None, ["--preview-kind", "full"]),
        (None, ["--preview", "{p}", "--preview-every", "0"]),
        (None, ["--preview", "{p}", "--preview-kind", "exact"]),
    ],
)
def test_bad_preview_targets_get_ldm_rt_samples_one_line_and_nothing_is_touched(native, model, tmp_path, capsys, setup, extra):  # noqa: F811
    p = tmp_path / "p.png"
    if setup == "user":
        p.write_text("my notes")
    elif setup == "user-png":
        Image.new("RGB", (4, 4)).save(p)
    before = sorted((q.name, q.read_bytes()) for q in tmp_path.iterdir())
    args = cli_args(model, tmp_path, *(a.format(p=p, tmp=tmp_path) for a in extra))
    done = native.run(*args)
    native_line = one_line_error(done.returncode, done.stderr, "ldm-rt-native")
    try:
        code = ldm_rt_main(["sample", *args])
    except SystemExit as e:  # argparse's usage errors
        code = e.code
    python_line = one_line_error(code, capsys.readouterr().err, "ldm-rt")
    assert native_line.removeprefix("ldm-rt-native") == python_line.removeprefix("ldm-rt")
    assert sorted((q.name, q.read_bytes()) for q in tmp_path.iterdir()) == before


def test_a_folder_built_before_previews_previews_full_decodes_saying_so(native, model, pipe, tmp_path, caplog):  # noqa: F811
    """No factors (nor manifest entry): fast previews are full ones, with Python's log line, so the last is the image
    itself; a factors file changed after the build is refused at load, naming it, before anything is compiled."""
    old = tmp_path / "old"
    shutil.copytree(model, old)
    (old / PREVIEW_FILE).unlink()
    manifest = json.loads((old / "manifest.json").read_text())
    del manifest["preview_factors"]
    (old / "manifest.json").write_text(json.dumps(manifest))
    done = native.run(*cli_args(old, tmp_path, "--preview", tmp_path / "p.png"))
    assert done.returncode == 0, done.stderr
    with caplog.at_level("WARNING", logger="ldm_rt"):
        Pipeline.load(old).generate(**ARGS, preview=Recorder())
    (line,) = [r.getMessage() for r in caplog.records if "preview" in r.getMessage()]
    assert done.stderr.splitlines() == [f"ldm-rt-native: WARNING: {line}"]
    preview, _ = read_png(tmp_path / "p.png")
    np.testing.assert_array_equal(preview, read_png(tmp_path / "out.png")[0])

    changed = tmp_path / "changed"
    shutil.copytree(model, changed)
    (changed / PREVIEW_FILE).write_text((changed / PREVIEW_FILE).read_text().replace('"weights": [', '"weights": [[0, 0, 0], ', 1))
    done = native.run(*cli_args(changed, tmp_path, "--out", tmp_path / "changed.png"))
    line = one_line_error(done.returncode, done.stderr, "ldm-rt-native")
    assert f"{changed / PREVIEW_FILE} does not match the manifest's hash" in line


def test_the_flags_read_as_in_ldm_rt_sample_help(native):  # noqa: F811
    sample = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)).choices["sample"]
    done = native.run("--help")
    assert done.returncode == 0
    for flag in ("--preview", "--preview-every", "--preview-kind"):
        expected = next(a.help for a in sample._actions if flag in a.option_strings)
        assert expected in " ".join(done.stdout.split()), flag
