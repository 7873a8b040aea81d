"""Train the first-stage autoencoder (LDM paper Sec. 3.1): reconstruction + perceptual + PatchGAN + a slight
KL (or VQ commitment) loss; reports reconstruction PSNR on held-out images.

    python -m ldm_rt.training.train_autoencoder --config training/configs/default_autoencoder.json --out RUN
    torchrun --nproc_per_node 2 -m ldm_rt.training.train_autoencoder --config ... --out RUN   # one process per device
    python -m ldm_rt.training.train_autoencoder --out RUN --resume [--set steps=40000]

RUN/ receives checkpoint/ (resumable state), autoencoder/ (the weights train_ldm reads), samples/*.png
(held-out originals over their reconstructions) and metrics.jsonl.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn
from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from ldm_rt.reference.configs import AutoencoderConfig

from . import distributed
from .autoencoder_folder import build_autoencoder, save_autoencoder
from .checkpoint import CheckedCheckpoint, flatten_state, load_checkpoint, restore_state, rng_states, save_checkpoint, set_rng_states, step_seed
from .cli import parse_args, run_main, setup_logging, train_from_args
from .config_loading import MAX_BATCH_SIZE, MAX_SEED, MAX_STEPS, TrainConfigError, check_finite_fields, check_range, to_dict
from .datasets import DataConfig, get_batch, make_dataset, shard_indices
from .discriminator import NLayerDiscriminator
from .images import save_grid
from .losses_autoencoder import AutoencoderLoss, AutoencoderLossConfig
from .optim import check_finite_step, clip_and_step, make_adamw, set_lr, warmup_lr
from .perceptual import VGGPerceptualLoss
from .run_folder import RunClock, TrainResult, append_metrics, ensure_dir, start_run

logger = logging.getLogger(__name__)


def default_model() -> AutoencoderConfig:
    # f = 4 (64x64 -> 16x16x4), ~1 M parameters: the size of the shipped default model.
    return AutoencoderConfig(kind="kl", ch=32, ch_mult=(1, 2, 2), num_res_blocks=1, resolution=64, z_channels=4, embed_dim=4)


@dataclass(frozen=True)
class AutoencoderTrainConfig:
    model: AutoencoderConfig = field(default_factory=default_model)
    data: DataConfig = field(default_factory=DataConfig)
    loss: AutoencoderLossConfig = field(default_factory=AutoencoderLossConfig)
    perceptual_weights: str | None = None  # local VGG16 state dict (torchvision keys); None: perceptual term off
    disc_channels: int = 64  # PatchGAN width (ndf)
    disc_layers: int = 3
    steps: int = 20000
    batch_size: int = 16  # per process
    lr: float = 2e-4
    disc_lr: float | None = None  # None: same as lr
    betas: tuple[float, float] = (0.5, 0.9)  # the LDM first stage's Adam betas (GAN training)
    weight_decay: float = 0.0
    warmup_steps: int = 100
    grad_clip: float = 0.0  # global norm; <= 0 disables (the LDM first stage trains unclipped; its summed loss has large norms)
    seed: int = 0
    device: str = "auto"  # "auto" (CUDA if present), "cpu", "cuda"
    threads: int = 2  # torch intra-op threads per process
    log_every: int = 25
    eval_every: int = 500  # held-out PSNR
    eval_images: int = 64
    sample_every: int = 1000  # PNG grid of held-out reconstructions
    checkpoint_minutes: float = 5.0  # also written at the end

    def __post_init__(self) -> None:
        check_finite_fields(self)
        check_range(self, 1, MAX_STEPS, "steps", "log_every", "eval_every", "eval_images", "sample_every")
        check_range(self, 1, MAX_BATCH_SIZE, "batch_size")
        check_range(self, 1, math.inf, "threads", "disc_channels", "disc_layers")
        check_range(self, 0, MAX_STEPS, "warmup_steps")
        check_range(self, 0, MAX_SEED, "seed")
        if self.lr <= 0 or (self.disc_lr is not None and self.disc_lr <= 0):
            raise TrainConfigError("lr and disc_lr must be > 0")
        if self.weight_decay < 0 or not all(0.0 <= b < 1.0 for b in self.betas):
            raise TrainConfigError(f"weight_decay must be >= 0 and betas in [0, 1); got {self.weight_decay}, {list(self.betas)}")
        if self.checkpoint_minutes <= 0:
            raise TrainConfigError(f"checkpoint_minutes must be > 0, got {self.checkpoint_minutes}")
        if self.data.resolution >> self.disc_layers < 3:  # each layer halves the image; the last two convs take 2 pixels
            raise TrainConfigError(f"disc_layers {self.disc_layers} leaves no patch of a {self.data.resolution}-pixel image: use at most {(self.data.resolution // 3).bit_length() - 1}")
        if self.device not in ("auto", "cpu", "cuda"):
            raise TrainConfigError(f"device must be 'auto', 'cpu' or 'cuda', got {self.device!r}")
        if self.data.resolution % self.model.downsampling_factor:
            raise TrainConfigError(f"data.resolution {self.data.resolution} must divide by the autoencoder's factor {self.model.downsampling_factor}")


class AutoencoderWithLogvar(nn.Module):
    """What the optimizer trains: the autoencoder and, for a KL model, the loss's learned log-variance s,
    in one module so that DDP averages all of their gradients."""

    def __init__(self, ae: nn.Module, logvar_init: float) -> None:
        super().__init__()
        self.ae = ae
        self.logvar = nn.Parameter(torch.full((), logvar_init)) if ae.config.kind == "kl" else None

    def forward(self, x: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """-> (reconstruction, regulariser): KL per sample (B,) or the VQ commitment loss."""
        if self.logvar is not None:
            recon, posterior = self.ae(x, sample_posterior=True, generator=generator)
            return recon, posterior.kl()
        return self.ae(x)


@torch.no_grad()
def reconstruct(ae: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Deterministic reconstruction: the posterior's mode (KL) or the quantised latents (VQ)."""
    if ae.config.kind == "kl":
        return ae.decode(ae.encode(x).mode())
    return ae.decode(ae.encode(x))


def psnr(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-image PSNR in dB of images in [-1, 1], measured on [0, 1] after clamping: (B,)."""
    mse = ((x.clamp(-1, 1) - y.clamp(-1, 1)) / 2).pow(2).flatten(1).mean(dim=1)
    return 10 * torch.log10(1.0 / mse.clamp_min(1e-10))


@torch.no_grad()
def evaluate(ae: nn.Module, heldout, count: int, device: torch.device, batch_size: int) -> float:
    """Mean per-image PSNR over the first `count` held-out images."""
    was_training = ae.training
    ae.eval()
    values = []
    for start in range(0, count, batch_size):
        x = get_batch(heldout, range(start, min(count, start + batch_size))).images.to(device)
        values.append(psnr(reconstruct(ae, x), x))
    ae.train(was_training)
    return float(torch.cat(values).mean())


def train(config: AutoencoderTrainConfig, out_dir: str | Path, resume: bool = False, checkpoint: CheckedCheckpoint | None = None) -> TrainResult:
    """`checkpoint`: with `resume`, the run's checkpoint if already checked (cli.train_from_args); None: checked here."""
    out_dir = Path(out_dir)
    ctx = start_run(config.device, config.threads, out_dir, resume)

    # Data: an unlimited index stream; each step takes the next global batch, each process every world-th item.
    dataset = make_dataset(config.data, "train")
    heldout = make_dataset(config.data, "heldout")
    global_batch = config.batch_size * ctx.world_size

    # Models: identical initial weights on every rank (same seed), then DDP keeps them identical.
    torch.manual_seed(config.seed)
    trainee = AutoencoderWithLogvar(build_autoencoder(config.model), config.loss.logvar_init).to(ctx.device)
    disc = NLayerDiscriminator(config.model.out_ch, config.disc_channels, config.disc_layers).to(ctx.device)
    perceptual = None
    if config.perceptual_weights:
        perceptual = VGGPerceptualLoss.from_file(config.perceptual_weights).to(ctx.device)
    elif ctx.is_main:
        logger.info("perceptual loss off: no perceptual_weights file given (set perceptual_weights to a local VGG16 state dict)")
    loss_fn = AutoencoderLoss(config.loss, config.model.kind, perceptual)
    opt_ae = make_adamw(trainee.parameters(), config.lr, config.betas, config.weight_decay)
    opt_disc = make_adamw(disc.parameters(), config.disc_lr or config.lr, config.betas, config.weight_decay)
    modules = {"model": trainee, "disc": disc}
    optimizers = {"opt_ae": opt_ae, "opt_disc": opt_disc}

    step, position, metrics = 0, 0, {}
    if resume:
        tensors, meta = load_checkpoint(checkpoint or out_dir)
        restore_state(modules, optimizers, tensors, meta, where=str(out_dir))
        step, position, metrics = meta["step"], meta["data_position"], meta.get("metrics", {})
        set_rng_states(meta["rng"])
        if ctx.is_main:
            logger.info("resumed %s at step %d (data position %d)", out_dir, step, position)
    n_params = sum(p.numel() for p in trainee.ae.parameters())
    if ctx.is_main:
        logger.info("autoencoder %.2f M parameters, discriminator %.2f M; %d process(es) x batch %d",
                    n_params / 1e6, sum(p.numel() for p in disc.parameters()) / 1e6, ctx.world_size, config.batch_size)

    model = distributed.wrap(trainee, ctx)
    disc_ddp = distributed.wrap(disc, ctx)
    last_layer = trainee.ae.decoder.conv_out.weight

    def write_checkpoint(metrics: dict[str, float]) -> None:
        tensors, meta = flatten_state(modules, optimizers)
        meta.update(config=to_dict(config), step=step, data_position=position, rng=rng_states(), metrics=metrics)
        save_checkpoint(out_dir, tensors, meta)
        save_autoencoder(out_dir / "autoencoder", trainee.ae, {"step": step, **metrics})
        logger.info("step %d: checkpoint written to %s", step, out_dir)

    clock = RunClock(step, config.checkpoint_minutes)
    with tqdm(total=config.steps, initial=step, disable=not ctx.is_main, desc="autoencoder", dynamic_ncols=True) as bar, logging_redirect_tqdm():
        while step < config.steps:
            # Everything random in this step (posterior noise, dropout) derives from (seed, step, rank).
            torch.manual_seed(step_seed(config.seed, step, ctx.rank))
            generator = torch.Generator(ctx.device).manual_seed(step_seed(config.seed, step, ctx.rank) + 1)
            batch = get_batch(dataset, shard_indices(position, global_batch, ctx.rank, ctx.world_size))
            position += global_batch
            x = batch.images.to(ctx.device)
            set_lr(opt_ae, warmup_lr(step, config.lr, config.warmup_steps))
            set_lr(opt_disc, warmup_lr(step, config.disc_lr or config.lr, config.warmup_steps))

            # 1. Autoencoder step; the discriminator only judges here, its weights get no gradient.
            recon, regulariser = model(x, generator)
            disc.requires_grad_(False)
            loss, logs = loss_fn.generator(x, recon, regulariser, trainee.logvar, step, disc, last_layer)
            disc.requires_grad_(True)
            opt_ae.zero_grad(set_to_none=True)
            loss.backward()
            logs["grad_norm"] = clip_and_step(opt_ae, trainee, config.grad_clip)
            logs["loss"] = loss.item()
            finite = {"loss": logs["loss"], "grad_norm": logs["grad_norm"]}  # NaN or inf here stops the run

            # 2. Discriminator step (hinge loss), once the adversarial terms are on.
            if loss_fn.disc_active(step):
                d_loss, d_logs = loss_fn.discriminator(x, recon, disc_ddp)
                opt_disc.zero_grad(set_to_none=True)
                d_loss.backward()
                finite.update(d_loss=d_logs["d_loss"], d_grad_norm=clip_and_step(opt_disc, disc, config.grad_clip))
                logs.update(d_logs)
            step += 1
            check_finite_step(step, **finite)

            if step % config.log_every == 0 or step == config.steps:
                logs = distributed.mean_over_ranks(logs, ctx)
                logs["it_per_s"] = clock.steps_per_second(step)
                if ctx.is_main:
                    bar.set_postfix(loss=f"{logs['loss']:.4g}", rec=f"{logs['rec']:.4f}", refresh=False)
                    append_metrics(out_dir, {"step": step, **logs})
                    logger.info("step %d loss %.4g rec %.4f %.2f it/s", step, logs["loss"], logs["rec"], logs["it_per_s"])
            if ctx.is_main and heldout is not None and (step % config.eval_every == 0 or step == config.steps):
                metrics = {"heldout_psnr": evaluate(trainee.ae, heldout, config.eval_images, ctx.device, config.batch_size)}
                append_metrics(out_dir, {"step": step, **metrics})
                logger.info("step %d held-out PSNR %.2f dB", step, metrics["heldout_psnr"])
            if ctx.is_main and heldout is not None and (step % config.sample_every == 0 or step == config.steps):
                x_show = get_batch(heldout, range(8)).images.to(ctx.device)
                trainee.ae.eval()
                save_grid(torch.cat([x_show, reconstruct(trainee.ae, x_show)]), ensure_dir(out_dir / "samples") / f"step_{step:07d}.png", nrow=8)
                trainee.ae.train()
            if clock.checkpoint_due(ctx, last_step=step == config.steps):
                if ctx.is_main:
                    write_checkpoint(metrics)
                clock.checkpoint_written()
            bar.update(1)
    distributed.barrier(ctx)
    distributed.shutdown(ctx)
    return TrainResult(step, metrics, modules)


PROG = "ldm-rt-train-autoencoder"  # its console script (pyproject.toml); also `python -m ldm_rt.training.train_autoencoder`


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv, PROG, __doc__)
    setup_logging()
    return run_main(PROG, lambda: train_from_args(train, AutoencoderTrainConfig, args))


if __name__ == "__main__":
    raise SystemExit(main())
