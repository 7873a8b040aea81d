"""`ldm-rt sample` / `ldm-rt info` on synthetic artifacts: outputs, PNG metadata, and every bad input as one
line on stderr, exit 2, no traceback, no file written."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
from test_runtime_fixtures import synthetic

from ldm_rt.runtime.cli import main
from ldm_rt.runtime.images import read_png_text


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return synthetic(tmp_path_factory)[0]


def run_cli(argv, capsys):
    """(exit code, stdout, stderr) of main(argv) in-process."""
    try:
        code = main([str(a) for a in argv])
    except SystemExit as e:
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


def test_sample_writes_a_png_with_its_parameters(model_dir, tmp_path, capsys):
    out = tmp_path / "cube.png"
    code, stdout, stderr = run_cli(
        ["sample", "--model", model_dir, "--prompt", "a red cube", "--negative-prompt", "blurry", "--steps", 3,
         "--guidance", 5.5, "--guidance-rescale", 0.7, "--scheduler", "euler", "--seed", 42, "--out", out, "--verbose"], capsys)
    assert code == 0, stderr
    assert stdout.strip() == str(out)
    text = read_png_text(out)
    assert {k: text[k] for k in ("prompt", "negative_prompt", "seed", "steps", "scheduler", "guidance", "guidance_rescale")} == {
        "prompt": "a red cube", "negative_prompt": "blurry", "seed": "42", "steps": "3", "scheduler": "euler", "guidance": "5.5",
        "guidance_rescale": "0.7"}
    assert text["model_hash"] == f"{0:064x}"  # the synthetic source's hash, from the manifest
    assert json.loads(text["parameters"])["height"] == 16
    assert "timings: text_encoder" in stderr and "3 steps" in stderr  # --verbose per-stage timings


def test_same_seed_same_png_pixels_and_batch_outputs(model_dir, tmp_path, capsys):
    from PIL import Image

    args = ["sample", "--model", model_dir, "--prompt", "a cat", "--steps", 2, "--seed", 1]
    assert run_cli(args + ["--out", tmp_path / "a.png"], capsys)[0] == 0
    assert run_cli(args + ["--out", tmp_path / "b.png"], capsys)[0] == 0
    np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "a.png")), np.asarray(Image.open(tmp_path / "b.png")))
    # Threading changes the speed, not the image.
    assert run_cli(args + ["--threads", 1, "--spin", "--out", tmp_path / "c.png"], capsys)[0] == 0
    np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "a.png")), np.asarray(Image.open(tmp_path / "c.png")))
    code, stdout, _ = run_cli(args + ["--batch", 3, "--out", tmp_path / "many.png"], capsys)
    assert code == 0 and stdout.split() == [str(tmp_path / f"many_{k}.png") for k in range(3)]
    assert read_png_text(tmp_path / "many_2.png")["batch_index"] == "2"
    code, _, _ = run_cli(args + ["--batch", 3, "--grid", "--out", tmp_path / "grid.png"], capsys)
    assert code == 0 and Image.open(tmp_path / "grid.png").size == (2 * 16, 2 * 16)


def test_img2img_and_inpainting_from_files(model_dir, tmp_path, capsys):
    from PIL import Image

    Image.fromarray(np.full((16, 16, 3), 90, np.uint8)).save(tmp_path / "init.png")
    Image.fromarray(np.zeros((16, 16), np.uint8)).save(tmp_path / "mask.png")
    base = ["sample", "--model", model_dir, "--prompt", "a cat", "--steps", 4, "--seed", 1, "--init-image", tmp_path / "init.png"]
    assert run_cli(base + ["--strength", 0.5, "--out", tmp_path / "i2i.png"], capsys)[0] == 0
    assert json.loads(read_png_text(tmp_path / "i2i.png")["parameters"])["mode"] == "img2img"
    assert run_cli(base + ["--mask", tmp_path / "mask.png", "--out", tmp_path / "inp.png"], capsys)[0] == 0
    assert json.loads(read_png_text(tmp_path / "inp.png")["parameters"])["mode"] == "inpaint"


def test_latents_file(model_dir, tmp_path, capsys):
    noise = np.random.default_rng(4).standard_normal((1, 4, 8, 8), dtype=np.float32)
    np.save(tmp_path / "z.npy", noise)
    args = ["sample", "--model", model_dir, "--prompt", "a cat", "--steps", 2]
    assert run_cli(args + ["--seed", 4, "--out", tmp_path / "seed.png"], capsys)[0] == 0
    assert run_cli(args + ["--seed", 5, "--latents", tmp_path / "z.npy", "--out", tmp_path / "lat.png"], capsys)[0] == 0
    from PIL import Image

    np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "seed.png")), np.asarray(Image.open(tmp_path / "lat.png")))


def test_too_long_prompt_is_truncated_with_a_warning(model_dir, tmp_path, capsys):
    code, _, stderr = run_cli(["sample", "--model", model_dir, "--prompt", "a red cube on the table " * 5, "--steps", 1,
                               "--out", tmp_path / "long.png"], capsys)
    assert code == 0 and (tmp_path / "long.png").is_file()
    assert "ldm-rt: WARNING: prompt 0 " in stderr  # the tokenizer's warning, shown by the CLI


def broken_copy(model_dir, tmp_path, how):
    bad = tmp_path / "bad_artifacts"
    shutil.copytree(model_dir, bad)
    if how == "truncated-onnx":
        f = bad / "onnx/fp32/unet.onnx"
        f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    elif how == "changed-tokenizer":
        f = bad / "tokenizer.json"
        f.write_text(f.read_text().replace('"cube"', '"cubes"'))
    elif how == "no-manifest":
        (bad / "manifest.json").unlink()
    elif how == "bad-manifest":
        (bad / "manifest.json").write_text("{ not json")
    return bad


BAD_INPUTS = {
    "steps-zero": (["--steps", 0], "steps must be >= 1, got 0"),
    "steps-not-int": (["--steps", "many"], "argument --steps: invalid int value: 'many'"),
    "guidance-nan": (["--guidance", "nan"], "guidance must be a finite number, got nan"),
    "guidance-inf": (["--guidance", "inf"], "guidance must be a finite number, got inf"),
    "height-not-multiple": (["--height", 18], "height 18 must be a multiple of 4 in [8, 32]"),
    "width-too-large": (["--width", 64], "width 64 must be a multiple of 4 in [8, 32]"),
    "unknown-scheduler": (["--scheduler", "heun"], "argument --scheduler: invalid choice: 'heun'"),
    "batch-zero": (["--batch", 0], "batch must be >= 1, got 0"),
    "batch-too-large": (["--batch", 5], "outside the artifacts' batch range [1, 4]"),
    "strength": (["--strength", 2], "strength must be in (0, 1], got 2.0"),
    "mask-without-image": (["--mask", "m.png"], "--mask needs --init-image"),
    "missing-init-image": (["--init-image", "nope.png"], "cannot read init image nope.png"),
    "unknown-backend": (["--backend", "jax"], "argument --backend: invalid choice: 'jax'"),
    "tensorrt-missing": (["--backend", "tensorrt"], "TensorRT/CUDA not found"),
    "fp16-not-built": (["--precision", "fp16"], "has no fp16"),
    "threads-zero": (["--threads", 0], "--threads must be at least 1, got 0"),
    "rescale-too-large": (["--guidance-rescale", 2], "guidance_rescale must be in [0, 1]"),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_is_one_line_exit_2_and_no_file(case, model_dir, tmp_path, capsys, monkeypatch):
    if case == "tensorrt-missing" and __import__("importlib.util").util.find_spec("tensorrt") is not None:
        pytest.skip("TensorRT is installed here")
    monkeypatch.chdir(tmp_path)
    extra, message = BAD_INPUTS[case]
    out = tmp_path / "out.png"
    code, stdout, stderr = run_cli(["sample", "--model", model_dir, "--prompt", "a cat", "--steps", 2, *extra, "--out", out], capsys)
    assert code == 2
    assert stderr.count("\n") == 1 and stderr.startswith("ldm-rt: error: "), stderr
    assert message in stderr and "Traceback" not in stderr
    assert not out.exists() and list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("how, message", [
    ("truncated-onnx", "unet.onnx does not match the manifest's hash (truncated or changed); rebuild the artifacts"),
    ("changed-tokenizer", "tokenizer.json does not match the manifest's hash"),
    ("no-manifest", "manifest.json not found"),
    ("bad-manifest", "manifest.json is not valid JSON"),
])
def test_corrupt_artifacts_are_one_line_exit_2(how, message, model_dir, tmp_path, capsys):
    bad = broken_copy(model_dir, tmp_path, how)
    out = tmp_path / "out.png"
    code, _, stderr = run_cli(["sample", "--model", bad, "--prompt", "a cat", "--steps", 1, "--out", out], capsys)
    assert code == 2 and stderr.count("\n") == 1 and message in stderr and not out.exists()


def test_missing_model_folder_and_wrong_latents_and_unwritable_output(model_dir, tmp_path, capsys):
    cases = [
        (["--model", tmp_path / "nowhere"], "nowhere is not a folder"),
        (["--model", model_dir, "--latents", tmp_path / "none.npy"], "cannot read --latents"),
        (["--model", model_dir, "--out", tmp_path / "no_dir" / "x.png"], "does not exist; create it first"),
        (["--model", model_dir, "--out", tmp_path], "is a folder"),
    ]
    np.save(tmp_path / "small.npy", np.zeros((1, 4, 4, 4), np.float32))
    cases.append((["--model", model_dir, "--latents", tmp_path / "small.npy"], "latents have shape (1, 4, 4, 4), expected (1, 4, 8, 8)"))
    before = sorted(tmp_path.iterdir())
    for extra, message in cases:
        argv = ["sample", "--prompt", "a cat", "--steps", 1, *extra]
        if "--out" not in extra:
            argv += ["--out", tmp_path / "out.png"]
        code, _, stderr = run_cli(argv, capsys)
        assert code == 2 and stderr.count("\n") == 1 and message in stderr, (extra, stderr)
    assert sorted(tmp_path.iterdir()) == before


def test_info_describes_the_artifacts(model_dir, capsys):
    code, out, _ = run_cli(["info", "--model", model_dir], capsys)
    assert code == 0
    assert "profile: batch 1:1:4, height 8:16:32, width 8:16:32" in out
    assert "unet: (sample float32['unet_batch', 4, 'latent_height', 'latent_width']" in out
    assert "fp32: onnx/fp32/unet.onnx" in out and "passed" in out
    code, out, _ = run_cli(["info", "--model", model_dir, "--json"], capsys)
    assert code == 0 and json.loads(out)["format"] == "ldm-rt-artifacts"


def test_bench_is_not_a_stub_here(capsys):
    code, _, stderr = run_cli(["frobnicate"], capsys)
    assert code == 2 and stderr.count("\n") == 1 and "invalid choice" in stderr


def test_console_script_sample_never_imports_torch(model_dir, tmp_path):
    code = (
        "import sys\n"
        "from ldm_rt.runtime.cli import main\n"
        f"rc = main(['sample', '--model', {str(model_dir)!r}, '--prompt', 'a cat', '--steps', '2', '--seed', '0', "
        f"'--out', {str(tmp_path / 'x.png')!r}])\n"
        "heavy = sorted(m for m in ('torch', 'transformers', 'diffusers', 'onnx') if m in sys.modules)\n"
        "print('heavy:' + ','.join(heavy), rc)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().splitlines()[-1] == "heavy: 0"
    assert (tmp_path / "x.png").is_file()
