"""Loud, one-line errors for checkpoints whose keys or shapes do not match a model.

Shared by every reference component (UNet, autoencoder, text encoder): converters and loaders compare
a state dict with the shapes the model expects and name the offending keys instead of failing deep
inside `load_state_dict` or, worse, loading a wrong layout silently.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from ldm_rt.runtime.files import FileFormatError

# How many offending keys one error message lists before it summarises the rest.
MAX_LISTED_KEYS = 10


class CheckpointError(FileFormatError):
    """A checkpoint cannot be used: a state dict that does not fit the model (missing / unexpected keys or
    wrong shapes, named in the message), or one of its files is missing or malformed."""


def _shape(shape: Sequence[int]) -> str:
    return "[" + ", ".join(str(int(s)) for s in shape) + "]"


def state_dict_mismatches(
    expected: Mapping[str, Sequence[int]], state_dict: Mapping[str, torch.Tensor]
) -> list[str]:
    """Every difference between `expected` (key -> shape) and `state_dict`, one short phrase each."""
    problems = [f"missing {k} {_shape(s)}" for k, s in expected.items() if k not in state_dict]
    problems += [
        f"unexpected {k} {_shape(v.shape)}" for k, v in state_dict.items() if k not in expected
    ]
    problems += [
        f"shape of {k}: checkpoint {_shape(v.shape)}, model {_shape(expected[k])}"
        for k, v in state_dict.items()
        if k in expected and tuple(v.shape) != tuple(expected[k])
    ]
    return problems


def check_state_dict(
    expected: Mapping[str, Sequence[int]],
    state_dict: Mapping[str, torch.Tensor],
    component: str,
    hint: str = "",
) -> None:
    """Raise CheckpointError listing up to MAX_LISTED_KEYS mismatches between `state_dict` and `expected`.

    `component` names what is being loaded (e.g. "UNet"); `hint` is appended to say what to do.
    """
    problems = state_dict_mismatches(expected, state_dict)
    if not problems:
        return
    listed = "; ".join(problems[:MAX_LISTED_KEYS])
    more = f"; ... and {len(problems) - MAX_LISTED_KEYS} more" if len(problems) > MAX_LISTED_KEYS else ""
    fix = hint or "check that the checkpoint and the model config describe the same architecture"
    raise CheckpointError(
        f"{component} state dict does not match the model ({len(problems)} problems): {listed}{more}. {fix}"
    )
