"""Export memory: a component's export holds about one copy of its weights beyond the torch model, whatever its
size (issue 21: SD 1.5's export peaked at 18 GB, 5-6 copies of the UNet during the clean-up alone).

The bound is measured in a fresh process (the kernel's high-water mark, VmHWM, is per process) on a model with
128 MB of weights, big enough that copies of them dominate everything else, small enough to take seconds.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# Peak of the export beyond the process's resident memory before it (the torch model, imports), in weight bytes:
# measured 3.3x, all of it in torch.onnx.export, whose exporter builds a model under 2 GiB as one in-memory
# proto; the clean-up after it now stays within that (about 2x: the file's bytes and the parsed proto) where it
# reached 6x before, holding several copies of the weights. Past 2 GiB the tracer writes the weights to files and
# neither step holds them (SD 1.5's UNet: the clean-up peaked at 0.28 GB for 3.4 GB of weights).
BOUND = 4.0

SCRIPT = textwrap.dedent(
    """
    import json, sys, warnings
    from pathlib import Path

    import torch
    from torch import nn

    from ldm_rt.export.memory import process_peak_rss, rss_bytes
    from ldm_rt.export.onnx_export import export_component
    from ldm_rt.runtime.contracts import ComponentContract, Dim, TensorSpec, Tolerance

    warnings.simplefilter("ignore")
    torch.manual_seed(0)
    # 14 convolutions 512 -> 512, 3x3: 132 MB of weights and little arithmetic at 4x4 latents.
    layers = [nn.Conv2d(4, 512, 1)] + [nn.Conv2d(512, 512, 3, padding=1) for _ in range(14)] + [nn.Conv2d(512, 3, 1)]
    model = nn.Sequential(*layers).eval()
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    contract = ComponentContract(
        name="vae_decoder",
        inputs=(TensorSpec("latent", "float32", ("batch", 4, "latent_height", "latent_width")),),
        outputs=(TensorSpec("image", "float32", ("batch", 3, "latent_height", "latent_width")),),
        dims=(Dim("batch", 1, 1, 2), Dim("latent_height", 4, 4, 8, 2), Dim("latent_width", 4, 4, 8, 2)),
        tolerance={"fp32": Tolerance(1e-4)},
    )
    before = rss_bytes()
    files = export_component(model, contract, Path(sys.argv[1]) / "vae_decoder.onnx")
    print(json.dumps({"weight_bytes": weight_bytes, "before": before, "peak": process_peak_rss(),
                      "files": [f.name for f in files]}))
    """
)


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_a_components_export_holds_about_one_copy_of_its_weights(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-c", SCRIPT, str(tmp_path)], capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    got = json.loads(done.stdout.strip().splitlines()[-1])
    assert got["files"] == ["vae_decoder.onnx"]
    assert got["weight_bytes"] > 120e6
    extra = (got["peak"] - got["before"]) / got["weight_bytes"]
    assert extra < BOUND, f"export peak {extra:.2f}x the weight bytes above the torch model (bound {BOUND}x)"


SESSION_SCRIPT = textwrap.dedent(
    """
    import json, sys

    from ldm_rt.export.memory import GraphMemory
    from ldm_rt.export.parity import ort_session

    def anon():  # bytes of this process's anonymous memory: the session's own copies, not mapped files or code
        return 1024 * int(next(line for line in open("/proc/self/status") if line.startswith("RssAnon:")).split()[1])

    counted = GraphMemory(sys.argv[1]).session_weight_bytes
    before = anon()
    session = ort_session(sys.argv[1])
    print(json.dumps({"held": anon() - before, "counted": counted}))
    """
)


@pytest.mark.parametrize("external", [False, True], ids=["weights in the .onnx", "external data"])
@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_an_open_parity_session_holds_what_the_budget_counts(tmp_path, external):
    """GraphMemory.session_weight_bytes, what the default parity budget counts for each ONNX Runtime session, is
    what the session holds once open: a Conv stack's weights twice (the NCHWc layout's reordered copy beside
    them), three times when they are stored in the .onnx file itself."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    # Past ~2 GiB the weights go to a .data file; a lower limit sends these there too.
    script = ("import ldm_rt.export.graph_cleanup as g; g.PROTO_LIMIT_BYTES = 1\n" if external else "") + SCRIPT
    done = subprocess.run([sys.executable, "-c", script, str(tmp_path)], capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    exported = json.loads(done.stdout.strip().splitlines()[-1])
    assert ("vae_decoder.onnx.data" in exported["files"]) == external
    args = [sys.executable, "-c", SESSION_SCRIPT, str(tmp_path / "vae_decoder.onnx")]
    done = subprocess.run(args, capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    got = json.loads(done.stdout.strip().splitlines()[-1])
    assert got["counted"] == pytest.approx((2 if external else 3) * exported["weight_bytes"], rel=0.01)
    # Measured 0.95-1.04 in most runs; once 0.73 (inline weights, the first ONNX Runtime session under a new cache
    # home): the budget's safe side is the upper bound, the lower one only says it does not count a whole copy too many.
    assert 0.7 < got["held"] / got["counted"] < 1.05, got


# ---- loading: the checkpoint's tensors become the parameters (no random init, no second copy) -----------------
LOAD_SCRIPT = textwrap.dedent(
    """
    import json, sys, warnings

    warnings.simplefilter("ignore")
    from ldm_rt.export.memory import process_peak_rss, rss_bytes
    from ldm_rt.reference.checkpoints import load_model

    before = rss_bytes()
    loaded = load_model(sys.argv[1])
    after_load = rss_bytes()
    for p in loaded.model.unet.parameters():  # every weight read once, as the export's trace reads them
        p.sum()
    print(json.dumps({"before": before, "after_load": after_load, "peak": process_peak_rss(), "touched": rss_bytes()}))
    """
)
# Peak of loading beyond the process before it, in UNet weight bytes, once every weight has been read: one copy
# (the file's pages) and the other components' few MB. Building the model with random weights and then copying
# the state dict in held 2 copies at the peak (SD 1.5: 8.97 GB for 4.3 GB of weights).
LOAD_BOUND = 1.3


def _big_model_folder(path: Path) -> tuple[Path, int]:
    """An ldm-rt model folder whose UNet holds ~140 MB of weights (the rest a few MB): copies of it stand out."""
    from tiny_models import TINY_WORDS

    from ldm_rt.reference.configs import AutoencoderConfig, LDMConfig, TextEncoderConfig, UNetConfig
    from ldm_rt.reference.ldm import LatentDiffusion
    from ldm_rt.reference.model_folder import save_model_folder
    from ldm_rt.runtime.schedulers import sd_scheduler_config
    from ldm_rt.runtime.tokenizer import PromptTokenizer

    tokenizer = PromptTokenizer.word_level(list(TINY_WORDS), max_length=16)
    config = LDMConfig(
        unet=UNetConfig(model_channels=192, channel_mult=(1, 2), num_res_blocks=1, attention_resolutions=(2,), num_heads=8, context_dim=32),
        autoencoder=AutoencoderConfig(ch=32, ch_mult=(1, 2), num_res_blocks=1, resolution=64),
        text_encoder=TextEncoderConfig(
            vocab_size=tokenizer.vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
            max_position_embeddings=16, hidden_act="gelu", bos_token_id=tokenizer.bos_id, eos_token_id=tokenizer.eos_id,
            pad_token_id=tokenizer.pad_id,
        ),
        scale_factor=0.18215,
    )
    model = LatentDiffusion(config)
    save_model_folder(path, model, tokenizer, sd_scheduler_config())
    return path, sum(p.numel() * p.element_size() for p in model.unet.parameters())


def test_loading_holds_one_copy_of_the_weights_and_reads_them_only_when_used(tmp_path):
    folder, unet_bytes = _big_model_folder(tmp_path / "model")
    assert unet_bytes > 120e6
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-c", LOAD_SCRIPT, str(folder)], capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    got = json.loads(done.stdout.strip().splitlines()[-1])
    # Nothing is read at load: the parameters are views of the files, paged in as they are used.
    assert (got["after_load"] - got["before"]) / unet_bytes < 0.25, got
    assert (got["touched"] - got["before"]) / unet_bytes > 0.9, got  # ... and then they are resident, once
    extra = (got["peak"] - got["before"]) / unet_bytes
    assert extra < LOAD_BOUND, f"load peak {extra:.2f}x the UNet's weight bytes (bound {LOAD_BOUND}x)"


def _mapped_files(tensors) -> set[str]:
    """The files whose mappings hold these tensors' data (/proc/self/maps); "" for anonymous memory."""
    spans = []
    with open("/proc/self/maps") as f:
        for line in f:
            fields = line.split(maxsplit=5)
            start, end = (int(x, 16) for x in fields[0].split("-"))
            spans.append((start, end, fields[5].strip() if len(fields) == 6 else ""))
    out = set()
    for t in tensors:
        ptr = t.untyped_storage().data_ptr()
        out.add(next((Path(name).name for start, end, name in spans if start <= ptr < end), ""))
    return out


@pytest.mark.parametrize("fixture, files", [
    ("tiny_ldm_rt_model", {"unet.safetensors", "autoencoder.safetensors", "text_encoder.safetensors"}),
    ("tiny_sd_v1", {"diffusion_pytorch_model.safetensors", "model.safetensors"}),
    ("tiny_single_file_v1", {"tiny-v1.safetensors"}),
])  # fmt: skip
def test_every_loaded_weight_is_a_view_of_its_safetensors_file(fixture, files, request):
    """load_strict(assign=True) on a model built with its parameters on meta: each parameter is the file's own
    tensor (no copy into a randomly initialised one), whatever the source layout and key renaming."""
    from ldm_rt.reference.checkpoints import load_model

    path = request.getfixturevalue(fixture)
    kwargs = {"tokenizer": request.getfixturevalue("tiny_sd_v1") / "tokenizer"} if fixture == "tiny_single_file_v1" else {}
    loaded = load_model(path, **kwargs)
    assert _mapped_files(loaded.model.parameters()) == files
    # Buffers no checkpoint holds are made as usual (CLIP's position ids), not left on meta.
    ids = dict(loaded.model.text_encoder.named_buffers())["text_model.embeddings.position_ids"]
    assert ids.flatten().tolist() == list(range(ids.shape[-1]))


def test_a_controlnet_is_loaded_as_views_of_its_file_too(tiny_controlnet_v1):
    """A ControlNet beside the UNet (export --controlnet) is built on meta and assigned, as the model is."""
    from ldm_rt.reference.keymap_controlnet import load_controlnet

    model = load_controlnet(tiny_controlnet_v1)
    assert _mapped_files(model.parameters()) == {"diffusion_pytorch_model.safetensors"}


def test_parameters_on_meta_builds_no_weights_and_restores_the_module_class():
    import torch
    from torch import nn

    from ldm_rt.reference.model_folder import parameters_on_meta

    register = nn.Module.register_parameter
    with parameters_on_meta():
        layer = nn.Linear(4096, 4096)
    assert layer.weight.is_meta and layer.bias.is_meta and layer.weight.requires_grad
    assert nn.Module.register_parameter is register
    assert not nn.Linear(2, 2).weight.is_meta  # outside the block, modules are built as usual
    with pytest.raises(RuntimeError):
        with parameters_on_meta():
            raise RuntimeError("boom")
    assert nn.Module.register_parameter is register
    assert torch.nn.Conv2d(1, 1, 1).weight.device.type == "cpu"


# ---- releasing weight pages while ONNX Runtime runs (export/memory.py release_weight_pages) ------------------
def _status_kib(key: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(key))


def test_released_weight_pages_leave_memory_and_come_back_unchanged(tmp_path):
    """Pages of file-backed weights are given back (RssFile falls by their size) and read again on use with the
    same values; a weight written after loading (a LoRA fused in place: a private copy of its pages) keeps what
    was written."""
    import torch
    from safetensors.torch import load_file, save_file

    from ldm_rt.export.memory import release_weight_pages

    save_file({"w": torch.arange(16 << 20, dtype=torch.float32), "v": torch.ones(1 << 20)}, str(tmp_path / "w.safetensors"))
    state = load_file(str(tmp_path / "w.safetensors"))
    w, v = state["w"], state["v"]
    total = float(w.double().sum())
    v.mul_(3.0)  # written: anonymous copies of those pages from now on
    resident = _status_kib("RssFile:")
    assert release_weight_pages([w, v]) >= w.nbytes
    assert resident - _status_kib("RssFile:") > 0.8 * w.nbytes / 1024
    assert float(w.double().sum()) == total
    assert torch.equal(v, torch.full((1 << 20,), 3.0))
    assert release_weight_pages([torch.zeros(1 << 16)]) == 0  # anonymous memory is left alone


def test_weight_pages_are_given_back_while_the_exporter_runs(tmp_path):
    """ReleaseWhileRunning (around torch.onnx.export) pages the weights out as the block goes, and at its end."""
    import time

    import torch
    from safetensors.torch import load_file, save_file

    from ldm_rt.export.memory import ReleaseWhileRunning

    save_file({"w": torch.ones(16 << 20)}, str(tmp_path / "w.safetensors"))
    w = load_file(str(tmp_path / "w.safetensors"))["w"]
    before = _status_kib("RssFile:")
    with ReleaseWhileRunning([w], interval=0.05):
        assert float(w.sum()) == 16 << 20
        read = _status_kib("RssFile:")
        time.sleep(0.5)
        assert read - _status_kib("RssFile:") > 0.8 * w.nbytes / 1024  # given back while the block still runs
        assert float(w.sum()) == 16 << 20
    assert _status_kib("RssFile:") - before < 0.2 * w.nbytes / 1024
