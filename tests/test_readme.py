"""The README's first lines are the two commands a newcomer runs; CI must run the second one verbatim."""

from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def readme_commands() -> list[str]:
    text = (ROOT / "README.md").read_text()
    block = text.split("```bash\n", 1)[1].split("```", 1)[0]
    return [line for line in block.splitlines() if line.strip()]


def test_readme_starts_with_two_commands():
    commands = readme_commands()
    assert len(commands) == 2
    assert "ldm-rt sample --prompt" in commands[0] and "pytest" in commands[1]
    # The first code block comes right after the title: nothing to read before the commands.
    head = (ROOT / "README.md").read_text().split("```bash", 1)[0]
    assert head.strip().startswith("# ldm-rt") and len(head.strip().splitlines()) == 1


def test_ci_runs_the_readme_test_command():
    test_command = readme_commands()[1]
    ci = (ROOT / ".ci" / "run").read_text()
    pip_part = test_command.replace("pip install ", "pip install -q ", 1)
    assert pip_part in ci, f"{pip_part!r} not in .ci/run"


def test_git_holds_no_training_state_only_the_shipped_model():
    """Issue 15: resumable training state (optimizer, EMA, step) stays in the run folder. Every large file git
    tracks is part of the shipped model; training/checkpoints/ is ignored so a run's state is not added."""
    import shutil
    import subprocess

    import pytest

    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("not a git checkout")
    tracked = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True).stdout.decode().split("\0")
    large = [
        name for name in tracked
        if name and (ROOT / name).is_file() and (ROOT / name).stat().st_size > 1 << 20 and not name.startswith("engines/default/")
    ]  # fmt: skip
    assert not large, f"large files outside the shipped model are tracked: {large}"
    ignored = subprocess.run(["git", "check-ignore", "-q", "training/checkpoints/run/state.safetensors"], cwd=ROOT)
    assert ignored.returncode == 0, "training/checkpoints/ must be in .gitignore"
    assert "du -sh .git" in (ROOT / "README.md").read_text(), "the README says how big a clone is"
