"""Train a latent diffusion model (Rombach et al. 2022) on the latents of a frozen autoencoder.

The loss (paper eq. 3):

    L_LDM = E_{E(x), y, eps ~ N(0, I), t} || eps - eps_theta(z_t, t, tau_theta(y)) ||^2          (paper eq. 3)

with t uniform over all T training steps, z_t = sqrt(a_t) z_0 + sqrt(1 - a_t) eps (a = alpha_bar of the
scheduler's training table), or the v target sqrt(a_t) eps - sqrt(1 - a_t) z_0 (Salimans & Ho 2022).
The text encoder tau_theta is trained jointly, or kept frozen when it comes from a model folder; the
condition is dropped to the empty prompt (or a null class) with probability `cond_drop_prob` so the
model also learns the unconditional score for classifier-free guidance (Ho & Salimans 2022).

    python -m ldm_rt.training.train_ldm --config training/configs/default_ldm.json --ae AE_RUN/autoencoder --out RUN
    torchrun --nproc_per_node 2 -m ldm_rt.training.train_ldm ...      # one process per device
    python -m ldm_rt.training.train_ldm --out RUN --resume [--set steps=200000]
    python -m ldm_rt.training.train_ldm --config training/configs/default_ldm_zero_snr.json --set init_from=RUN/model --out RUN2   # fine-tune

RUN/ receives checkpoint/ (resumable state), model/ (EMA weights as an ldm-rt model folder with tokenizer
and scheduler_config.json), samples/*.png (EMA samples of fixed prompts with guidance, through the
reference pipeline's DDIM) and metrics.jsonl.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from ldm_rt.reference.configs import LDMConfig, TextEncoderConfig, UNetConfig
from ldm_rt.reference.attention import SpatialTransformer
from ldm_rt.reference.ldm import LatentDiffusion
from ldm_rt.reference.model_folder import LoadedModel, load_model_folder, save_model_folder
from ldm_rt.reference.torch_backend import torch_pipeline
from ldm_rt.reference.unet import ResBlock, UNetModel
from ldm_rt.runtime.schedulers.config import SchedulerConfigError, sd_scheduler_config
from ldm_rt.runtime.schedulers.registry import scheduler_from_diffusers_config
from ldm_rt.runtime.tokenizer import PromptTokenizer, TokenizerError

from . import distributed
from .autoencoder_folder import load_autoencoder
from .checkpoint import CheckedCheckpoint, flatten_state, load_checkpoint, restore_state, rng_states, save_checkpoint, set_rng_states, step_seed
from .cli import parse_args, run_main, setup_logging, train_from_args
from .config_loading import MAX_BATCH_SIZE, MAX_SEED, MAX_STEPS, TrainConfigError, check_finite_fields, check_range, to_dict
from .data_folder import list_images, read_caption
from .data_shapes import ShapesDataset, vocabulary
from .datasets import DataConfig, get_batch, make_dataset, shard_indices
from .ema import EMA
from .images import save_grid
from .io_errors import naming
from .latent_cache import LatentCache, first_stage_output, latents_from
from .optim import check_finite_step, clip_and_step, make_adamw, set_lr, warmup_lr
from .run_folder import RunClock, TrainResult, append_metrics, ensure_dir, physical_memory, start_run

logger = logging.getLogger(__name__)


def default_unet() -> UNetConfig:
    # ~1.8 M parameters on 16x16x4 latents; transformers at 16x16, 8x8 and 4x4 (ds 1, 2, 4) with 32-wide heads.
    return UNetConfig(
        in_channels=4, out_channels=4, model_channels=32, channel_mult=(1, 2, 2), num_res_blocks=1,
        attention_resolutions=(1, 2, 4), num_heads=-1, num_head_channels=32, context_dim=128,
    )  # fmt: skip


def default_text_encoder() -> TextEncoderConfig:
    # ~0.4 M parameters; vocab_size and the bos/eos/pad ids are taken from the tokenizer at build time.
    return TextEncoderConfig(
        vocab_size=64, hidden_size=128, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=16, hidden_act="gelu", bos_token_id=2, eos_token_id=3, pad_token_id=0, projection_dim=128,
    )  # fmt: skip


def default_scheduler() -> dict[str, Any]:
    # Stable Diffusion v1's training schedule, as a diffusers scheduler_config.json (what the model folder ships).
    return sd_scheduler_config(_class_name="DDIMScheduler")


MAX_SAMPLE_PROMPTS = 64  # one batch through the reference pipeline at every sample_every
MAX_SCALE_SAMPLES = 65536  # latents held at once to estimate the scale factor

DEFAULT_PROMPTS = (
    "a large red circle in the center on a white background",
    "a small blue square on the left on a black background",
    "a large yellow triangle at the top on a gray background",
    "a small green circle on the right on a white background",
    "a large purple square at the bottom on a gray background",
    "a small orange triangle in the center on a black background",
    "a large green triangle on the left on a white background",
    "a small red square at the top on a gray background",
)


@dataclass(frozen=True)
class LDMTrainConfig:
    unet: UNetConfig = field(default_factory=default_unet)
    text_encoder: TextEncoderConfig = field(default_factory=default_text_encoder)
    conditioning: str = "crossattn"  # "crossattn" (text) or "class" (shapes: colour x shape label, unet.num_classes = 19)
    scheduler: dict[str, Any] = field(default_factory=default_scheduler)  # diffusers format; prediction_type: epsilon | v_prediction
    data: DataConfig = field(default_factory=DataConfig)
    ae: str | None = None  # autoencoder folder (train_autoencoder's RUN/autoencoder) or an ldm-rt model folder; --ae sets it
    text_encoder_from: str | None = None  # ldm-rt model folder whose text encoder + tokenizer are used, frozen
    # ldm-rt model folder to fine-tune: its weights (UNet, text encoder, autoencoder), tokenizer and scale factor
    # start the run; unet/text_encoder must describe its architecture. The scheduler (the objective) is this
    # config's, so a model can move to v-prediction or zero terminal SNR (Lin et al. 2024 fine-tuned SD 2.1 so).
    init_from: str | None = None
    scale_factor: float | None = None  # None: 1 / std of the latents of the first `scale_batches` batches
    scale_batches: int = 4
    cond_drop_prob: float = 0.1  # classifier-free guidance: share of samples trained with the empty prompt
    ema_decay: float = 0.999
    steps: int = 100000
    batch_size: int = 32  # per process
    lr: float = 5e-4
    betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = 0.01
    warmup_steps: int = 500
    grad_clip: float = 1.0  # global norm; <= 0 disables
    seed: int = 0
    device: str = "auto"
    threads: int = 2
    log_every: int = 50
    sample_every: int = 2000
    sample_prompts: tuple[str, ...] = DEFAULT_PROMPTS
    sample_steps: int = 25
    sample_guidance: float = 5.0
    checkpoint_minutes: float = 5.0  # checkpoint and model folder; also written at the end
    # Cycle the data over its first N items and encode each once (latent_cache.py); 0: unlimited, encode every step.
    latent_cache: int = 0

    def __post_init__(self) -> None:
        check_finite_fields(self)
        check_range(self, 1, MAX_STEPS, "steps", "log_every", "sample_every")
        check_range(self, 1, MAX_BATCH_SIZE, "batch_size")
        check_range(self, 1, math.inf, "threads", "sample_steps", "scale_batches")
        check_range(self, 0, MAX_STEPS, "warmup_steps")
        check_range(self, 0, MAX_SEED, "seed")
        if self.scale_batches * self.batch_size > MAX_SCALE_SAMPLES:
            raise TrainConfigError(f"scale_batches x batch_size ({self.scale_batches * self.batch_size}) is more than the {MAX_SCALE_SAMPLES} latents the scale estimate keeps at once; lower scale_batches")
        if not 1 <= len(self.sample_prompts) <= MAX_SAMPLE_PROMPTS:
            raise TrainConfigError(f"sample_prompts must hold 1 to {MAX_SAMPLE_PROMPTS} prompts (sampled as one batch), got {len(self.sample_prompts)}")
        if not 0.0 <= self.cond_drop_prob < 1.0:
            raise TrainConfigError(f"cond_drop_prob must be in [0, 1), got {self.cond_drop_prob}")
        if not 0.0 <= self.ema_decay < 1.0:
            raise TrainConfigError(f"ema_decay must be in [0, 1), got {self.ema_decay}")
        if self.lr <= 0 or self.weight_decay < 0 or not all(0.0 <= b < 1.0 for b in self.betas):
            raise TrainConfigError(f"lr must be > 0, weight_decay >= 0 and betas in [0, 1); got {self.lr}, {self.weight_decay}, {list(self.betas)}")
        if self.checkpoint_minutes <= 0:
            raise TrainConfigError(f"checkpoint_minutes must be > 0, got {self.checkpoint_minutes}")
        if self.device not in ("auto", "cpu", "cuda"):
            raise TrainConfigError(f"device must be 'auto', 'cpu' or 'cuda', got {self.device!r}")
        if self.conditioning not in ("crossattn", "class"):
            raise TrainConfigError(f"conditioning must be 'crossattn' or 'class', got {self.conditioning!r}")
        if self.conditioning == "class":
            if self.data.kind != "shapes":
                raise TrainConfigError("conditioning 'class' needs labelled data: set data.kind to 'shapes'")
            if self.unet.num_classes != ShapesDataset.num_classes + 1 or self.unet.context_dim is not None:
                raise TrainConfigError(
                    f"conditioning 'class' needs unet.num_classes = {ShapesDataset.num_classes + 1} (the last is the "
                    "null class for guidance) and unet.context_dim = null"
                )
        elif self.unet.context_dim != self.text_encoder.hidden_size and self.text_encoder_from is None:
            raise TrainConfigError(f"unet.context_dim ({self.unet.context_dim}) must equal text_encoder.hidden_size ({self.text_encoder.hidden_size})")
        if self.latent_cache < 0 or self.latent_cache % self.batch_size:
            raise TrainConfigError(f"latent_cache must be 0 or a multiple of batch_size ({self.batch_size}), got {self.latent_cache}")
        if self.latent_cache and self.data.random_flip:
            raise TrainConfigError("latent_cache keeps one encoding per image, which random_flip would change: disable one of them")
        if self.init_from is not None and (self.ae is not None or self.text_encoder_from is not None or self.scale_factor is not None):
            raise TrainConfigError("init_from brings its own autoencoder, text encoder and scale factor: drop ae / text_encoder_from / scale_factor (or init_from)")
        if self.scale_factor is not None and self.scale_factor <= 0:
            raise TrainConfigError(f"scale_factor must be > 0 or null, got {self.scale_factor}")
        try:
            scheduler_from_diffusers_config(self.scheduler)
        except SchedulerConfigError as e:
            raise TrainConfigError(f"scheduler: {e}") from None


class Denoiser(nn.Module):
    """The trained networks in one module, so DDP averages all their gradients: eps_theta and, when
    trained jointly, tau_theta (paper eq. 3)."""

    def __init__(self, unet: nn.Module, text_encoder: nn.Module | None) -> None:
        super().__init__()
        self.unet = unet
        self.text_encoder = text_encoder

    def forward(self, z_t: torch.Tensor, t: torch.Tensor, context: torch.Tensor | None, ids: torch.Tensor | None, y: torch.Tensor | None) -> torch.Tensor:
        if ids is not None:
            context = self.text_encoder(ids)  # (B, L, D)
        return self.unet(z_t, t, context=context, y=y)


@torch.no_grad()
def zero_init_outputs(unet: UNetModel) -> None:
    """Zero the last layer of every residual branch and of the UNet, as the original openaimodel's
    `zero_module` does: each block starts as the identity and the initial prediction is 0."""
    layers = [unet.out[-1]]
    for module in unet.modules():
        if isinstance(module, ResBlock):
            layers.append(module.out_layers[-1])
        elif isinstance(module, SpatialTransformer):
            layers.append(module.proj_out)
    for layer in layers:
        nn.init.zeros_(layer.weight)
        nn.init.zeros_(layer.bias)


def caption_vocabulary(folder: str) -> list[str]:
    """Every lowercase word and punctuation mark of the .txt captions in an image folder, in order of first use."""
    words: dict[str, None] = {}
    for image in list_images(folder):
        for w in re.findall(r"\w+|[^\w\s]", read_caption(image).lower()):
            words.setdefault(w, None)
    return list(words)


def make_tokenizer(config: LDMTrainConfig) -> PromptTokenizer:
    """Word-level tokenizer over the caption grammar (shapes) or the folder's caption words."""
    words = vocabulary() if config.data.kind == "shapes" else caption_vocabulary(config.data.path)  # type: ignore[arg-type]
    try:
        return PromptTokenizer.word_level(words, max_length=config.text_encoder.max_position_embeddings)
    except TokenizerError as e:
        raise TrainConfigError(f"cannot build the caption tokenizer: {e}") from None


@torch.no_grad()
def estimate_scale_factor(ae: nn.Module, dataset, batches: int, batch_size: int, device: torch.device, seed: int) -> float:
    """1 / std of the first batches' latents, how SD arrived at 0.18215 (paper Sec. 4.3.2, "rescale")."""
    generator = torch.Generator(device).manual_seed(seed)
    z = [
        latents_from(ae, first_stage_output(ae, get_batch(dataset, range(i * batch_size, (i + 1) * batch_size)).images.to(device)), generator)
        for i in range(batches)
    ]
    return float(1.0 / torch.cat(z).float().std())


def ldm_config_for(config: LDMTrainConfig, ae_config, text_config: TextEncoderConfig | None, scale_factor: float) -> LDMConfig:
    """The model's config; the UNet's in/out channels follow the autoencoder's latent channels."""
    unet = dataclasses.replace(config.unet, in_channels=ae_config.embed_dim, out_channels=ae_config.embed_dim)
    return LDMConfig(unet=unet, autoencoder=ae_config, text_encoder=text_config, scale_factor=scale_factor, conditioning=config.conditioning)


def _differences(wanted, found, skip: tuple[str, ...] = ()) -> list[str]:
    return [f"{f.name} {getattr(wanted, f.name)!r} vs {getattr(found, f.name)!r}" for f in dataclasses.fields(wanted) if f.name not in skip and getattr(wanted, f.name) != getattr(found, f.name)]


def load_init(config: LDMTrainConfig):
    """The model folder a fine-tuning run starts from, checked against the config's architecture."""
    init = load_model_folder(config.init_from)
    found = init.model.config
    if found.conditioning != config.conditioning or (found.text_encoder is None) != (config.conditioning != "crossattn"):
        raise TrainConfigError(f"init_from {config.init_from} is conditioned by {found.conditioning!r}, the config by {config.conditioning!r}; make them agree")
    problems = [f"unet.{d}" for d in _differences(config.unet, found.unet, skip=("in_channels", "out_channels"))]
    if found.text_encoder is not None:
        token_fields = ("vocab_size", "bos_token_id", "eos_token_id", "pad_token_id")  # the folder's tokenizer sets them
        problems += [f"text_encoder.{d}" for d in _differences(config.text_encoder, found.text_encoder, skip=token_fields)]
    if problems:
        raise TrainConfigError(f"init_from {config.init_from} does not match the config ({'; '.join(problems)}): set those keys to the folder's values")
    return init


def check_sizes(config: LDMTrainConfig, ldm_config: LDMConfig, world_size: int) -> None:
    """What the config can only be checked against once the first stage is known: the image side must
    divide down through the autoencoder and the UNet, and the latent cache must fit in memory."""
    factor = ldm_config.autoencoder.downsampling_factor * ldm_config.unet.downsampling_factor
    if config.data.resolution % factor:
        raise TrainConfigError(f"data.resolution {config.data.resolution} must be a multiple of {factor} (the autoencoder's downsampling x the UNet's)")
    side = config.data.resolution // ldm_config.autoencoder.downsampling_factor
    channels = ldm_config.autoencoder.embed_dim * (2 if ldm_config.autoencoder.kind == "kl" else 1)  # KL keeps mean and logvar
    cache_bytes = config.latent_cache // world_size * channels * side * side * 4  # float32, this process's share
    if cache_bytes > physical_memory() // 2:
        raise TrainConfigError(f"latent_cache {config.latent_cache} would keep {cache_bytes / 2**30:.1f} GiB of latents per process, more than half of this machine's {physical_memory() / 2**30:.1f} GiB; lower it")


def train(config: LDMTrainConfig, out_dir: str | Path, resume: bool = False, checkpoint: CheckedCheckpoint | None = None) -> TrainResult:
    """`checkpoint`: with `resume`, the run's checkpoint if already checked (cli.train_from_args); None: checked here."""
    out_dir = Path(out_dir)
    ctx = start_run(config.device, config.threads, out_dir, resume)
    dataset = make_dataset(config.data, "train")
    global_batch = config.batch_size * ctx.world_size
    if config.latent_cache % global_batch:
        raise TrainConfigError(f"latent_cache ({config.latent_cache}) must be a multiple of the global batch ({global_batch}) so every pass cuts the same batches")
    text = config.conditioning == "crossattn"

    tensors, meta = load_checkpoint(checkpoint or out_dir) if resume else ({}, {})
    # Conditioning: a frozen text encoder + tokenizer from a model folder, or a new one trained jointly.
    tokenizer, frozen_text = None, None
    init = load_init(config) if config.init_from and not resume else None
    init_info = None if init is None else init.info  # recorded in the model folder (on resume: in the checkpoint)
    if init is not None:
        tokenizer = init.tokenizer
        text_config = init.model.config.text_encoder
    elif text and config.init_from:  # resuming a fine-tuning run: weights and tokenizer come from the checkpoint
        tokenizer, text_config = PromptTokenizer.from_str(meta["tokenizer"], f"{out_dir} checkpoint"), None
    elif text and config.text_encoder_from:
        loaded = load_model_folder(config.text_encoder_from)
        tokenizer, frozen_text = loaded.tokenizer, loaded.model.text_encoder
        if frozen_text is None:
            raise TrainConfigError(f"text_encoder_from {config.text_encoder_from} has no text encoder; point it at a text-conditional model")
        text_config = frozen_text.config
    elif text:
        tokenizer = make_tokenizer(config)
        text_config = dataclasses.replace(
            config.text_encoder, vocab_size=tokenizer.vocab_size, bos_token_id=tokenizer.bos_id,
            eos_token_id=tokenizer.eos_id, pad_token_id=tokenizer.pad_id,
        )  # fmt: skip
    else:
        text_config = None

    # The frozen first stage, and the latent scale factor (estimated once, then kept in the checkpoint).
    step, position, metrics = 0, 0, {}
    if resume:
        ldm_config = LDMConfig.from_dict(meta["ldm_config"])
    elif init is not None:
        ldm_config = init.model.config
        if ctx.is_main:
            logger.info("fine-tuning %s (step %s; latent scale factor %.5f)", config.init_from, init.info.get("step", "?"), ldm_config.scale_factor)
    else:
        if not config.ae:
            raise TrainConfigError("no autoencoder given: pass --ae AE_RUN/autoencoder (or set ae in the config)")
        ae, ae_info = load_autoencoder(config.ae)
        ae = ae.to(ctx.device)
        scale = config.scale_factor or estimate_scale_factor(ae, dataset, config.scale_batches, config.batch_size, ctx.device, config.seed)
        ldm_config = ldm_config_for(config, ae.config, text_config, scale)
        if ctx.is_main:
            logger.info("autoencoder from %s (%s); latent scale factor %.5f%s", config.ae, ae_info, scale, "" if config.scale_factor else " (1/std of the first latents)")

    check_sizes(config, ldm_config, ctx.world_size)

    torch.manual_seed(config.seed)
    model = LatentDiffusion(ldm_config).to(ctx.device)
    if init is not None:
        model.load_state_dict(init.model.state_dict())
    elif not resume:
        zero_init_outputs(model.unet)
        model.autoencoder.load_state_dict(ae.state_dict())
        if frozen_text is not None:
            model.text_encoder.load_state_dict(frozen_text.state_dict())
    model.autoencoder.requires_grad_(False).eval()
    trained_text = model.text_encoder if text and not config.text_encoder_from else None
    if model.text_encoder is not None and trained_text is None:
        model.text_encoder.requires_grad_(False).eval()
    denoiser = Denoiser(model.unet, trained_text)
    ema = EMA(denoiser, config.ema_decay).to(ctx.device)
    opt = make_adamw(denoiser.parameters(), config.lr, config.betas, config.weight_decay)
    modules = {"ldm": model, "ema": ema}
    if resume:
        restore_state(modules, {"opt": opt}, tensors, meta, where=str(out_dir))
        step, position, metrics = meta["step"], meta["data_position"], meta.get("metrics", {})
        init_info = meta.get("init_info")
        set_rng_states(meta["rng"])
        if ctx.is_main:
            logger.info("resumed %s at step %d (data position %d)", out_dir, step, position)
    if ctx.is_main:
        n = {k: sum(p.numel() for p in m.parameters()) / 1e6 for k, m in (("unet", model.unet), ("autoencoder", model.autoencoder), ("text encoder", model.text_encoder)) if m is not None}
        logger.info("parameters (M): %s; text encoder %s; %d process(es) x batch %d", {k: round(v, 3) for k, v in n.items()},
                    "trained jointly" if trained_text is not None else "frozen" if text else "none", ctx.world_size, config.batch_size)

    scheduler = scheduler_from_diffusers_config(config.scheduler)
    alphas_cumprod = torch.tensor(scheduler.alphas_cumprod, dtype=torch.float32, device=ctx.device)  # training table, (T,)
    T = len(alphas_cumprod)
    prediction = scheduler.config.prediction_type
    null_label = ShapesDataset.num_classes  # the last class index stands for "no condition"
    empty_ids = torch.from_numpy(tokenizer([""]).ids).to(ctx.device) if tokenizer is not None else None
    ddp_denoiser = distributed.wrap(denoiser, ctx)

    def ema_model() -> LatentDiffusion:
        averaged = copy.deepcopy(model).eval()
        Denoiser(averaged.unet, averaged.text_encoder if trained_text is not None else None).load_state_dict(ema.state_for(denoiser))
        return averaged

    def write_outputs() -> None:
        tensors, meta = flatten_state(modules, {"opt": opt})
        meta.update(config=to_dict(config), ldm_config=ldm_config.to_dict(), step=step, data_position=position, rng=rng_states(), metrics=metrics, init_info=init_info)
        if config.init_from and tokenizer is not None:  # not rebuilt from the config on resume: kept with the state
            meta["tokenizer"] = tokenizer.to_str()
        save_checkpoint(out_dir, tensors, meta)
        info = {"step": step, "trainer": "ldm_rt.training.train_ldm", "data": to_dict(config.data), "ema_decay": config.ema_decay}
        if config.init_from:
            info["init_from"] = {"path": str(config.init_from), **({"info": init_info} if init_info else {})}
        with naming(out_dir / "model"):
            save_model_folder(out_dir / "model", ema_model(), tokenizer, config.scheduler, info)
        logger.info("step %d: checkpoint and model folder written to %s", step, out_dir)

    def write_samples() -> None:
        pipe = torch_pipeline(LoadedModel(ema_model(), tokenizer, config.scheduler))
        size = {"height": config.data.resolution, "width": config.data.resolution}
        if text:
            out = pipe.generate(list(config.sample_prompts), steps=config.sample_steps, guidance=config.sample_guidance, seed=config.seed, **size)
        else:  # the reference pipeline runs class-conditional models unguided
            out = pipe.generate("", class_labels=list(range(8)), steps=config.sample_steps, seed=config.seed, **size)
        images = torch.from_numpy(out.images).permute(0, 3, 1, 2).float() / 127.5 - 1  # (B, 3, H, W) uint8 -> [-1, 1]
        save_grid(images, ensure_dir(out_dir / "samples") / f"step_{step:07d}.png", nrow=8)

    cache = LatentCache(config.latent_cache)
    clock = RunClock(step, config.checkpoint_minutes)
    with tqdm(total=config.steps, initial=step, disable=not ctx.is_main, desc="ldm", dynamic_ncols=True) as bar, logging_redirect_tqdm():
        while step < config.steps:
            # Everything random in this step (latent sample, t, noise, condition dropout) derives from (seed, step, rank).
            torch.manual_seed(step_seed(config.seed, step, ctx.rank))
            generator = torch.Generator(ctx.device).manual_seed(step_seed(config.seed, step, ctx.rank) + 1)
            batch = cache.batch(dataset, shard_indices(position, global_batch, ctx.rank, ctx.world_size), model.autoencoder, ctx.device)
            position += global_batch
            set_lr(opt, warmup_lr(step, config.lr, config.warmup_steps))
            b = len(batch.captions)

            with torch.no_grad():
                z0 = latents_from(model.autoencoder, batch.first_stage, generator) * ldm_config.scale_factor
            drop = torch.rand(b, generator=generator, device=ctx.device) < config.cond_drop_prob
            ids = y = context = None
            if text:
                ids = torch.from_numpy(tokenizer(batch.captions).ids).to(ctx.device)
                ids = torch.where(drop[:, None], empty_ids, ids)  # dropped: the empty prompt
                if trained_text is None:
                    with torch.no_grad():
                        context = model.text_encoder(ids)
                    ids = None
            else:
                labels = batch.labels.to(ctx.device)
                y = torch.where(drop, torch.full_like(labels, null_label), labels)
            t = torch.randint(0, T, (b,), generator=generator, device=ctx.device)
            noise = torch.randn(z0.shape, generator=generator, device=ctx.device)
            a = alphas_cumprod[t].view(-1, 1, 1, 1)  # (B, 1, 1, 1)
            z_t = a.sqrt() * z0 + (1 - a).sqrt() * noise  # q(z_t | z_0), the forward process at integer t
            target = noise if prediction == "epsilon" else a.sqrt() * noise - (1 - a).sqrt() * z0

            pred = ddp_denoiser(z_t, t, context, ids, y)
            loss = F.mse_loss(pred.float(), target)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            grad_norm = clip_and_step(opt, denoiser, config.grad_clip)
            step += 1
            check_finite_step(step, loss=loss.item(), grad_norm=grad_norm)
            ema.update(denoiser)

            if step % config.log_every == 0 or step == config.steps:
                logs = distributed.mean_over_ranks({"loss": loss.item(), "grad_norm": grad_norm}, ctx)
                logs["it_per_s"] = clock.steps_per_second(step)
                if ctx.is_main:
                    metrics = {"loss": logs["loss"]}
                    bar.set_postfix(loss=f"{logs['loss']:.4f}", refresh=False)
                    append_metrics(out_dir, {"step": step, **logs})
                    logger.info("step %d loss %.4f %.2f it/s", step, logs["loss"], logs["it_per_s"])
            if ctx.is_main and (step % config.sample_every == 0 or step == config.steps):
                write_samples()
            if clock.checkpoint_due(ctx, last_step=step == config.steps):
                if ctx.is_main:
                    write_outputs()
                clock.checkpoint_written()
            bar.update(1)
    distributed.barrier(ctx)
    distributed.shutdown(ctx)
    return TrainResult(step, metrics, modules)


PROG = "ldm-rt-train-ldm"  # its console script (pyproject.toml); also `python -m ldm_rt.training.train_ldm`


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv, PROG, __doc__, extra=lambda p: p.add_argument("--ae", help="the frozen autoencoder: AE_RUN/autoencoder or an ldm-rt model folder"))
    setup_logging()
    return run_main(PROG, lambda: train_from_args(train, LDMTrainConfig, args, [] if args.ae is None else [f"ae={args.ae}"]))


if __name__ == "__main__":
    raise SystemExit(main())
