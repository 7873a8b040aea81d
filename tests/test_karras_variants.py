"""Every -karras name (registry.karras_pair): `heun-karras`, `lms-karras` and `unipc-karras` beside euler's, DPM++'s and DPM++ SDE's.
The name decides the sigmas, not the folder's config; a folder whose Heun or LMS uses Karras sigmas defaults to the
-karras name; and end to end on the tiny models, heun-karras / lms-karras / unipc-karras match diffusers' HeunDiscreteScheduler /
LMSDiscreteScheduler / UniPCMultistepScheduler with use_karras_sigmas=True, a bar the plain name misses by far."""

from __future__ import annotations

import numpy as np
import pytest
from test_reference_pipeline import MOVED, TOL, max_diff, noise, txt2img_args, v1, v2  # noqa: F401 (fixtures)

from ldm_rt.runtime.cli import main, schedulers_help
from ldm_rt.runtime.sampler_spec import sampler_spec
from ldm_rt.runtime.scheduler_choice import default_scheduler
from ldm_rt.runtime.schedulers import SCHEDULERS, SchedulerConfig, make_scheduler

diffusers = pytest.importorskip("diffusers")

KARRAS_TWINS = sorted(name.removesuffix("-karras") for name in SCHEDULERS if name.endswith("-karras"))
NEW = {"heun": "HeunDiscreteScheduler", "lms": "LMSDiscreteScheduler", "unipc": "UniPCMultistepScheduler"}


def test_every_karras_name_has_its_plain_twin_and_the_name_decides():
    assert KARRAS_TWINS == ["dpmpp-2m", "dpmpp-2m-sde", "dpmpp-sde", "euler", "heun", "lms", "unipc"]
    for plain in KARRAS_TWINS:
        for folder_karras in (False, True):  # the folder's own setting changes neither name
            config = SchedulerConfig(use_karras_sigmas=folder_karras)
            p, k = make_scheduler(plain, config), make_scheduler(f"{plain}-karras", config)
            assert (p.name, p.config.use_karras_sigmas) == (plain, False)
            assert (k.name, k.config.use_karras_sigmas) == (f"{plain}-karras", True)
            assert type(p) is type(k)
    for plain in NEW:  # different sigmas, so different images
        p, k = (make_scheduler(n).set_timesteps(10) for n in (plain, f"{plain}-karras"))
        assert p.sigmas.shape == k.sigmas.shape and not np.allclose(p.sigmas, k.sigmas, rtol=1e-2)


def test_a_folder_whose_heun_or_lms_uses_karras_sigmas_defaults_to_the_karras_name():
    for plain, class_name in NEW.items():
        assert default_scheduler({"_class_name": class_name, "use_karras_sigmas": True}).name == f"{plain}-karras"
        assert default_scheduler({"_class_name": class_name}).name == plain
        assert default_scheduler({"_class_name": class_name, "use_karras_sigmas": False}).name == plain
    # Neither can take a zero-terminal-SNR schedule: DDIM, with the reason naming the -karras name.
    zero_snr = {"_class_name": "HeunDiscreteScheduler", "use_karras_sigmas": True, "rescale_betas_zero_snr": True}
    choice = default_scheduler(zero_snr)
    assert choice.name == "ddim" and choice.note.startswith("heun-karras cannot sample this model (heun-karras (HeunDiscreteScheduler)")


def test_help_and_the_sampler_spec_list_the_new_names(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["sample", "--help", "--model", str(tmp_path)])  # no artifacts there: every name is offered
    text = "".join(capsys.readouterr().out.split())
    assert "heun,heun-karras," in text and "lms,lms-karras," in text
    # The shipped model's zero-SNR schedule: refused, with the reason, like plain heun and lms.
    usable, description = schedulers_help(["sample", "--help"])
    assert not {"heun-karras", "lms-karras"} & set(usable)
    assert "; not heun-karras: heun-karras (HeunDiscreteScheduler) cannot sample a zero-terminal-SNR schedule" in description
    # unipc-karras takes it, as plain unipc does, warning below the steps measured sound for DPM++ 2M Karras (unipc.py)
    assert {"unipc", "unipc-karras"} <= set(usable) and "unipc-karras:" not in description
    zero_snr = SchedulerConfig(rescale_betas_zero_snr=True)
    assert [make_scheduler(n, zero_snr).fewest_sound_steps for n in ("unipc", "unipc-karras")] == [12, 40]
    spec = sampler_spec(SchedulerConfig(), step_counts=(6,), schedulers=tuple(n for p in NEW for n in (p, f"{p}-karras")))
    for plain, class_name in NEW.items():
        p, k = spec["schedulers"][plain], spec["schedulers"][f"{plain}-karras"]
        plain_overrides = {"solver_type": "bh2"} if plain == "unipc" else {}  # UniPC reads DPM's default midpoint as bh2
        assert (p["diffusers_class"], p["config_overrides"]) == (class_name, plain_overrides)
        assert (k["diffusers_class"], k["config_overrides"]) == (class_name, {**plain_overrides, "use_karras_sigmas": True})
        assert k["runs"]["6"]["sigmas"] != p["runs"]["6"]["sigmas"]


@pytest.mark.usefixtures("torch_one_thread")
@pytest.mark.parametrize("variant", ["v1", "v2"])
@pytest.mark.parametrize("plain", sorted(NEW))
def test_karras_names_match_diffusers_with_use_karras_sigmas_end_to_end(variant, plain, request):
    """The torch reference (the runtime's sampling loop) against diffusers' pipeline; the folder's scheduler is
    PNDM (v1) or DDIM (v2), so only the name asks for Karras sigmas."""
    pair = request.getfixturevalue(variant)  # v2: v-prediction
    latents = noise((2, 4, 16, 16))
    ours, theirs = txt2img_args(latents, scheduler=f"{plain}-karras")
    # use_karras_sigmas as a keyword: from_config drops config keys listed in _use_default_values.
    pair.pipe.scheduler = getattr(diffusers, NEW[plain]).from_config(pair.scheduler_config, use_karras_sigmas=True)
    assert pair.pipe.scheduler.config.use_karras_sigmas
    expected = pair.pipe(output_type="np", **theirs).images
    assert max_diff(pair.ours(**ours), expected) < TOL
    # The oracle tells the plain name from the -karras one, by 17-69x the bar (measured: -karras 0.0020 off, the
    # plain name 0.066 heun v1, 0.051 lms v1, 0.095 heun v2, 0.20 lms v2, 0.18 unipc v1 and v2; MOVED = 10 x TOL = 0.030).
    assert max_diff(pair.ours(**{**ours, "scheduler": plain}), expected) > MOVED


def test_a_build_that_recorded_the_plain_name_still_samples_with_karras_sigmas(tmp_path_factory, tiny_sd_v1, tmp_path):
    """Builds made before heun-karras existed recorded "heun" for a Heun folder with Karras sigmas; the plain name
    now samples without them, so the runtime (and the native one: artifacts.cpp) reads such a record as the twin."""
    import json
    import shutil

    from test_runtime_fixtures import exported

    from ldm_rt.runtime.manifest import FileEntry, Manifest
    from ldm_rt.runtime.pipeline import Pipeline
    from ldm_rt.runtime.scheduler_choice import karras_variant

    root = tmp_path / "artifacts"
    shutil.copytree(exported(tmp_path_factory, tiny_sd_v1, fp16=False), root)
    config = json.loads((root / "scheduler_config.json").read_text())
    (root / "scheduler_config.json").write_text(json.dumps({**config, "_class_name": "HeunDiscreteScheduler", "use_karras_sigmas": True}))
    manifest = Manifest.read(root)
    manifest.scheduler = FileEntry.of(root, "scheduler_config.json")
    manifest.default_scheduler = "heun"  # what such a build recorded
    manifest.write(root)
    assert Pipeline.load(root).default_scheduler == "heun-karras"
    assert karras_variant("heun", False) == "heun" and karras_variant("ddim", True) == "ddim"
