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
