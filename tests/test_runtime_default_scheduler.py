"""The default scheduler is the model folder's own (issues 16 and 18): the class diffusers saved in
scheduler_config.json maps to a --scheduler name (runtime/scheduler_choice.py), export records it in the manifest,
and `Pipeline.generate` / `ldm-rt sample` without a scheduler use it. Cheap: configs only, no export (the
end-to-end checks ride on the SDXL exports of tests/test_sdxl_export_runtime.py and the SDXL-LCM one)."""

from __future__ import annotations

import json

import pytest

from ldm_rt.runtime.manifest import Manifest
from ldm_rt.runtime.scheduler_choice import FALLBACK, default_scheduler
from ldm_rt.runtime.schedulers import sd_scheduler_config

diffusers = pytest.importorskip("diffusers")


def saved_config(cls_name: str, tmp_path, **changes) -> dict:
    """The scheduler_config.json diffusers writes for `cls_name` over SD's training schedule (+ changes)."""
    cls = getattr(diffusers, cls_name)
    base = {k: v for k, v in sd_scheduler_config().items() if not k.startswith("_")}
    cls.from_config({**base, **changes}).save_config(str(tmp_path / cls_name))
    return json.loads((tmp_path / cls_name / "scheduler_config.json").read_text())


@pytest.mark.parametrize("cls_name,changes,name", [
    ("EulerDiscreteScheduler", {}, "euler"),  # SDXL base and refiner
    ("EulerAncestralDiscreteScheduler", {"timestep_spacing": "trailing"}, "euler-a"),  # SDXL-Turbo, SD-Turbo
    ("LCMScheduler", {}, "lcm"),  # LCM-distilled models (LCM_Dreamshaper, SDXL-LCM)
    ("PNDMScheduler", {}, "pndm"),  # SD 1.x
    ("DDIMScheduler", {}, "ddim"),  # SD 2.x
    ("EulerDiscreteScheduler", {"use_karras_sigmas": True}, "euler-karras"),
    ("DPMSolverSDEScheduler", {"use_karras_sigmas": True}, "dpmpp-sde-karras"),
    ("DPMSolverMultistepScheduler", {}, "dpmpp-2m"),
    ("DPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver++", "use_karras_sigmas": True}, "dpmpp-2m-sde-karras"),
    ("UniPCMultistepScheduler", {}, "unipc"),
    ("TCDScheduler", {}, "tcd"),
    ("HeunDiscreteScheduler", {}, "heun"),
])  # fmt: skip
def test_a_folder_scheduler_class_maps_to_its_name(tmp_path, cls_name, changes, name):
    choice = default_scheduler(saved_config(cls_name, tmp_path, **changes))
    assert (choice.name, choice.source, choice.note) == (name, cls_name, "")
    assert choice.describe() == f"{name} (the model's {cls_name})"


def test_the_tiny_turbo_folder_defaults_to_euler_ancestral(tiny_sdxl_turbo, tiny_sdxl_base):
    for folder, name in ((tiny_sdxl_turbo, "euler-a"), (tiny_sdxl_base, "euler")):
        assert default_scheduler(json.loads((folder / "scheduler" / "scheduler_config.json").read_text())).name == name


def test_what_cannot_be_taken_falls_back_to_ddim_and_says_why(tmp_path):
    unknown = default_scheduler(saved_config("KDPM2DiscreteScheduler", tmp_path))
    assert unknown.name == FALLBACK and "KDPM2DiscreteScheduler is not implemented here" in unknown.note
    zero_snr = saved_config("PNDMScheduler", tmp_path, rescale_betas_zero_snr=True, timestep_spacing="trailing")
    zero_snr["rescale_betas_zero_snr"] = True  # PNDM has no such option in diffusers; a model config may still say so
    refused = default_scheduler(zero_snr)
    assert refused.name == FALLBACK and refused.note.startswith("pndm cannot sample this model")
    assert default_scheduler({"beta_schedule": "scaled_linear"}).note == "the scheduler config names no class"
    order3 = default_scheduler(saved_config("DPMSolverMultistepScheduler", tmp_path, solver_order=3))
    assert order3.name == "dpmpp-2m" and "solver_order 3 sampled as 2" in order3.note


def test_the_shipped_model_keeps_ddim():
    from ldm_rt.runtime.artifacts import default_artifacts_dir
    from ldm_rt.runtime.cli import describe_default_scheduler
    from ldm_rt.runtime.pipeline import Pipeline

    manifest = Manifest.read(default_artifacts_dir())
    assert manifest.default_scheduler in ("", "ddim")  # built before it was recorded; its class is DDIMScheduler
    assert describe_default_scheduler(manifest).startswith("default scheduler: ddim")
    pipe = Pipeline.load()
    assert pipe.default_scheduler == "ddim"
    assert pipe.generate("a red circle", steps=2, seed=0).params["scheduler"] == "ddim"


def test_a_manifest_naming_an_unknown_scheduler_is_refused(tmp_path):
    from ldm_rt.runtime.artifacts import default_artifacts_dir
    from ldm_rt.runtime.manifest import ArtifactError

    data = Manifest.read(default_artifacts_dir()).to_dict()
    data["default_scheduler"] = "warp-drive"
    with pytest.raises(ArtifactError, match="default_scheduler must be one of"):
        Manifest.parse(json.dumps(data).encode(), tmp_path / "manifest.json")
