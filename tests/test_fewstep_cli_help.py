"""`ldm-rt sample --help` lists the schedulers the model can use (issue 18): the shipped model's (or --model's)
schedule decides the choices, and the refused names are listed with the reason. Reads JSON only: < 1 s."""

from __future__ import annotations

import pytest

from ldm_rt.runtime.cli import main, schedulers_help


def help_text(capsys, argv) -> str:
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 0
    return " ".join(capsys.readouterr().out.split()).replace("- ", "-")  # argparse wraps lines, also after hyphens


def test_sample_help_offers_the_shipped_models_schedulers_and_says_why_not_the_others(capsys):
    text = help_text(capsys, ["sample", "--help"])
    usable, description = schedulers_help(["sample", "--help"])
    assert "pndm" not in usable and "dpmpp-sde" not in usable and "lcm" in usable and "tcd" in usable
    assert "--scheduler {" + ",".join(usable) + "}" in text
    assert "not dpmpp-sde: dpmpp-sde (DPMSolverSDEScheduler) cannot sample a zero-terminal-SNR schedule" in text
    assert description.startswith(", ".join(usable) + "; not ")


def test_other_commands_and_unreadable_models_keep_every_name(tmp_path):
    from ldm_rt.runtime.schedulers import SCHEDULERS

    assert schedulers_help(["sample", "--prompt", "x"]) is None  # not asking for help: nothing is read
    assert schedulers_help(["info", "--help"]) is None
    assert schedulers_help(["sample", "--help", "--model", str(tmp_path)]) is None  # no artifacts there
    assert len(SCHEDULERS) > len(schedulers_help(["sample", "-h"])[0])
