"""ldm-rt's own model folder: what the trainers write and `export/` reads.

    <folder>/
      ldm_rt_model.json        {"format": "ldm-rt-model", "format_version": 1, "config": LDMConfig, "info": {...}}
      unet.safetensors         original SD key layout (EMA weights when trained with EMA)
      autoencoder.safetensors  original SD key layout
      text_encoder.safetensors transformers CLIPTextModel keys (absent when the model takes no text)
      tokenizer.json           self-contained (ldm_rt.runtime.tokenizer.PromptTokenizer.save)
      text_encoder_2.safetensors, tokenizer_2.json
                               SDXL's second encoder (CLIPTextModelWithProjection keys) and its tokenizer
      scheduler_config.json    diffusers format

Weights are safetensors only: nothing here unpickles.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from safetensors.torch import load_file, save_file

from ldm_rt.runtime import files
from ldm_rt.runtime.atomic import atomic_directory
from ldm_rt.runtime.contracts import ModelFacts
from ldm_rt.runtime.tokenizer import PromptTokenizer

from .checkpoint_errors import CheckpointError
from .configs import LDMConfig
from .ldm import LatentDiffusion

FORMAT = "ldm-rt-model"
FORMAT_VERSION = 1
MODEL_JSON = "ldm_rt_model.json"
COMPONENT_FILES = {
    "unet": "unet.safetensors",
    "autoencoder": "autoencoder.safetensors",
    "text_encoder": "text_encoder.safetensors",
    "text_encoder_2": "text_encoder_2.safetensors",
}
TOKENIZER_FILES = {"tokenizer": "tokenizer.json", "tokenizer_2": "tokenizer_2.json"}  # per text encoder, in order


@dataclass
class LoadedModel:
    model: LatentDiffusion
    tokenizer: PromptTokenizer | None
    scheduler_config: dict[str, Any]
    info: dict[str, Any] = field(default_factory=dict)
    tokenizer_2: PromptTokenizer | None = None  # SDXL's second tokenizer (pads with its own token, "!")

    def facts(self) -> ModelFacts:
        """What the component contracts need to know about this model (runtime/contracts.py)."""
        config = self.model.config
        shared = dict(
            latent_channels=config.latent_channels,
            latent_factor=config.latent_factor,
            unet_factor=config.unet.downsampling_factor,
            unet_in_channels=config.unet.in_channels,
            unet_out_channels=config.unet.out_channels,
            autoencoder_kind=config.autoencoder.kind,
            scale_factor=float(config.scale_factor),
            time_cond_proj_dim=config.unet.time_cond_proj_dim,
        )
        if config.text_encoder_2 is not None:
            return ModelFacts(**shared, **self._sdxl_text_facts())
        has_text = config.text_encoder is not None
        if config.unet.context_dim is not None and not has_text:
            raise CheckpointError("the UNet cross-attends but the model has no text encoder; the contracts cannot express that")
        if has_text and self.tokenizer is None:
            raise CheckpointError("the model has a text encoder but no tokenizer; load it with its tokenizer")
        return ModelFacts(
            **shared,
            # The tokenizer fixes the sequence length the graphs take.
            context_length=self.tokenizer.max_length if has_text else None,
            context_dim=config.unet.context_dim if has_text else None,
            vocab_size=config.text_encoder.vocab_size if has_text else None,
            num_classes=config.unet.num_classes,
        )

    def _sdxl_text_facts(self) -> dict[str, Any]:
        """The ModelFacts fields of SDXL's conditioning: both encoders (or a refiner's second alone)."""
        config = self.model.config
        te, te2 = config.text_encoder, config.text_encoder_2
        assert te2 is not None
        if self.tokenizer_2 is None:
            raise CheckpointError("the model has text_encoder_2 but no tokenizer_2; load it with its second tokenizer")
        if te is not None and self.tokenizer is None:
            raise CheckpointError("the model has a text encoder but no tokenizer; load it with its tokenizer")
        lengths = {self.tokenizer_2.max_length} | ({self.tokenizer.max_length} if te is not None else set())
        if len(lengths) != 1:
            raise CheckpointError(
                f"tokenizer pads to {self.tokenizer.max_length} tokens but tokenizer_2 to {self.tokenizer_2.max_length}; "
                "SDXL concatenates the two sequences, so both must have one length: pass the tokenizers of this model"
            )
        return dict(
            context_length=lengths.pop(),
            context_dim=config.unet.context_dim,
            vocab_size=(te or te2).vocab_size,
            num_classes=None,
            has_text_encoder=te is not None,
            text_encoder_2_dim=te2.hidden_size,
            pooled_dim=te2.projection_dim,
            time_ids=config.time_ids,
            force_zeros_for_empty_prompt=config.force_zeros_for_empty_prompt,
        )


def is_model_folder(path: str | Path) -> bool:
    return (Path(path) / MODEL_JSON).is_file()


def save_model_folder(
    path: str | Path,
    model: LatentDiffusion,
    tokenizer: PromptTokenizer | None,
    scheduler_config: dict[str, Any],
    info: dict[str, Any] | None = None,
    tokenizer_2: PromptTokenizer | None = None,
) -> None:
    """Write the whole folder atomically: a crash mid-save leaves the previous folder intact."""
    with atomic_directory(path) as tmp:
        meta = {"format": FORMAT, "format_version": FORMAT_VERSION, "config": model.config.to_dict(), "info": info or {}}
        (tmp / MODEL_JSON).write_text(json.dumps(meta, indent=2) + "\n")
        for name, filename in COMPONENT_FILES.items():
            module = getattr(model, name)
            if module is not None:
                state = {k: v.detach().contiguous().cpu() for k, v in module.state_dict().items()}
                save_file(state, str(tmp / filename))
        for name, tok in (("tokenizer", tokenizer), ("tokenizer_2", tokenizer_2)):
            if tok is not None:
                tok.save(tmp / TOKENIZER_FILES[name])
        (tmp / "scheduler_config.json").write_text(json.dumps(scheduler_config, indent=2) + "\n")


def read_json_object(path: Path, fix: str = "the model folder is incomplete or damaged; re-export or re-download it") -> dict[str, Any]:
    """A JSON file that must hold an object: CheckpointError (one line naming the file and `fix`) when it is
    missing, too large, unreadable, not JSON, or holds anything else (a list, a number)."""
    return files.read_json_object(path, error=CheckpointError, fix=fix)


def read_model_json(path: str | Path) -> tuple[LDMConfig, dict[str, Any]]:
    path = Path(path)
    file = path / MODEL_JSON
    if not file.is_file():
        raise CheckpointError(f"{path} is not an ldm-rt model folder: {MODEL_JSON} is missing")
    meta = read_json_object(file, "re-export or re-train the model")
    if meta.get("format") != FORMAT or meta.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(
            f"{file}: format {meta.get('format')!r} v{meta.get('format_version')} is not "
            f"{FORMAT!r} v{FORMAT_VERSION}; upgrade ldm-rt"
        )
    config, info = meta.get("config"), meta.get("info", {})
    if not isinstance(config, dict) or not isinstance(info, dict):
        raise CheckpointError(f"{file}: \"config\" and \"info\" must be JSON objects; re-export or re-train the model")
    try:
        return LDMConfig.from_dict(config), info
    except (ValueError, KeyError, TypeError) as e:  # ConfigError, or a field of the wrong JSON type
        raise CheckpointError(f"{file}: bad config: {e}") from None


def load_model_folder(path: str | Path, dtype: torch.dtype = torch.float32) -> LoadedModel:
    path = Path(path)
    config, info = read_model_json(path)
    model = empty_model(config)
    for name, filename in COMPONENT_FILES.items():
        module = getattr(model, name)
        if module is None:
            continue
        file = path / filename
        if not file.is_file():
            raise CheckpointError(f"{file} is missing; the model folder is incomplete")
        try:
            state = load_file(str(file))
        except Exception as e:  # safetensors raises several types for a corrupt file
            raise CheckpointError(f"{file} is not a readable safetensors file ({e})") from None
        load_strict(module, state, where=str(file), assign=True)
    check_materialised(model, str(path))
    tokenizers: dict[str, PromptTokenizer | None] = {}
    for (name, filename), encoder in zip(TOKENIZER_FILES.items(), (model.text_encoder, model.text_encoder_2)):
        file = path / filename
        tokenizers[name] = PromptTokenizer.from_file(file) if file.is_file() else None
        if encoder is not None and tokenizers[name] is None:
            raise CheckpointError(f"{file} is missing; a text-conditional model needs the tokenizer of each text encoder")
    scheduler_config = read_json_object(path / "scheduler_config.json")
    return LoadedModel(model.to(dtype).eval(), tokenizers["tokenizer"], scheduler_config, info, tokenizers["tokenizer_2"])


@contextlib.contextmanager
def parameters_on_meta() -> Iterator[None]:
    """Modules built inside get every parameter on the meta device: its shape and dtype, no memory and no random
    initialisation (SD 1.5's 1.07 B parameters took 4.3 GB and most of a minute to initialise, only to be
    overwritten). Buffers are made as usual: transformers' CLIP computes `position_ids`, a non-persistent buffer
    no checkpoint holds. `load_strict(..., assign=True)` then makes the checkpoint's tensors the parameters.

    Scoped to the `with` block (what accelerate's init_empty_weights(include_buffers=False) does; we do not
    depend on accelerate): Module.register_parameter, which every `self.weight = Parameter(...)` goes through,
    moves the new parameter to meta."""
    register = nn.Module.register_parameter

    def on_meta(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
        register(module, name, param)
        if param is not None and not param.is_meta:
            module._parameters[name] = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)

    nn.Module.register_parameter = on_meta  # type: ignore[method-assign]
    try:
        yield
    finally:
        nn.Module.register_parameter = register  # type: ignore[method-assign]


def empty_model(config: LDMConfig) -> LatentDiffusion:
    """LatentDiffusion(config) with its parameters on the meta device, for load_strict(..., assign=True)."""
    with parameters_on_meta():
        return LatentDiffusion(config)


def check_materialised(module: nn.Module, where: str) -> None:
    """Every parameter and buffer of `module` holds data: a meta tensor left after loading is a weight the
    loader never assigned."""
    left = [name for name, t in [*module.named_parameters(), *module.named_buffers()] if t.is_meta]
    if left:
        raise CheckpointError(f"{where}: {len(left)} weight(s) were never loaded ({', '.join(left[:8])}); the checkpoint is incomplete")


def load_strict(module: torch.nn.Module, state: dict[str, torch.Tensor], where: str, *, assign: bool = False) -> None:
    """load_state_dict that names missing, unexpected and misshaped keys in one CheckpointError.
    assign=True makes the tensors of `state` the module's parameters instead of copying them in: what a module
    built by `parameters_on_meta` needs, and no second copy of the weights (safetensors' tensors are views of
    the file, read from disk as they are first used)."""
    own = module.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    misshaped = [f"{k} {tuple(state[k].shape)} != {tuple(own[k].shape)}" for k in own if k in state and state[k].shape != own[k].shape]
    if missing or unexpected or misshaped:
        parts = []
        for label, keys in (("missing", missing), ("unexpected", unexpected), ("misshaped", misshaped)):
            if keys:
                parts.append(f"{label} {len(keys)}: {', '.join(keys[:8])}{' ...' if len(keys) > 8 else ''}")
        raise CheckpointError(f"{where} does not fit the model: " + "; ".join(parts))
    module.load_state_dict(state, strict=True, assign=assign)
