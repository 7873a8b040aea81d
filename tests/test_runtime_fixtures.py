"""Fixtures for the runtime tests (imported by tests/test_runtime_*.py; holds only self-checks itself).

`synthetic_artifacts`: a complete artifacts folder (manifest, ONNX files, tokenizer, scheduler config)
whose four components are small closed-form ONNX graphs written with onnx.helper: no torch, no export,
built in well under a second. The runtime's mechanics (loop, guidance, img2img, errors, CLI, threads,
HTTP) are tested on it; parity with the torch reference and diffusers uses real exported tiny models.

The synthetic model (numpy twin in `SyntheticModel`, so tests can check the ONNX graphs and the pipeline):
    text_encoder: E[input_ids]                                           (B, L, D)
    unet:         tanh(W_s * sample) + mean_L(ctx) @ W_c + 0.1 sin(t / 100)  (per channel; 1x1 conv W_s)
    vae_decoder:  nearest-upsample(W_d * (latent / scale), f)             (B, 3, H, W)
    vae_encoder:  W_e * avgpool(image, f)                                 (B, 2C, h, w): [mean, logvar]
"""

from __future__ import annotations

import contextlib
import io
import json
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from ldm_rt.runtime.contracts import ModelFacts, ShapeProfile, build_contracts
from ldm_rt.runtime.manifest import ComponentEntry, FileEntry, Manifest, PrecisionEntry
from ldm_rt.runtime.schedulers import sd_scheduler_config
from ldm_rt.runtime.tokenizer import PromptTokenizer

WORDS = ("a", "red", "blue", "green", "cube", "ball", "cat", "dog", "on", "the", "table", "blurry", "ugly")
CONTEXT_LENGTH = 8
NUM_CLASSES = 5
LATENT_CHANNELS = 4
FACTOR = 2  # latent factor; the "UNet" downsamples once more, so sizes are multiples of 4
SCALE = 0.5
PROFILE = ShapeProfile(batch=(1, 1, 4), height=(8, 16, 32), width=(8, 16, 32))
SCHEDULER_CONFIG = sd_scheduler_config()


@dataclass(frozen=True)
class SyntheticModel:
    embedding: np.ndarray  # (vocab, D)
    w_sample: np.ndarray  # (C, Cin)
    w_context: np.ndarray  # (D, C)
    w_decoder: np.ndarray  # (3, C)
    w_encoder: np.ndarray  # (2C, 3)
    class_embedding: np.ndarray  # (NUM_CLASSES, C), used by the class-conditional variant

    @classmethod
    def random(cls, vocab: int, in_channels: int, seed: int = 0) -> SyntheticModel:
        rng = np.random.default_rng(seed)
        c, d = LATENT_CHANNELS, 8
        return cls(
            rng.standard_normal((vocab, d)).astype(np.float32),
            (rng.standard_normal((c, in_channels)) / np.sqrt(in_channels)).astype(np.float32),
            (rng.standard_normal((d, c)) * 0.5).astype(np.float32),
            (rng.standard_normal((3, c)) * 0.01).astype(np.float32),  # keeps images mid-range under guidance
            (rng.standard_normal((2 * c, 3)) * 0.5).astype(np.float32),
            rng.standard_normal((NUM_CLASSES, c)).astype(np.float32),
        )

    # numpy twins of the ONNX graphs
    def text_encoder(self, ids: np.ndarray) -> np.ndarray:
        return self.embedding[ids]

    def unet(self, sample: np.ndarray, timestep: np.ndarray, context: np.ndarray | None = None, labels: np.ndarray | None = None) -> np.ndarray:
        x = np.tanh(np.einsum("oc,bchw->bohw", self.w_sample, sample))
        cond = context.mean(axis=1) @ self.w_context if labels is None else self.class_embedding[labels]  # (B, C)
        c = cond[:, :, None, None]
        return (x + c + 0.1 * np.sin(timestep / 100.0)[:, None, None, None]).astype(np.float32)

    def vae_decoder(self, latent: np.ndarray) -> np.ndarray:
        x = np.einsum("oc,bchw->bohw", self.w_decoder, latent / np.float32(SCALE))
        return x.repeat(FACTOR, axis=2).repeat(FACTOR, axis=3)

    def vae_encoder(self, image: np.ndarray) -> np.ndarray:
        b, c, h, w = image.shape
        pooled = image.reshape(b, c, h // FACTOR, FACTOR, w // FACTOR, FACTOR).mean(axis=(3, 5))  # (B, 3, h, w)
        return np.einsum("oc,bchw->bohw", self.w_encoder, pooled)


def _init(name: str, array: np.ndarray) -> onnx.TensorProto:
    return numpy_helper.from_array(np.ascontiguousarray(array), name)


def _graph_model(nodes, name, inputs, outputs, initializers) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, name, inputs, outputs, initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def _vi(name: str, dtype: int, shape: list) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, dtype, shape)


def onnx_models(m: SyntheticModel, in_channels: int, variant: str) -> dict[str, onnx.ModelProto]:
    f32, i64 = TensorProto.FLOAT, TensorProto.INT64
    c = LATENT_CHANNELS
    if variant == "class":
        cond_nodes = [helper.make_node("Gather", ["K", "class_labels"], ["cond"], axis=0)]
        cond_input = _vi("class_labels", i64, ["unet_batch"])
        cond_init = [_init("K", m.class_embedding)]
    else:
        cond_nodes = [
            helper.make_node("ReduceMean", ["encoder_hidden_states"], ["ctx_mean"], axes=[1], keepdims=0),
            helper.make_node("MatMul", ["ctx_mean", "Wc"], ["cond"]),
        ]
        cond_input = _vi("encoder_hidden_states", f32, ["unet_batch", CONTEXT_LENGTH, 8])
        cond_init = [_init("Wc", m.w_context)]
    text = _graph_model(
        [helper.make_node("Gather", ["E", "input_ids"], ["last_hidden_state"], axis=0)],
        "text_encoder",
        [_vi("input_ids", i64, ["text_batch", CONTEXT_LENGTH])],
        [_vi("last_hidden_state", f32, ["text_batch", CONTEXT_LENGTH, 8])],
        [_init("E", m.embedding)],
    )
    unet = _graph_model(
        [
            helper.make_node("Conv", ["sample", "Ws"], ["conv"]),
            helper.make_node("Tanh", ["conv"], ["x"]),
            *cond_nodes,
            helper.make_node("Unsqueeze", ["cond", "axes23"], ["ctx4"]),
            helper.make_node("Div", ["timestep", "hundred"], ["t_scaled"]),
            helper.make_node("Sin", ["t_scaled"], ["t_sin"]),
            helper.make_node("Mul", ["t_sin", "tenth"], ["t_term"]),
            helper.make_node("Unsqueeze", ["t_term", "axes123"], ["t4"]),
            helper.make_node("Add", ["x", "ctx4"], ["xc"]),
            helper.make_node("Add", ["xc", "t4"], ["out_sample"]),
        ],
        "unet",
        [
            _vi("sample", f32, ["unet_batch", in_channels, "latent_height", "latent_width"]),
            _vi("timestep", f32, ["unet_batch"]),
            cond_input,
        ],
        [_vi("out_sample", f32, ["unet_batch", c, "latent_height", "latent_width"])],
        [
            _init("Ws", m.w_sample[:, :, None, None]),
            *cond_init,
            _init("axes23", np.array([2, 3], np.int64)),
            _init("axes123", np.array([1, 2, 3], np.int64)),
            _init("hundred", np.array(100.0, np.float32)),
            _init("tenth", np.array(0.1, np.float32)),
        ],
    )
    decoder = _graph_model(
        [
            helper.make_node("Div", ["latent", "scale"], ["z"]),
            helper.make_node("Conv", ["z", "Wd"], ["rgb"]),
            helper.make_node("Resize", ["rgb", "", "scales"], ["image"], mode="nearest"),
        ],
        "vae_decoder",
        [_vi("latent", f32, ["batch", c, "latent_height", "latent_width"])],
        [_vi("image", f32, ["batch", 3, "latent_height_x2", "latent_width_x2"])],
        [
            _init("scale", np.array(SCALE, np.float32)),
            _init("Wd", m.w_decoder[:, :, None, None]),
            _init("scales", np.array([1, 1, FACTOR, FACTOR], np.float32)),
        ],
    )
    encoder = _graph_model(
        [
            helper.make_node("AveragePool", ["image"], ["pooled"], kernel_shape=[FACTOR, FACTOR], strides=[FACTOR, FACTOR]),
            helper.make_node("Conv", ["pooled", "We"], ["latent_parameters"]),
        ],
        "vae_encoder",
        [_vi("image", f32, ["batch", 3, "latent_height_x2", "latent_width_x2"])],
        [_vi("latent_parameters", f32, ["batch", 2 * c, "latent_height", "latent_width"])],
        [_init("We", m.w_encoder[:, :, None, None])],
    )
    models = {"unet": unet, "vae_decoder": decoder, "vae_encoder": encoder}
    return models if variant == "class" else {"text_encoder": text, **models}


def build_synthetic_artifacts(
    root: Path, variant: str = "text", seed: int = 0, scheduler_config: dict | None = None
) -> tuple[Path, SyntheticModel]:
    """Write an artifacts folder at `root` (fp32 only) and return it with the numpy twin of its model.
    variant: "text" (prompt-conditioned), "inpaint" (UNet with mask and masked-image channels) or "class"
    (class labels, no text encoder); scheduler_config defaults to SCHEDULER_CONFIG."""
    root.mkdir(parents=True, exist_ok=True)
    tokenizer = PromptTokenizer.word_level(list(WORDS), max_length=CONTEXT_LENGTH)
    in_channels = 2 * LATENT_CHANNELS + 1 if variant == "inpaint" else LATENT_CHANNELS
    model = SyntheticModel.random(tokenizer.vocab_size, in_channels, seed)
    text = variant != "class"
    facts = ModelFacts(
        latent_channels=LATENT_CHANNELS, latent_factor=FACTOR, unet_factor=2, unet_in_channels=in_channels,
        unet_out_channels=LATENT_CHANNELS, context_length=CONTEXT_LENGTH if text else None, context_dim=8 if text else None,
        vocab_size=tokenizer.vocab_size if text else None, num_classes=None if text else NUM_CLASSES,
        autoencoder_kind="kl", scale_factor=SCALE,
    )
    contracts = build_contracts(facts, PROFILE)
    (root / "onnx" / "fp32").mkdir(parents=True, exist_ok=True)
    components = {}
    for name, proto in onnx_models(model, in_channels, variant).items():
        rel = f"onnx/fp32/{name}.onnx"
        onnx.save(proto, root / rel)
        parity = {"shapes": [], "max_abs_err": [0.0], "bound": 1e-4, "passed": True}
        components[name] = ComponentEntry(contracts[name], {"fp32": PrecisionEntry(FileEntry.of(root, rel), parity)})
    if text:
        tokenizer.save(root / "tokenizer.json")
    (root / "scheduler_config.json").write_text(json.dumps(scheduler_config or SCHEDULER_CONFIG))
    manifest = Manifest(
        facts, PROFILE, components, FileEntry.of(root, "tokenizer.json") if text else None, FileEntry.of(root, "scheduler_config.json"),
        source={"kind": "synthetic", "path": "tests/test_runtime_fixtures.py", "sha256": f"{seed:064x}"},
        tools={"onnx": onnx.__version__}, created="test",
    )
    manifest.write(root)
    return root, model


_CACHE: dict[tuple[str, str], tuple[Path, SyntheticModel]] = {}


def synthetic(tmp_path_factory: pytest.TempPathFactory, variant: str = "text") -> tuple[Path, SyntheticModel]:
    """One synthetic artifacts folder per session and variant (module fixtures of several files share it)."""
    key = (str(tmp_path_factory.getbasetemp()), variant)
    if key not in _CACHE:
        root = tmp_path_factory.mktemp(f"synthetic_{variant}") / "artifacts"
        _CACHE[key] = build_synthetic_artifacts(root, variant)
    return _CACHE[key]


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    """PSNR in dB of two uint8 images (inf when equal)."""
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float("inf") if mse == 0 else 10 * np.log10(255.0**2 / mse)


HTTP_APP = Path(__file__).resolve().parents[1] / "examples" / "http_service" / "app.py"


def http_example(name: str):
    """examples/http_service/app.py loaded as the module `name` (it is a script, not a package: each test file loads
    it under a name no other module has, so their module-level state stays apart). Needs fastapi."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, HTTP_APP)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


HTTP_LISTENING = re.compile(r"^ldm-rt-http: listening on (http://127\.0\.0\.1:\d+) with model .*\n", re.MULTILINE)


@dataclass
class HttpServer:
    url: str
    start_line: str
    stdout: Path


@contextlib.contextmanager
def http_server(logs: Path, *args: str) -> Iterator[HttpServer]:
    """The HTTP example as a user starts it (`app.py ARGS --port 0`: the OS picks the port, the start line says
    which), its output in `logs`; stopped on exit."""
    stdout, stderr = logs / "stdout.txt", logs / "stderr.txt"
    with open(stdout, "wb") as out, open(stderr, "wb") as err:  # files, not pipes: a full pipe would block the server
        proc = subprocess.Popen([sys.executable, str(HTTP_APP), *args, "--port", "0"], stdout=out, stderr=err)
    try:
        deadline = time.monotonic() + 60
        while not (match := HTTP_LISTENING.search(stdout.read_text())):
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"server did not start: {stderr.read_text()[-2000:]}")
            time.sleep(0.1)
        yield HttpServer(match.group(1), match.group(0), stdout)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def to_u8(images: np.ndarray) -> np.ndarray:
    """diffusers' output_type="np" (floats in [0, 1]) as 8-bit, the way its numpy_to_pil rounds."""
    return (images * 255).round().astype(np.uint8)


def run_cli(main, args: list[str]) -> tuple[int, str, str]:
    """(exit code, stdout, stderr) of an entry point's `main(args)` run in this process."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(args)
    return code, out.getvalue(), err.getvalue()


def one_line_error(code: int, err: str, prog: str) -> str:
    """The one `PROG: error: ...` line a refused command ends with (exit 2, no traceback)."""
    assert code == 2 and "Traceback" not in err, err
    lines = [line for line in err.strip().splitlines() if line.startswith(f"{prog}: error: ")]
    assert lines == err.strip().splitlines()[-1:], err
    return lines[0]


def test_synthetic_onnx_graphs_match_their_numpy_twins(tmp_path):
    import onnxruntime as ort

    root, m = build_synthetic_artifacts(tmp_path / "a", "inpaint")
    rng = np.random.default_rng(0)
    sess = {n: ort.InferenceSession(str(root / f"onnx/fp32/{n}.onnx"), providers=["CPUExecutionProvider"]) for n in ("text_encoder", "unet", "vae_decoder", "vae_encoder")}
    ids = rng.integers(0, m.embedding.shape[0], (2, CONTEXT_LENGTH))
    np.testing.assert_allclose(sess["text_encoder"].run(None, {"input_ids": ids})[0], m.text_encoder(ids), rtol=1e-6)
    sample = rng.standard_normal((2, 9, 4, 6), dtype=np.float32)
    t = np.array([999.0, 1.0], np.float32)
    ctx = rng.standard_normal((2, CONTEXT_LENGTH, 8), dtype=np.float32)
    got = sess["unet"].run(None, {"sample": sample, "timestep": t, "encoder_hidden_states": ctx})[0]
    np.testing.assert_allclose(got, m.unet(sample, t, ctx), rtol=1e-5, atol=1e-5)
    latent = rng.standard_normal((1, 4, 4, 6), dtype=np.float32)
    np.testing.assert_allclose(sess["vae_decoder"].run(None, {"latent": latent})[0], m.vae_decoder(latent), rtol=1e-5, atol=1e-5)
    image = rng.standard_normal((1, 3, 8, 12), dtype=np.float32)
    np.testing.assert_allclose(sess["vae_encoder"].run(None, {"image": image})[0], m.vae_encoder(image), rtol=1e-5, atol=1e-5)
    assert Manifest.read(root).facts.unet_in_channels == 9


# ---- real exports of the tiny torch models (tests/tiny_models.py fixtures, through ldm_rt.export) ----------------
# The profile of tests/test_export_build.py's builds, so one session fixture serves both.
EXPORT_PROFILE = ShapeProfile(batch=(1, 1, 2), height=(8, 16, 24), width=(8, 16, 24))
_EXPORTS: dict[tuple[str, str, bool], tuple[Path, tuple[int, str, str]]] = {}


def exported_run(tmp_path_factory: pytest.TempPathFactory, source: Path, fp16: bool) -> tuple[Path, tuple[int, str, str]]:
    """`exported`'s folder and (exit code, stdout, stderr) of the `build_engines.py --onnx-only [--fp16]` run (in this
    process) that built it: tests/test_export_build.py checks the command's output on the same build."""
    from ldm_rt.export.build_engines import main

    key = (str(tmp_path_factory.getbasetemp()), str(source), fp16)
    if not fp16 and key[:2] + (True,) in _EXPORTS:
        return _EXPORTS[key[:2] + (True,)]  # the fp16 build holds the fp32 files too: no second export
    if key not in _EXPORTS:
        out = tmp_path_factory.mktemp(f"runtime_export_{Path(source).name}") / "artifacts"
        dims = {"batch": EXPORT_PROFILE.batch, "height": EXPORT_PROFILE.height, "width": EXPORT_PROFILE.width}
        ranges = [a for dim, r in dims.items() for a in (f"--{dim}-range", ":".join(map(str, r)))]
        code, stdout, stderr = run_cli(main, ["--model", str(source), "--out", str(out), "--onnx-only", *(["--fp16"] if fp16 else []), *ranges])
        assert code == 0, stderr
        _EXPORTS[key] = (out, (code, stdout, stderr))
    return _EXPORTS[key]


def exported(tmp_path_factory: pytest.TempPathFactory, source: Path, fp16: bool) -> Path:
    """The artifacts folder of `source` (a tiny_models fixture's model) with fp32 ONNX, plus fp16 when asked
    (the fp16 overflow search is the slow part of a build); built once per session. fp16=False is served by an fp16
    build of the same source made earlier in the session (a superset): the first file that exports tiny_sd_v1
    (test_export_bf16.py) asks for fp16, so the whole suite exports it once."""
    return exported_run(tmp_path_factory, source, fp16)[0]
