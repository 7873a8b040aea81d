"""The image-to-image rules (--mask, --strength, --mask-blur and what each needs) are stated once, in
runtime/params.py: the Python API words them in its keywords and the CLI in its flags, otherwise the same."""

from __future__ import annotations

import re

import pytest

from ldm_rt.runtime.cli import main
from ldm_rt.runtime.params import IMAGE_INPUT_FLAGS, GenerationError, check_image_inputs

RULES = {  # what is given -> the API's message
    "mask without init_image": ({"mask": True}, "mask needs init_image: inpainting repaints part of an image"),
    "strength without init_image": ({"strength": True}, "strength needs init_image: it is the fraction of the schedule run from that image"),
    "mask_blur without mask": ({"init_image": True, "mask_blur": True}, "mask_blur needs mask: it softens the seam of the inpainted region"),
}
CLI_ARGS = {"init_image": ["--init-image", "in.png"], "strength": ["--strength", "0.5"], "mask": ["--mask", "m.png"], "mask_blur": ["--mask-blur", "0"]}


def _given(**given: bool) -> dict[str, bool]:
    return {name: given.get(name, False) for name in ("init_image", "strength", "mask", "mask_blur")}


@pytest.mark.parametrize("rule", RULES)
def test_the_cli_says_what_the_api_says_in_its_flags(rule, tmp_path, capsys):
    given, api_message = RULES[rule]
    with pytest.raises(GenerationError) as e:
        check_image_inputs(**_given(**given))
    assert str(e.value) == api_message
    argv = ["sample", "--out", str(tmp_path / "out.png")]
    for name in given:
        argv += CLI_ARGS[name]
    assert main(argv) == 2
    in_flags = re.sub(r"\b(init_image|strength|mask_blur|mask)\b", lambda m: IMAGE_INPUT_FLAGS[m.group(1)], api_message)
    assert capsys.readouterr().err.strip() == f"ldm-rt: error: {in_flags}"
    assert list(tmp_path.iterdir()) == []


def test_what_each_input_needs_is_enough():
    check_image_inputs(**_given(init_image=True, strength=True, mask=True, mask_blur=True))
    check_image_inputs(**_given(strength=True), init_latents=True)  # the refiner hand-off runs from latents
    check_image_inputs(**_given())
