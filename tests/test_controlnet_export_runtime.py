"""ControlNet end to end (issue 19): a tiny SD v1 folder and two tiny ControlNets (diffusers layout, zero convolutions
given non-zero weights, E(c) strengthened: tests/tiny_models.py) -> one export with `controlnets=` -> Pipeline.generate
/ `ldm-rt sample` equal diffusers' StableDiffusionControlNetPipeline (loaded with from_pretrained from the same folders,
same latents, DDIM) at PSNR >= 50 dB: one ControlNet at scales 1.0, 0.6 and 0.0 (0.0 equals diffusers' plain
StableDiffusionPipeline), two at once (MultiControlNet), control_guidance_start/end, guess mode, batches, a control
image of another size (resized as diffusers does), img2img and inpainting; the scales move the image far more than the
bar; the CLI, PNG metadata and the HTTP example carry the control images; bad input is one line, exit 2, nothing
written."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from test_runtime_fixtures import http_example, one_line_error, psnr, run_cli, to_u8

from ldm_rt.export import build_engines
from ldm_rt.export.build import BuildOptions, build
from ldm_rt.runtime import cli
from ldm_rt.runtime.contracts import ShapeProfile, build_contracts, controlnet_names
from ldm_rt.runtime.controlnet import control_image_sha256, controlnet_keep, guess_mode_scales
from ldm_rt.runtime.manifest import Manifest
from ldm_rt.runtime.params import GenerationError
from ldm_rt.runtime.pipeline import Pipeline

diffusers = pytest.importorskip("diffusers")

SIZE = 32  # pixels; the tiny VAE has latent factor 2: latents of 16 x 16
PROMPT = "a red circle on the left"
STEPS = 4
GUIDANCE = 5.0
BAR_DB = 50.0
# Scale 1.0 against 0.0 measured 15-16 dB on these models: far below the bar, so the parity checks are sensitive.
SENSITIVE_DB = 30.0










pytestmark = pytest.mark.usefixtures("torch_one_thread")


CPP_TEST = "test_the_cpp_host_takes_the_control_images_as_the_python_api"


@pytest.fixture(scope="module", autouse=True)
def cpp_build(request, tmp_path_factory):
    """The CPython-embedding C++ host (cpp/), built in the background from the module's start, while the artifacts
    are exported, but only when its test is selected (a -k run of the others builds nothing)."""
    if not any(item.name == CPP_TEST and item.module is request.module for item in request.session.items):
        return None
    from cmake_build import embedding_build

    try:
        return embedding_build(tmp_path_factory)  # the session's one build, shared with the other embedding tests
    except pytest.skip.Exception as e:
        return str(e)  # no cmake or g++: that one test skips with the reason, the others run


@pytest.fixture(scope="module")
def control_images() -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    return [rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8) for _ in range(2)]


@pytest.fixture(scope="module")
def noise() -> np.ndarray:
    return np.random.default_rng(1).standard_normal((1, 4, SIZE // 2, SIZE // 2), dtype=np.float32)


_EXPORTS: dict[str, Path] = {}


def two_controlnet_export(tmp_path_factory, tiny_sd_v1, tiny_controlnet_v1, tiny_controlnet_v1_b) -> Path:
    """One export of the tiny SD with both ControlNets (fp32 parity per component; no ONNX Runtime attention variant:
    time), made once per session (test_native_controlnet.py samples the same)."""
    key = str(tmp_path_factory.getbasetemp())
    if key not in _EXPORTS:
        out = tmp_path_factory.mktemp("controlnet_artifacts") / "artifacts"
        profile = ShapeProfile((1, 1, 2), (SIZE,) * 3, (SIZE,) * 3)
        build(BuildOptions(
            model=tiny_sd_v1, out=out, profile=profile, onnx_only=True, ort_variant=False, progress=False,
            controlnets=(tiny_controlnet_v1, tiny_controlnet_v1_b),
        ))  # fmt: skip
        _EXPORTS[key] = out
    return _EXPORTS[key]


@pytest.fixture(scope="module")
def artifacts(tiny_sd_v1, tiny_controlnet_v1, tiny_controlnet_v1_b, tmp_path_factory) -> Path:
    return two_controlnet_export(tmp_path_factory, tiny_sd_v1, tiny_controlnet_v1, tiny_controlnet_v1_b)


@pytest.fixture(scope="module")
def pipe(artifacts) -> Pipeline:
    return Pipeline.load(artifacts)


@pytest.fixture(scope="module")
def oracle(tiny_sd_v1, tiny_controlnet_v1, tiny_controlnet_v1_b):
    """diffusers' pipelines from the same folders: one ControlNet, both (MultiControlNet), none; DDIM."""
    nets = [diffusers.ControlNetModel.from_pretrained(f) for f in (tiny_controlnet_v1, tiny_controlnet_v1_b)]
    common = dict(safety_checker=None, requires_safety_checker=False)
    pipes = {
        "one": diffusers.StableDiffusionControlNetPipeline.from_pretrained(tiny_sd_v1, controlnet=nets[0], **common),
        "two": diffusers.StableDiffusionControlNetPipeline.from_pretrained(tiny_sd_v1, controlnet=nets, **common),
        "plain": diffusers.StableDiffusionPipeline.from_pretrained(tiny_sd_v1, **common),
    }
    for p in pipes.values():
        p.scheduler = diffusers.DDIMScheduler.from_config(p.scheduler.config)
        p.set_progress_bar_config(disable=True)
    return pipes


def theirs(oracle, which: str, noise: np.ndarray, images=None, **kwargs) -> np.ndarray:
    args = dict(num_inference_steps=STEPS, guidance_scale=GUIDANCE, latents=torch.from_numpy(noise), output_type="np", height=SIZE, width=SIZE)
    if images is not None:
        args["image"] = [Image.fromarray(i) for i in images] if which == "two" else Image.fromarray(images[0])
    return to_u8(oracle[which](PROMPT, **args, **kwargs).images[0])


def ours(pipe: Pipeline, noise: np.ndarray, images, scales, **kwargs) -> np.ndarray:
    return pipe.generate(
        PROMPT, steps=STEPS, guidance=GUIDANCE, scheduler="ddim", seed=0, latents=noise, control_image=list(images),
        controlnet_conditioning_scale=scales, **kwargs,
    ).images[0]


# ---- contracts and manifest ----------------------------------------------------------------------------------
def test_manifest_lists_each_controlnet_and_the_unet_takes_their_residuals(artifacts, tiny_controlnet_v1, tiny_controlnet_v1_b):
    m = Manifest.read(artifacts)
    assert controlnet_names(list(m.components)) == ["controlnet_0", "controlnet_1"]
    cn = m.components["controlnet_0"].contract
    assert [t.name for t in cn.inputs] == ["sample", "timestep", "encoder_hidden_states", "controlnet_cond", "conditioning_scale"]
    assert cn.inputs[3].shape == ("unet_batch", 3, "scale:latent_height:2", "scale:latent_width:2")  # pixel space
    # The tiny UNet: widths (32, 64), one ResBlock per level: 4 skips and the middle block.
    assert [(t.name, t.shape[1:]) for t in cn.outputs] == [
        ("down_block_res_sample_0", (32, "latent_height", "latent_width")),
        ("down_block_res_sample_1", (32, "latent_height", "latent_width")),
        ("down_block_res_sample_2", (32, "div:latent_height:2", "div:latent_width:2")),
        ("down_block_res_sample_3", (64, "div:latent_height:2", "div:latent_width:2")),
        ("mid_block_res_sample", (64, "div:latent_height:2", "div:latent_width:2")),
    ]
    unet = [t.name for t in m.components["unet"].contract.inputs]
    assert unet[3:] == [f"down_block_additional_residual_{k}" for k in range(4)] + ["mid_block_additional_residual"]
    records = m.source["controlnets"]
    assert [r["path"] for r in records] == [str(Path(tiny_controlnet_v1).resolve()), str(Path(tiny_controlnet_v1_b).resolve())]
    assert all(len(r["sha256"]) == 64 and r["kind"] == "diffusers" for r in records) and records[0]["sha256"] != records[1]["sha256"]
    assert all(e.precisions["fp32"].parity["passed"] for e in m.components.values())
    # A folder without ControlNets keeps the plain UNet (no residual inputs, nothing extra per step).
    plain = build_contracts(m.facts, m.profile)
    assert [t.name for t in plain["unet"].inputs] == unet[:3] and not controlnet_names(list(plain))


def test_guidance_window_and_guess_scales_are_diffusers():
    assert controlnet_keep([0.0, 0.25], [0.5, 1.0], 4).tolist() == [[1, 0], [1, 1], [0, 1], [0, 1]]
    assert np.allclose(guess_mode_scales(13), torch.logspace(-1, 0, 13).numpy(), rtol=1e-6)



def test_a_pooling_controlnet_broadcasts_its_residuals_and_turns_guess_mode_on():
    """The shuffle ControlNet (global_pool_conditions): (rows, C, 1, 1) residuals spread over h, w, no guess-mode
    weights, and, first in the list, guess mode for all (diffusers' pipeline does so): it sees the conditional half."""
    from ldm_rt.runtime.contracts import ControlNetFacts, ModelFacts
    from ldm_rt.runtime.controlnet import ControlRun, make_control_request

    facts = ModelFacts(4, 2, 2, 4, 4, 77, 32, 100, None, "kl", 0.18215)
    layout = ControlNetFacts(((32, 1), (32, 1), (32, 2), (64, 2)), (64, 2), global_average_pooling=True)
    contracts = build_contracts(facts, ShapeProfile((1, 1, 2), (SIZE,) * 3, (SIZE,) * 3), [layout])
    request = make_control_request(1, np.zeros((8, 8, 3), np.uint8), 0.5, 0.0, 1.0, False)
    run = ControlRun.prepare(request, [contracts["controlnet_0"]], contracts["unet"], SIZE, SIZE, 1, STEPS, True,
                             {"encoder_hidden_states": np.zeros((2, 77, 32), np.float32)})  # fmt: skip
    seen = []

    def call(name, feeds):
        contracts[name].check_inputs(feeds)
        seen.append(feeds)
        scale = feeds["conditioning_scale"][0]
        return {t.name: np.full((1, t.shape[1], 1, 1), scale, np.float32) for t in contracts[name].outputs}

    residuals = run.residuals(0, np.zeros((2, 4, SIZE // 2, SIZE // 2), np.float32), 999.0, call)
    assert run.guess_mode and seen[0]["controlnet_cond"].shape == (1, 3, SIZE, SIZE)  # the conditional row only
    assert residuals["down_block_additional_residual_3"].shape == (2, 64, SIZE // 4, SIZE // 4)
    for r in residuals.values():
        assert np.all(r[0] == 0) and np.all(r[1] == 0.5)  # unconditional half: none; no guess-mode weights


def test_an_original_single_file_controlnet_exports_as_its_folder(tiny_sd_v1, tiny_controlnet_v1, tmp_path):
    from ldm_rt.export.controlnet_sources import load_controlnets
    from ldm_rt.export.sources import load_source
    from tiny_models import make_tiny_controlnet_single_file

    single = make_tiny_controlnet_single_file(tiny_controlnet_v1, tmp_path / "control_tiny.safetensors")
    source = load_source(tiny_sd_v1)
    folder, file = load_controlnets([tiny_controlnet_v1, single], source)
    assert file.record["kind"] == "single_file" and folder.record["kind"] == "diffusers" and file.facts == folder.facts
    assert all(torch.equal(a, b) for a, b in zip(folder.model.state_dict().values(), file.model.state_dict().values()))

# ---- parity with diffusers -----------------------------------------------------------------------------------
@pytest.mark.parametrize("scale", [1.0, 0.6, 0.0])
def test_one_controlnet_matches_diffusers(pipe, oracle, noise, control_images, scale):
    """The second ControlNet at scale 0 contributes nothing (it is not run), so this is diffusers' single-ControlNet
    pipeline; at 0.0 both equal diffusers' plain pipeline."""
    got = ours(pipe, noise, control_images, [scale, 0.0])
    assert psnr(got, theirs(oracle, "one", noise, control_images, controlnet_conditioning_scale=scale)) >= BAR_DB
    if scale == 0.0:
        plain = oracle["plain"](
            PROMPT, num_inference_steps=STEPS, guidance_scale=GUIDANCE, latents=torch.from_numpy(noise), output_type="np"
        ).images[0]
        plain = to_u8(plain)
        assert psnr(got, plain) >= BAR_DB
        assert psnr(got, ours(pipe, noise, control_images, [1.0, 0.0])) < SENSITIVE_DB  # the ControlNet matters


@pytest.mark.parametrize(
    "kwargs",
    [
        {},
        {"guess_mode": True},
        {"control_guidance_start": [0.0, 0.25], "control_guidance_end": [0.5, 1.0]},
    ],
    ids=["multi", "guess_mode", "start_end"],
)
def test_two_controlnets_match_diffusers_multicontrolnet(pipe, oracle, noise, control_images, kwargs):
    got = ours(pipe, noise, control_images, [1.0, 0.6], **kwargs)
    assert psnr(got, theirs(oracle, "two", noise, control_images, controlnet_conditioning_scale=[1.0, 0.6], **kwargs)) >= BAR_DB
    if kwargs:  # each option changes the image far more than the bar
        assert psnr(got, ours(pipe, noise, control_images, [1.0, 0.6])) < SENSITIVE_DB


@pytest.mark.parametrize("guidance", [GUIDANCE, 1.0], ids=["cfg", "no_cfg"])
def test_a_batch_matches_diffusers_num_images_per_prompt(pipe, oracle, control_images, guidance):
    """Two images per prompt, in guess mode: each control image serves the whole batch; without guidance the
    ControlNets see every row (measured: identical)."""
    noise = np.random.default_rng(2).standard_normal((2, 4, SIZE // 2, SIZE // 2), dtype=np.float32)
    got = pipe.generate(
        PROMPT, steps=STEPS, guidance=guidance, scheduler="ddim", seed=0, batch=2, latents=noise, control_image=list(control_images),
        controlnet_conditioning_scale=[1.0, 0.6], guess_mode=True,
    ).images
    expected = oracle["two"](
        PROMPT, image=[Image.fromarray(i) for i in control_images], num_images_per_prompt=2, num_inference_steps=STEPS,
        guidance_scale=guidance, latents=torch.from_numpy(noise), controlnet_conditioning_scale=[1.0, 0.6], guess_mode=True,
        output_type="np", height=SIZE, width=SIZE,
    ).images  # fmt: skip
    assert all(psnr(g, e) >= BAR_DB for g, e in zip(got, to_u8(expected)))

def test_control_image_of_another_size_is_resized_as_diffusers(pipe, oracle, noise, control_images):
    rng = np.random.default_rng(5)
    other = [rng.integers(0, 256, (48, 40, 3), dtype=np.uint8), control_images[1]]
    got = ours(pipe, noise, other, [1.0, 0.6])
    assert psnr(got, theirs(oracle, "two", noise, other, controlnet_conditioning_scale=[1.0, 0.6])) >= BAR_DB



@pytest.mark.parametrize("mode", ["img2img", "inpaint"])
def test_img2img_and_inpainting_match_diffusers_controlnet_pipelines(tiny_sd_v1, oracle, pipe, noise, control_images, monkeypatch, mode):
    """StableDiffusionControlNetImg2ImgPipeline / InpaintPipeline with the same ControlNets, their noise pinned to ours
    and the init image's latent taken as the posterior mean, as ours (measured: img2img 8-bit identical, inpainting
    83 dB)."""
    from diffusers.pipelines.controlnet import pipeline_controlnet_img2img, pipeline_controlnet_inpaint

    module, cls = {
        "img2img": (pipeline_controlnet_img2img, diffusers.StableDiffusionControlNetImg2ImgPipeline),
        "inpaint": (pipeline_controlnet_inpaint, diffusers.StableDiffusionControlNetInpaintPipeline),
    }[mode]
    monkeypatch.setattr(module, "randn_tensor", lambda shape, **kw: torch.from_numpy(noise))
    monkeypatch.setattr(module, "retrieve_latents", lambda out, generator=None, sample_mode="sample": out.latent_dist.mode())
    reference = cls(**oracle["two"].components)
    reference.set_progress_bar_config(disable=True)
    init = np.random.default_rng(7).integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)
    mask = np.zeros((SIZE, SIZE), np.uint8)
    mask[8:24, 4:28] = 255
    extra = {"strength": 0.75} if mode == "img2img" else {"mask": mask, "mask_blur": None}  # None: the decoder's pixels, as diffusers
    got = ours(pipe, noise, control_images, [1.0, 0.6], init_image=init, **extra)
    expected = to_u8(reference(
        PROMPT, image=Image.fromarray(init), control_image=[Image.fromarray(i) for i in control_images], num_inference_steps=STEPS,
        guidance_scale=GUIDANCE, controlnet_conditioning_scale=[1.0, 0.6], output_type="np", height=SIZE, width=SIZE,
        **({"strength": 0.75} if mode == "img2img" else {"mask_image": Image.fromarray(mask)}),
    ).images[0])  # fmt: skip
    assert psnr(got, expected) >= BAR_DB
    assert psnr(got, ours(pipe, noise, control_images, [0.0, 0.0], init_image=init, **extra)) < SENSITIVE_DB

# ---- CLI, metadata, bad input --------------------------------------------------------------------------------
def test_cli_samples_with_control_images_and_records_them(artifacts, control_images, tmp_path, pipe, noise):
    files = []
    for k, image in enumerate(control_images):
        files.append(tmp_path / f"control_{k}.png")
        Image.fromarray(image).save(files[-1])
    np.save(tmp_path / "noise.npy", noise)
    out = tmp_path / "controlled.png"
    code, stdout, err = run_cli(cli.main, [
        "sample", "--model", str(artifacts), "--prompt", PROMPT, "--steps", str(STEPS), "--guidance", str(GUIDANCE),
        "--scheduler", "ddim", "--seed", "0", "--latents", str(tmp_path / "noise.npy"), "--out", str(out),
        "--control-image", str(files[0]), "--controlnet-scale", "1.0", "--control-image", str(files[1]),
        "--controlnet-scale", "0.6", "--control-guidance-end", "0.5", "1.0", "--guess-mode",
    ])  # fmt: skip
    assert code == 0, err
    with Image.open(out) as im:
        image, params = np.asarray(im.convert("RGB")), json.loads(im.text["parameters"])
    expected = ours(pipe, noise, control_images, [1.0, 0.6], control_guidance_end=[0.5, 1.0], guess_mode=True)
    assert np.array_equal(image, expected)
    assert params["guess_mode"] is True
    nets = params["controlnets"]
    assert [n["conditioning_scale"] for n in nets] == [1.0, 0.6] and [n["control_guidance_end"] for n in nets] == [0.5, 1.0]
    assert [n["control_image_sha256"] for n in nets] == [control_image_sha256(i) for i in control_images]
    assert all(len(n["controlnet_sha256"]) == 64 for n in nets)
    code, stdout, err = run_cli(cli.main, ["info", "--model", str(artifacts)])
    assert code == 0 and "controlnet_1: diffusers" in stdout and "(--control-image 2)" in stdout, err


def test_bad_control_input_is_one_line_and_writes_nothing(artifacts, control_images, tmp_path):
    image = tmp_path / "control.png"
    Image.fromarray(control_images[0]).save(image)
    out = tmp_path / "x.png"
    base = ["sample", "--model", str(artifacts), "--steps", "1", "--out", str(out)]
    cases = [
        ([], "pass a control image for each"),
        (["--control-image", str(image)], "1 control image(s) for 2 ControlNet(s)"),
        (["--control-image", str(image)] * 2 + ["--controlnet-scale", "1"] * 3, "3 --controlnet-scale values for 2 --control-image"),
        (["--control-image", str(image), "--control-image", str(tmp_path / "missing.png")], "missing.png"),
        (["--control-image", str(image)] * 2 + ["--control-guidance-start", "0.6", "--control-guidance-end", "0.5"], "must be before"),
    ]
    for extra, message in cases:
        line = one_line_error(*run_cli(cli.main, base + extra)[::2], "ldm-rt")
        assert message in line, line
        assert not out.exists()
    # Artifacts without a ControlNet (the shipped default model) refuse a control image.
    line = one_line_error(*run_cli(cli.main, ["sample", "--steps", "1", "--out", str(out), "--control-image", str(image)])[::2], "ldm-rt")
    assert "no ControlNet" in line and "--controlnet" in line and not out.exists()
    with pytest.raises(GenerationError, match="no ControlNet"):
        Pipeline.load().generate("", steps=1, guess_mode=True)


def test_the_export_command_takes_one_controlnet_per_flag_in_order():
    """`build_engines.py --controlnet A --controlnet B` is BuildOptions(controlnets=(A, B)): component k is the k-th flag."""
    p = build_engines.parser()
    args = p.parse_args(["--model", "m", "--out", "o", "--controlnet", "cn_canny", "--controlnet", "control_v11f1p_sd15_depth.pth"])
    assert build_engines.options_from_args(args, p).controlnets == (Path("cn_canny"), Path("control_v11f1p_sd15_depth.pth"))
    args = p.parse_args(["--model", "m", "--out", "o"])
    assert build_engines.options_from_args(args, p).controlnets == ()  # none: the plain UNet


def test_export_refuses_a_controlnet_for_another_base_model(tiny_sd_v1, tmp_path):
    foreign = tmp_path / "foreign"
    diffusers.ControlNetModel(
        block_out_channels=(32, 64), layers_per_block=1, cross_attention_dim=48, attention_head_dim=8,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), conditioning_embedding_out_channels=(16, 32),
    ).save_pretrained(foreign)  # fmt: skip
    out = tmp_path / "out"
    code, _, err = run_cli(build_engines.main, ["--model", str(tiny_sd_v1), "--out", str(out), "--onnx-only", "--controlnet", str(foreign)])
    line = one_line_error(code, err, "build_engines.py")
    assert "another base model" in line and "48-wide" in line and not out.exists()


def test_http_example_takes_control_images(pipe, noise, control_images, tmp_path):
    """examples/http_service: control_images (base64 files, one per ControlNet) give the Python API's image; a wrong
    count or undecodable data is a 422 naming the field (FastAPI's test client on the app, no server)."""
    import base64
    import io

    pytest.importorskip("fastapi")
    pytest.importorskip("httpx")
    from fastapi.testclient import TestClient

    app = http_example("ldm_rt_http_example_controlnet")
    encoded = []
    for image in control_images:
        buffer = io.BytesIO()
        Image.fromarray(image).save(buffer, format="PNG")
        encoded.append(base64.b64encode(buffer.getvalue()).decode())
    client = TestClient(app.create_app(pipe))
    body = dict(prompt=PROMPT, steps=STEPS, guidance=GUIDANCE, scheduler="ddim", seed=3, control_images=encoded,
                controlnet_conditioning_scale=[1.0, 0.6], guess_mode=True)  # fmt: skip
    response = client.post("/generate", json=body)
    assert response.status_code == 200, response.text
    expected = pipe.generate(PROMPT, steps=STEPS, guidance=GUIDANCE, scheduler="ddim", seed=3, control_image=list(control_images),
                             controlnet_conditioning_scale=[1.0, 0.6], guess_mode=True).images[0]  # fmt: skip
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(response.content)).convert("RGB")), expected)
    assert client.get("/health").json()["controlnets"] == 2
    not_an_image = base64.b64encode(b"not an image").decode()
    for bad, where in (({"control_images": encoded[:1]}, "control_images"), ({"control_images": [encoded[0], not_an_image]}, "control_images[1]")):
        response = client.post("/generate", json={**body, **bad})
        assert response.status_code == 422 and where in response.text, response.text


def test_the_cpp_host_takes_the_control_images_as_the_python_api(cpp_build, artifacts, control_images, pipe, noise, tmp_path):
    """cpp/examples/generate --control-image FILE --controlnet-scale S (ldm_rt::Request::control_images /
    controlnet_scales): the Python API's bytes, a control image of another size resized, not refused; a missing one is
    the runtime's one-line error, exit 2, nothing written."""
    import subprocess

    if isinstance(cpp_build, str):
        pytest.skip(cpp_build)
    files = []
    rng = np.random.default_rng(9)
    for k, image in enumerate([control_images[0], rng.integers(0, 256, (48, 40, 3), dtype=np.uint8)]):
        files.append(tmp_path / f"control_{k}.png")
        Image.fromarray(image).save(files[-1])
    cpp_build.join(timeout=540)
    assert cpp_build.ok, f"the C++ build failed:\n{cpp_build.log[-4000:]}"
    exe = cpp_build.out / "generate"

    def run(*extra: str, out: Path) -> subprocess.CompletedProcess:
        args = ["--model", str(artifacts), "--prompt", PROMPT, "--steps", str(STEPS), "--guidance", str(GUIDANCE),
                "--scheduler", "ddim", "--seed", "3", *extra, "--out", str(out)]  # fmt: skip
        return subprocess.run([str(exe), *args], capture_output=True, text=True, timeout=300)

    out = tmp_path / "controlled.raw"
    done = run("--control-image", str(files[0]), "--controlnet-scale", "1.0", "--control-image", str(files[1]),
               "--controlnet-scale", "0.5", out=out)  # fmt: skip
    assert done.returncode == 0, done.stderr
    kw = dict(steps=STEPS, guidance=GUIDANCE, scheduler="ddim", seed=3)
    expected = pipe.generate(PROMPT, control_image=[str(f) for f in files], controlnet_conditioning_scale=[1.0, 0.5], **kw).images[0]
    got = np.frombuffer(out.read_bytes(), np.uint8).reshape(expected.shape)
    np.testing.assert_array_equal(got, expected)
    plain = pipe.generate(PROMPT, control_image=[str(f) for f in files], controlnet_conditioning_scale=[0.0, 0.0], **kw).images[0]
    assert psnr(got, plain) < SENSITIVE_DB  # the control images reached the ControlNets
    with pytest.raises(GenerationError) as error:
        pipe.generate(PROMPT, **kw)
    never = tmp_path / "never.raw"
    done = run(out=never)
    assert done.returncode == 2 and done.stderr.splitlines() == [f"generate: error: {error.value}"]
    assert not never.exists()
