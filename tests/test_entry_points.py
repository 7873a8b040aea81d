"""Every command line of ldm-rt follows one convention (runtime/cli_support.py): a usage error is exactly one
stderr line `PROG: error: ...` with exit status 2, --help is complete (a whole-sentence description, help text
for every option), and the console scripts declared in pyproject.toml are installed and run."""

from __future__ import annotations

import argparse
import importlib
import importlib.metadata
import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from ldm_rt.runtime import cli_support
from ldm_rt.runtime.cli_support import INTERRUPTED, OneLineParser, run

ROOT = Path(__file__).resolve().parents[1]


def _module(name: str):
    return importlib.import_module(name)


def _file(path: str):
    spec = importlib.util.spec_from_file_location(f"entry_{Path(path).stem}", ROOT / path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# name -> (how to load its module, the error prefix, arguments that reach the unknown option)
ENTRY_POINTS = {
    "ldm-rt": (lambda: _module("ldm_rt.runtime.cli"), "ldm-rt", ["info"]),
    "ldm-rt-export": (lambda: _module("ldm_rt.export.build_engines"), "build_engines.py", []),
    "ldm-rt-train-autoencoder": (lambda: _module("ldm_rt.training.train_autoencoder"), "ldm-rt-train-autoencoder", ["--out", "RUN"]),
    "ldm-rt-train-ldm": (lambda: _module("ldm_rt.training.train_ldm"), "ldm-rt-train-ldm", ["--out", "RUN"]),
    "ldm-rt-quality": (lambda: _module("ldm_rt.training.quality"), "ldm-rt-quality", ["--model", "M"]),
    "sampler_spec": (lambda: _module("ldm_rt.runtime.sampler_spec"), "sampler_spec", []),
    "examples/http_service/app.py": (lambda: _file("examples/http_service/app.py"), "ldm-rt-http", []),
    "benchmarks/run.py": (lambda: _file("benchmarks/run.py"), "benchmarks/run.py", []),
}
CONSOLE_SCRIPTS = ("ldm-rt", "ldm-rt-export", "ldm-rt-train-autoencoder", "ldm-rt-train-ldm", "ldm-rt-quality")


@pytest.fixture
def parsers(monkeypatch):
    """The parsers an entry point builds, recorded as it parses."""
    seen: list[argparse.ArgumentParser] = []
    real = argparse.ArgumentParser.parse_known_args

    def recording(self, *args, **kwargs):
        seen.append(self)
        return real(self, *args, **kwargs)

    monkeypatch.setattr(argparse.ArgumentParser, "parse_known_args", recording)
    return seen


def _incomplete_help(parser: argparse.ArgumentParser, where: str) -> list[str]:
    problems = []
    description = parser.description or ""
    if not description.endswith(".") or "\n" in description:
        problems.append(f"{where}: description is not whole sentences on one line: {description!r}")
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for choice in action._choices_actions:
                if not choice.help:
                    problems.append(f"{where} {choice.dest}: no help")
            for name, sub in action.choices.items():
                problems += _incomplete_help(sub, f"{where} {name}")
        elif not action.help or action.help == argparse.SUPPRESS:
            problems.append(f"{where} {'/'.join(action.option_strings) or action.dest}: no help")
    return problems


@pytest.mark.parametrize("name", list(ENTRY_POINTS))
def test_help_is_complete(name, parsers, capsys):
    load, _, _ = ENTRY_POINTS[name]
    with pytest.raises(SystemExit) as e:
        load().main(["--help"])
    assert e.value.code == 0
    assert capsys.readouterr().out.startswith("usage: ")
    parser = parsers[0]
    assert isinstance(parser, OneLineParser), type(parser)
    assert _incomplete_help(parser, name) == []


@pytest.mark.parametrize("name", list(ENTRY_POINTS))
def test_bad_option_is_one_line_exit_2(name, capsys):
    load, prog, args = ENTRY_POINTS[name]
    with pytest.raises(SystemExit) as e:
        load().main([*args, "--no-such-option"])
    assert e.value.code == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    lines = captured.err.splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"{prog}: error: ") and "--no-such-option" in lines[0], captured.err


def test_console_scripts_are_installed_and_run():
    """Every script of pyproject.toml's [project.scripts] is installed and names the main tested above; two are run
    (each start imports torch or onnxruntime: seconds apiece on 2 cores)."""
    declared = {ep.name: ep.value for ep in importlib.metadata.entry_points(group="console_scripts") if ep.name.startswith("ldm-rt")}
    modules = {"ldm-rt": "ldm_rt.runtime.cli", "ldm-rt-export": "ldm_rt.export.build_engines",
               "ldm-rt-train-autoencoder": "ldm_rt.training.train_autoencoder", "ldm-rt-train-ldm": "ldm_rt.training.train_ldm",
               "ldm-rt-quality": "ldm_rt.training.quality"}  # fmt: skip
    assert declared == {script: f"{module}:main" for script, module in modules.items()}
    bin_dirs = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
    for script in CONSOLE_SCRIPTS:
        assert shutil.which(script, path=bin_dirs) is not None, f"{script} is not installed: pip install -e ."
    for script, args in (("ldm-rt", ["info"]), ("ldm-rt-export", [])):  # ldm-rt-export names the command typed
        proc = subprocess.run([shutil.which(script, path=bin_dirs), *args, "--no-such-option"], capture_output=True, text=True, timeout=120)
        assert proc.returncode == 2 and proc.stdout == ""
        assert proc.stderr == f"{script}: error: unrecognized arguments: --no-such-option; see --help\n"


def test_export_script_keeps_the_designs_command_line():
    proc = subprocess.run([sys.executable, str(ROOT / "export" / "build_engines.py"), "--no-such-option"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr == "build_engines.py: error: unrecognized arguments: --no-such-option; see --help\n"


# ---- run(): what every command does with errors, Ctrl-C and a closed stdout ----------------------------------
def test_run_returns_the_body_status():
    assert run("x", lambda: None) == 0
    assert run("x", lambda: 1) == 1


def test_user_errors_are_one_line_exit_2(capsys, tmp_path):
    def bad_input():
        raise ValueError("--steps must be at least 1,\n  got 0")

    assert run("prog", bad_input) == 2
    assert capsys.readouterr().err == "prog: error: --steps must be at least 1, got 0\n"

    def unreadable():
        open(tmp_path / "missing.json")

    assert run("prog", unreadable) == 2
    assert capsys.readouterr().err.startswith(f"prog: error: {tmp_path / 'missing.json'}: No such file or directory; ")


def test_other_errors_keep_their_traceback():
    def bug():
        raise KeyError("a bug")

    with pytest.raises(KeyError):
        run("prog", bug)
    with pytest.raises(ValueError):  # a command may narrow what counts as the user's error (the trainers do)
        run("prog", lambda: int("x"), errors=(OSError,))


def test_interrupt_is_one_line_exit_130(capsys):
    def interrupted():
        raise KeyboardInterrupt

    assert run("prog", interrupted, interrupted="interrupted; resume with --resume") == INTERRUPTED == 130
    assert capsys.readouterr().err == "prog: interrupted; resume with --resume\n"


def test_subcommand_errors_carry_the_command_name(capsys):
    parser = OneLineParser(prog="tool", description="A tool.")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("go", help="go", description="Go.").add_argument("--n", type=int, help="how many")
    with pytest.raises(SystemExit) as e:
        parser.parse_args(["go", "--n", "many"])
    assert e.value.code == 2
    assert capsys.readouterr().err == "tool: error: argument --n: invalid int value: 'many'; see --help\n"


def test_summary_is_the_first_paragraph_on_one_line():
    doc = """Train a model on the latents of a frozen
    autoencoder, with guidance.

    Details."""
    assert cli_support.summary(doc) == "Train a model on the latents of a frozen autoencoder, with guidance."
