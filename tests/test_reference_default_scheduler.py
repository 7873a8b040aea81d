"""The torch reference pipeline samples, when asked for no scheduler, with the model folder's own (its
scheduler class, runtime/scheduler_choice.py), as the exported artifacts and `ldm-rt sample` do."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("torch")

from ldm_rt.reference.torch_backend import torch_pipeline  # noqa: E402


def test_torch_pipeline_defaults_to_the_folders_own_scheduler(tiny_sd_v1):
    # tiny_sd_v1 ships PNDMScheduler, as SD 1.x does. Before: torch_pipeline sampled with ddim.
    pipe = torch_pipeline(tiny_sd_v1)
    assert pipe.default_scheduler == "pndm"
    args = dict(prompt="a red car", steps=3, seed=2, height=16, width=16)
    got = pipe.generate(**args)
    assert got.params["scheduler"] == "pndm"
    np.testing.assert_array_equal(got.images, pipe.generate(**args, scheduler="pndm").images)
    assert not np.array_equal(got.images, pipe.generate(**args, scheduler="ddim").images)


def test_torch_pipeline_without_a_scheduler_class_falls_back_to_ddim(tiny_sd_v1):
    from ldm_rt.reference.checkpoints import load_model

    loaded = load_model(tiny_sd_v1)
    loaded.scheduler_config = {k: v for k, v in loaded.scheduler_config.items() if k != "_class_name"}
    assert torch_pipeline(loaded).default_scheduler == "ddim"
