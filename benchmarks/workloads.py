"""The models the benchmark measures, made locally: nothing is downloaded.

- `sd-shaped`: a Stable-Diffusion-v1-shaped model at reduced width with random weights, written as a
  diffusers-layout folder with diffusers itself (UNet2DConditionModel with SD v1's block types, 2 layers
  per block, 8 heads; AutoencoderKL f=8 with SD's 4 levels; a CLIP text encoder with 77 tokens), a DDIM
  scheduler config and a word-level tokenizer of the benchmark prompts' words (ldm-rt's
  PromptTokenizer.word_level: the tokenizer's cost is nothing next to the networks'). ldm-rt exports it with
  export/build.py; the reference and diffusers load the folder itself; Optimum exports it with its own
  exporter inside its virtual environment.
- `sd2-shaped`: the same at the same widths with SD v2's attention: 64-wide heads (so 1, 2, 4, 4 heads at
  these widths, where SD v1's 8 heads are 8 to 32 wide) and linear projections in and out of each
  transformer. Reducing SD v1's width keeps its head count and shrinks its heads; SD v2's rule keeps the
  head width, as in the full-size models, whose attention is bound by its products, not by the softmax.
- `sdxl-shaped`: SDXL base's architecture at a fifth of its widths (SDXLShape): two text encoders (CLIP-L-like,
  and an OpenCLIP-bigG-like one whose pooled output is projected), the text_time add-embedding, per-level
  transformer depth with no attention at the first level, linear projections, SDXL's VAE scale; a
  StableDiffusionXLPipeline folder, so diffusers and Optimum run their SDXL pipelines on it.
- `default`: the shipped default model (engines/default), measured at batch 1 and 4 when its artifacts exist.

Built folders are cached under benchmarks/work/<name>/ (gitignored), keyed by the config they were made from.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ldm_rt.runtime.schedulers import sd_scheduler_config
from ldm_rt.runtime.tokenizer import PromptTokenizer

from .diffusers_layout import ldm_rt_to_diffusers, write_tokenizer_folder
from .harness import PEERS, SD_PIPELINE, SDXL_PIPELINE
from .machine import version
from .peers import openvino_genai_env
from .peers.peer_env import PeerEnvError
from .single_file import diffusers_to_single_file

ROOT = Path(__file__).resolve().parents[1]
WORK = Path(__file__).resolve().parent / "work"

log = logging.getLogger("benchmarks.workloads")
SD_SIZES = (128, 256)  # the SD-shaped model's two resolutions: cost growth with resolution


@dataclass(frozen=True)
class SDShape:
    """SD v1's architecture with every width divided down to fit 2 CPU cores (SD v1: UNet 320/640/1280/1280,
    cross-attention 768; VAE 128/256/512/512; CLIP ViT-L/14 text encoder 768 wide, 12 layers)."""

    unet_channels: tuple[int, ...] = (64, 128, 256, 256)
    unet_layers_per_block: int = 2
    unet_heads: int = 8  # SD v1 fixes 8 heads at every level
    unet_head_width: int | None = None  # SD v2 instead fixes the head width (64) and uses linear projections
    text_hidden: int = 256  # == the UNet's cross_attention_dim
    text_layers: int = 6
    text_heads: int = 4  # 64-wide heads, as CLIP's
    text_intermediate: int = 1024
    vae_channels: tuple[int, ...] = (32, 64, 128, 128)
    vae_layers_per_block: int = 2
    max_length: int = 77
    seed: int = 0
    text_vocab: int | None = None  # CLIP's embedding rows; None: the word-level tokenizer's vocabulary size
    name: str | None = None  # the workload's name; None: sd-shaped / sd2-shaped

    def to_dict(self) -> dict[str, Any]:
        # Unset optional fields stay out, so the cache keys of folders made before they existed still match.
        return {k: v for k, v in dataclasses.asdict(self).items() if v is not None or k not in ("text_vocab", "name")}

    @property
    def workload_name(self) -> str:
        return self.name or ("sd-shaped" if self.generation == 1 else f"sd{self.generation}-shaped")

    @property
    def generation(self) -> int:
        return 1 if self.unet_head_width is None else 2

    def heads_per_level(self) -> tuple[int, ...]:
        if self.unet_head_width is None:
            return (self.unet_heads,) * len(self.unet_channels)
        return tuple(c // self.unet_head_width for c in self.unet_channels)


SD2_SHAPE = SDShape(unet_head_width=64)
# SD 1.5's real shapes (UNet 860 M, CLIP ViT-L/14 text encoder with its 49408-token embedding, the SD VAE) with
# random weights: the size users run, where stable-diffusion.cpp (which accepts only SD's shapes) can run too.
SD15_SHAPE = SDShape(unet_channels=(320, 640, 1280, 1280), text_hidden=768, text_layers=12, text_heads=12, text_intermediate=3072,
                     vae_channels=(128, 256, 512, 512), text_vocab=49408, name="sd15-shaped")
SD15_SIZE, SD15_STEPS = 256, 4  # 256x256 and 4 steps: the full-size networks fit 2 cores in seconds per image


@dataclass(frozen=True)
class SDXLShape:
    """SDXL base's architecture with every width divided by 5, as `SDShape` divides SD v1's, so a 256x256 image
    takes seconds on 2 CPU cores. SDXL base: UNet 320/640/1280 with no attention at the first level and
    (0, 2, 10) transformer blocks per level, 64-wide heads, linear projections, context 2048 (CLIP ViT-L's 768
    and OpenCLIP ViT-bigG's 1280 penultimate states side by side), a text_time add-embedding of bigG's pooled
    projection (1280) and 6 micro-conditioning ids (256-wide Fourier features each); the SD VAE's shape with
    scale 0.13025."""

    unet_channels: tuple[int, ...] = (64, 128, 256)
    unet_layers_per_block: int = 2
    transformer_depth: tuple[int, ...] = (0, 1, 2)  # per level; 0: no attention there (SDXL: 0, 2, 10)
    unet_head_width: int = 64  # as SDXL's, whatever the width
    text_hidden: int = 128  # the CLIP-L-like encoder (768 in SDXL)
    text_layers: int = 6
    text_2_hidden: int = 256  # the OpenCLIP-bigG-like encoder (1280), with a projection of its pooled output
    text_2_layers: int = 8
    text_2_projection: int = 256  # pooled text_embeds width (1280)
    addition_time_embed_dim: int = 64  # Fourier width per time id (256)
    vae_channels: tuple[int, ...] = (32, 64, 128, 128)
    vae_layers_per_block: int = 2
    max_length: int = 77
    seed: int = 0
    name: str = "sdxl-shaped"

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @property
    def workload_name(self) -> str:
        return self.name

    @property
    def cross_attention_dim(self) -> int:
        return self.text_hidden + self.text_2_hidden  # both encoders' states concatenated per token

    def heads_per_level(self) -> tuple[int, ...]:
        return tuple(c // self.unet_head_width for c in self.unet_channels)


SDXL_SIZES = (256,)  # 32x32 latents; SDXL's own 1024x1024 would be 16x the UNet cost


def scheduler_config() -> dict[str, Any]:
    """SD's training schedule with DDIM, as diffusers writes scheduler_config.json."""
    return sd_scheduler_config(_class_name="DDIMScheduler", _diffusers_version="0.42.1")


# The words of the benchmark prompts (RunSpec's default and the default model's): every peer sees known words.
WORDS = ("a", "photo", "of", "an", "astronaut", "riding", "horse", "on", "the", "moon", "red", "circle", "white", "background")


def make_sd_shaped(folder: Path, shape: SDShape) -> Path:
    """Write the diffusers-layout folder of `shape` (random weights, seeded) and return it."""
    import torch
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(shape.seed)
    unet = UNet2DConditionModel(
        sample_size=32, in_channels=4, out_channels=4, block_out_channels=shape.unet_channels,
        layers_per_block=shape.unet_layers_per_block, cross_attention_dim=shape.text_hidden, norm_num_groups=32,
        # diffusers' `attention_head_dim` is the number of heads (a historical misnomer), one per level for SD v2.
        attention_head_dim=shape.unet_heads if shape.generation == 1 else list(shape.heads_per_level()),
        use_linear_projection=shape.generation == 2,
        down_block_types=("CrossAttnDownBlock2D",) * (len(shape.unet_channels) - 1) + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * (len(shape.unet_channels) - 1),
    )
    unet.save_pretrained(folder / "unet", safe_serialization=True)
    save_vae(folder, shape.vae_channels, shape.vae_layers_per_block, SD_VAE_SCALE)
    tokenizer = PromptTokenizer.word_level(WORDS, shape.max_length)
    write_tokenizer_folder(tokenizer, folder / "tokenizer")
    save_text_encoder(folder / "text_encoder", CLIPTextModel(CLIPTextConfig(
        vocab_size=shape.text_vocab or tokenizer.vocab_size, hidden_size=shape.text_hidden, intermediate_size=shape.text_intermediate,
        num_hidden_layers=shape.text_layers, num_attention_heads=shape.text_heads, max_position_embeddings=shape.max_length,
        hidden_act="quick_gelu", bos_token_id=tokenizer.bos_id, eos_token_id=tokenizer.eos_id, pad_token_id=tokenizer.pad_id,
    )))
    save_scheduler(folder)
    (folder / "model_index.json").write_text(json.dumps({
        "_class_name": "StableDiffusionPipeline", "_diffusers_version": "0.42.1", "feature_extractor": [None, None],
        "requires_safety_checker": False, "safety_checker": [None, None], "scheduler": ["diffusers", "DDIMScheduler"],
        "text_encoder": ["transformers", "CLIPTextModel"], "tokenizer": ["transformers", "PreTrainedTokenizerFast"],
        "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"],
    }, indent=2))
    return folder


SD_VAE_SCALE, SDXL_VAE_SCALE = 0.18215, 0.13025  # the latent scale factors of SD's VAE and SDXL's


def save_vae(folder: Path, channels: tuple[int, ...], layers_per_block: int, scaling_factor: float) -> None:
    """folder/vae: SD's (and SDXL's: the same architecture) AutoencoderKL, f=8 with 4 levels, random weights."""
    from diffusers import AutoencoderKL

    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=channels,
        layers_per_block=layers_per_block, norm_num_groups=32, sample_size=256, scaling_factor=scaling_factor,
        down_block_types=("DownEncoderBlock2D",) * len(channels), up_block_types=("UpDecoderBlock2D",) * len(channels),
    )
    vae.save_pretrained(folder / "vae", safe_serialization=True)


def save_text_encoder(folder: Path, model) -> None:
    """A transformers CLIP text model saved as real SD folders keep it: with the `text_model.` level
    (transformers 5 drops it; both transformers versions read it)."""
    from safetensors.torch import load_file, save_file

    from ldm_rt.reference.checkpoints import hf_text_keys

    model.save_pretrained(folder, safe_serialization=True)
    weights = folder / "model.safetensors"
    save_file(hf_text_keys(load_file(str(weights))), str(weights), metadata={"format": "pt"})


def save_scheduler(folder: Path) -> None:
    (folder / "scheduler").mkdir(exist_ok=True)
    (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps(scheduler_config(), indent=2))


def make_sdxl_shaped(folder: Path, shape: SDXLShape) -> Path:
    """Write the diffusers-layout StableDiffusionXLPipeline folder of `shape` (random weights, seeded): two text
    encoders (CLIPTextModel with quick_gelu; CLIPTextModelWithProjection with gelu, as OpenCLIP), one word-level
    tokenizer for both (pads with <|pad|>, not <|endoftext|>, as SDXL's tokenizer_2 pads with "!"), the text_time
    UNet, the VAE, DDIM; force_zeros_for_empty_prompt true, as SDXL ships."""
    import torch
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(shape.seed)
    attention = [d > 0 for d in shape.transformer_depth]
    unet = UNet2DConditionModel(
        sample_size=32, in_channels=4, out_channels=4, block_out_channels=shape.unet_channels,
        layers_per_block=shape.unet_layers_per_block, norm_num_groups=32, cross_attention_dim=shape.cross_attention_dim,
        attention_head_dim=list(shape.heads_per_level()), use_linear_projection=True,
        # Levels without attention are plain blocks; their depth entry is unused (diffusers wants >= 1).
        transformer_layers_per_block=[max(d, 1) for d in shape.transformer_depth],
        down_block_types=tuple("CrossAttnDownBlock2D" if a else "DownBlock2D" for a in attention),
        up_block_types=tuple("CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attention)),
        addition_embed_type="text_time", addition_time_embed_dim=shape.addition_time_embed_dim,
        projection_class_embeddings_input_dim=shape.text_2_projection + 6 * shape.addition_time_embed_dim,  # 6 time ids
    )  # fmt: skip
    unet.save_pretrained(folder / "unet", safe_serialization=True)
    save_vae(folder, shape.vae_channels, shape.vae_layers_per_block, SDXL_VAE_SCALE)
    tokenizer = PromptTokenizer.word_level(WORDS, shape.max_length)
    ids = dict(vocab_size=tokenizer.vocab_size, max_position_embeddings=shape.max_length, bos_token_id=tokenizer.bos_id,
               eos_token_id=tokenizer.eos_id, pad_token_id=tokenizer.pad_id)
    for name, model in (
        ("text_encoder", CLIPTextModel(CLIPTextConfig(
            hidden_size=shape.text_hidden, intermediate_size=4 * shape.text_hidden, num_hidden_layers=shape.text_layers,
            num_attention_heads=shape.text_hidden // 64, hidden_act="quick_gelu", **ids))),
        ("text_encoder_2", CLIPTextModelWithProjection(CLIPTextConfig(
            hidden_size=shape.text_2_hidden, intermediate_size=4 * shape.text_2_hidden, num_hidden_layers=shape.text_2_layers,
            num_attention_heads=shape.text_2_hidden // 64, hidden_act="gelu", projection_dim=shape.text_2_projection, **ids))),
    ):  # fmt: skip
        write_tokenizer_folder(tokenizer, folder / name.replace("text_encoder", "tokenizer"))
        save_text_encoder(folder / name, model)
    save_scheduler(folder)
    (folder / "model_index.json").write_text(json.dumps({
        "_class_name": "StableDiffusionXLPipeline", "_diffusers_version": "0.42.1", "force_zeros_for_empty_prompt": True,
        "feature_extractor": [None, None], "image_encoder": [None, None], "scheduler": ["diffusers", "DDIMScheduler"],
        "text_encoder": ["transformers", "CLIPTextModel"], "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
        "tokenizer": ["transformers", "PreTrainedTokenizerFast"], "tokenizer_2": ["transformers", "PreTrainedTokenizerFast"],
        "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"],
    }, indent=2))
    return folder


def parameter_counts(folder: Path) -> dict[str, float]:
    """Millions of parameters per component of a diffusers folder (from its safetensors headers)."""
    from safetensors import safe_open

    counts = {}
    for part in ("unet", "vae", "text_encoder", "text_encoder_2"):
        if not (folder / part).is_dir():
            continue  # text_encoder_2: SDXL only
        total = 0
        for file in (folder / part).glob("*.safetensors"):
            with safe_open(str(file), "pt") as f:
                for key in f.keys():
                    n = 1
                    for d in f.get_slice(key).get_shape():
                        n *= d
                    total += n
        counts[part] = total / 1e6
    return counts


def _cached(folder: Path, key: dict[str, Any], make) -> Path:
    """`make(folder)` unless folder/.made.json already records `key` (an interrupted build is redone)."""
    stamp = folder.parent / f".{folder.name}.made.json"
    text = json.dumps(key, sort_keys=True)
    if folder.exists() and stamp.is_file() and stamp.read_text() == text:
        return folder
    if folder.exists():
        shutil.rmtree(folder)
    make(folder)
    stamp.write_text(text)
    return folder


def export_code_sha256() -> str:
    """Hash of the code that makes ldm-rt's artifacts (export/, reference/): a changed exporter rebuilds them."""
    import hashlib

    import ldm_rt.export
    import ldm_rt.reference

    h = hashlib.sha256()
    for package in (ldm_rt.export, ldm_rt.reference):
        for path in sorted(Path(package.__path__[0]).glob("*.py")):
            h.update(path.name.encode() + b"\0" + path.read_bytes())
    return h.hexdigest()


def build_ours(source: Path, out: Path, heights: tuple[int, int, int], batch: tuple[int, int, int], key: dict[str, Any]) -> Path:
    """ldm-rt's fp32 ONNX artifacts of `source` (export/build.py, parity checks included)."""
    from ldm_rt.export.build import BuildOptions, build
    from ldm_rt.runtime.contracts import ShapeProfile

    def make(folder: Path) -> None:
        log.info("exporting %s with ldm-rt -> %s", source, folder)
        build(BuildOptions(model=source, out=folder, profile=ShapeProfile(batch, heights, heights), onnx_only=True, progress=False))

    return _cached(out, {**key, "profile": [list(batch), list(heights)], "export_code": export_code_sha256()}, make)


def build_optimum(python: Path, source: Path, out: Path, key: dict[str, Any], log_file: Path) -> Path:
    """Optimum's ONNX export of the diffusers folder, run by the Optimum venv's python."""

    def make(folder: Path) -> None:
        log.info("exporting %s with Optimum -> %s", source, folder)
        with open(log_file, "a") as f:
            done = subprocess.run([str(python), str(PEERS / "optimum_env.py"), "export", str(source), str(folder)], stdout=f, stderr=subprocess.STDOUT)
        if done.returncode != 0:
            raise RuntimeError(f"Optimum's export of {source} failed; see {log_file}")

    return _cached(out, key, make)


def optimum_export(python: Path | None, reason: str | None, source: Path, root: Path, key: dict[str, Any]) -> tuple[Path | None, str | None]:
    """(Optimum's export of `source`, None) or (None, why there is none): no Optimum venv, or its export failed."""
    if python is None:
        return None, reason
    try:
        return build_optimum(python, source, root / "optimum", key, root / "optimum_export.log"), None
    except RuntimeError as e:
        return None, str(e)


@dataclass(frozen=True)
class Prepared:
    """One model ready for every peer: ldm-rt's artifacts, the source the reference loads, the diffusers
    folder, Optimum's export (or why a peer cannot have one)."""

    name: str
    description: str
    config: dict[str, Any]
    artifacts: Path | None
    reference_source: Path | None
    diffusers_source: Path | None
    optimum_model: Path | None
    diffusers_reason: str | None = None
    optimum_reason: str | None = None
    skip_reason: str | None = None
    openvino_ir: Path | None = None  # optimum-intel's OpenVINO export, for OpenVINO GenAI
    openvino_reason: str | None = None
    single_file: Path | None = None  # the original-layout f16 checkpoint, for stable-diffusion.cpp
    single_file_reason: str | None = None
    pipeline: str = SD_PIPELINE  # diffusers' pipeline class of the folder: the diffusers and Optimum peers run it


def openvino_export(ready: bool, reason: str | None, source: Path, root: Path, key: dict[str, Any]) -> tuple[Path | None, str | None]:
    """(optimum-intel's OpenVINO IR of `source`, None) or (None, why there is none): no OpenVINO GenAI venv
    (`ready` False), or the export failed."""
    if not ready:
        return None, reason
    try:
        return _cached(root / "openvino", key, lambda folder: openvino_genai_env.export(source, folder, root / "openvino_export.log", (" ".join(WORDS),))), None
    except PeerEnvError as e:
        return None, str(e)


SDCPP_SHAPES = "stable-diffusion.cpp loads SD 1.x/2.x/XL shapes only (it refuses reduced widths): the SD 1.5-sized workload (--sd15)"


def sdcpp_checkpoint(ready: bool, reason: str | None, shape: SDShape, source: Path, root: Path, key: dict[str, Any]) -> tuple[Path | None, str | None]:
    """(the f16 single-file checkpoint of `source`, None) or (None, why stable-diffusion.cpp cannot run it)."""
    if shape != SD15_SHAPE:
        return None, SDCPP_SHAPES
    if not ready:
        return None, reason
    folder = _cached(root / "single_file", key, lambda folder: diffusers_to_single_file(source, folder / "model-f16.safetensors", "f16"))
    return folder / "model-f16.safetensors", None


def prepare_sd_shaped(shape: SDShape, sizes: tuple[int, ...], optimum_python: Path | None, optimum_reason: str | None,
                      openvino: tuple[bool, str | None] = (False, "not run"), sdcpp: tuple[bool, str | None] = (False, "not run")) -> Prepared:
    """Make (or reuse) the SD-shaped diffusers folder, ldm-rt's export of it, Optimum's, optimum-intel's (when
    `openvino` is (True, _)) and the single file for stable-diffusion.cpp (when `sdcpp` is (True, _), SD 1.5 only)."""
    name = shape.workload_name
    root = WORK / name
    root.mkdir(parents=True, exist_ok=True)
    key = {"shape": shape.to_dict(), "words": list(WORDS), "diffusers": version("diffusers")}
    source = _cached(root / "diffusers", key, lambda folder: make_sd_shaped(folder, shape))
    # One profile whatever sizes this run measures, so a --quick run reuses the full run's export.
    base = SD_SIZES if shape.name is None else sizes  # the full-size model: only the sizes it is measured at
    heights = (min(*sizes, *base), min(base), max(*sizes, *base))
    artifacts = build_ours(source, root / "artifacts", heights, (1, 1, 1), key)
    optimum, optimum_reason = optimum_export(optimum_python, optimum_reason, source, root, key)
    openvino_ir, openvino_reason = openvino_export(*openvino, source, root, key)
    single, single_reason = sdcpp_checkpoint(*sdcpp, shape, source, root, key)
    params = parameter_counts(source)
    config = {"sd_shaped": True, **shape.to_dict(), "params_millions": {k: round(v, 2) for k, v in params.items()}}
    if shape.generation == 1:
        heads = f"{shape.unet_heads} heads"
    else:
        heads = f"{shape.unet_head_width}-wide heads ({', '.join(map(str, shape.heads_per_level()))} per level), linear projections"
    description = (
        f"{'SD 1.5-sized' if shape == SD15_SHAPE else f'SD-v{shape.generation}-shaped'} model, random weights: UNet {params['unet']:.1f} M parameters (block_out_channels "
        f"{list(shape.unet_channels)}, {shape.unet_layers_per_block} layers per block, {heads}, cross-attention "
        f"{shape.text_hidden}), VAE {params['vae']:.1f} M (f=8, {list(shape.vae_channels)}), CLIP text encoder "
        f"{params['text_encoder']:.1f} M ({shape.text_layers} layers, width {shape.text_hidden}, {shape.max_length} tokens)."
    )
    return Prepared(name, description, config, artifacts, source, source, optimum, optimum_reason=optimum_reason,
                    openvino_ir=openvino_ir, openvino_reason=openvino_reason, single_file=single, single_file_reason=single_reason)


def prepare_sdxl_shaped(shape: SDXLShape, sizes: tuple[int, ...], optimum_python: Path | None, optimum_reason: str | None,
                        openvino: tuple[bool, str | None] = (False, "not run")) -> Prepared:
    """Make (or reuse) the SDXL-shaped diffusers folder, ldm-rt's export of it, Optimum's and optimum-intel's
    (when `openvino` is (True, _)). stable-diffusion.cpp refuses reduced widths (SDCPP_SHAPES)."""
    root = WORK / shape.workload_name
    root.mkdir(parents=True, exist_ok=True)
    key = {"shape": shape.to_dict(), "words": list(WORDS), "diffusers": version("diffusers")}
    source = _cached(root / "diffusers", key, lambda folder: make_sdxl_shaped(folder, shape))
    heights = (min(*sizes, *SDXL_SIZES), min(SDXL_SIZES), max(*sizes, *SDXL_SIZES))  # one profile for --quick and full runs
    artifacts = build_ours(source, root / "artifacts", heights, (1, 1, 1), key)
    optimum, optimum_reason = optimum_export(optimum_python, optimum_reason, source, root, key)
    openvino_ir, openvino_reason = openvino_export(*openvino, source, root, key)
    params = parameter_counts(source)
    config = {"sdxl_shaped": True, **shape.to_dict(), "params_millions": {k: round(v, 2) for k, v in params.items()}}
    description = (
        f"SDXL-shaped model, random weights: UNet {params['unet']:.1f} M parameters (block_out_channels {list(shape.unet_channels)}, "
        f"{shape.unet_layers_per_block} layers per block, transformer depth {list(shape.transformer_depth)} per level, "
        f"{shape.unet_head_width}-wide heads ({', '.join(map(str, shape.heads_per_level()))} per level), linear projections, "
        f"cross-attention {shape.cross_attention_dim}, text_time add-embedding of the pooled text ({shape.text_2_projection}) and "
        f"6 time ids), VAE {params['vae']:.1f} M (f=8, {list(shape.vae_channels)}, scale {SDXL_VAE_SCALE}), two text encoders: "
        f"CLIP-L-like {params['text_encoder']:.1f} M ({shape.text_layers} layers, width {shape.text_hidden}) and "
        f"OpenCLIP-bigG-like {params['text_encoder_2']:.1f} M ({shape.text_2_layers} layers, width {shape.text_2_hidden}, "
        f"projection {shape.text_2_projection}), penultimate states, {shape.max_length} tokens."
    )
    return Prepared(shape.workload_name, description, config, artifacts, source, source, optimum, optimum_reason=optimum_reason,
                    openvino_ir=openvino_ir, openvino_reason=openvino_reason, single_file_reason=SDCPP_SHAPES,
                    pipeline=SDXL_PIPELINE)


def prepare_default(optimum_python: Path | None, optimum_reason: str | None) -> Prepared:
    """The shipped default model: its artifacts and model folder inside ldm_rt.engines (if built yet), and the
    same weights as a diffusers folder (benchmarks/diffusers_layout.py) for diffusers and Optimum."""
    from ldm_rt.runtime.artifacts import default_artifacts_dir, default_model_dir
    from ldm_rt.runtime.manifest import MANIFEST, Manifest

    artifacts, model = default_artifacts_dir(), default_model_dir()
    description = "The shipped default model (engines/default): trained, word-level tokenizer."
    if not (artifacts / MANIFEST).is_file():
        reason = f"engines/default/artifacts does not exist yet ({artifacts}); build it with `python export/build_engines.py --out engines/default/artifacts`, then rerun"
        return Prepared("default", description, {}, None, None, None, None, skip_reason=reason)
    if not model.is_dir():
        return Prepared("default", description, {}, artifacts, None, None, None, "no engines/default/model folder", "no engines/default/model folder")
    root = WORK / "default"
    root.mkdir(parents=True, exist_ok=True)
    key = {"weights": Manifest.read(artifacts).source.get("sha256"), "diffusers": version("diffusers")}
    try:
        source = _cached(root / "diffusers", key, lambda folder: ldm_rt_to_diffusers(model, folder))
    except ValueError as e:
        return Prepared("default", description, {}, artifacts, model, None, None, str(e), str(e))
    optimum, optimum_reason = optimum_export(optimum_python, optimum_reason, source, root, key)
    config, _ = _model_json(model)
    return Prepared("default", description, config, artifacts, model, source, optimum, optimum_reason=optimum_reason)


def _model_json(model: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    from ldm_rt.reference.model_folder import read_model_json

    config, info = read_model_json(model)
    return config.to_dict(), info

