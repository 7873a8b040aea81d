"""Checkpoints survive a kill at any moment, refuse damaged files and non-finite weights; the trainers stop
on a diverged loss and answer OS errors (full or read-only disk, --out a file) with one line."""

from __future__ import annotations

import errno
import json
import os
import resource
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from ldm_rt.training import checkpoint, run_folder
from ldm_rt.training.checkpoint import SUMS_FILE, TrainCheckpointError, has_checkpoint, load_checkpoint, save_checkpoint
from ldm_rt.training.distributed import DistContext
from ldm_rt.training.optim import TrainingDiverged
from ldm_rt.training.train_autoencoder import main, train

from test_training_autoencoder import TINY, tiny

# Every `main` run below: the tiny config of the autoencoder tests, as --set arguments.
TINY_ARGS = [a for k, v in TINY.items() for a in ("--set", f"{k}={json.dumps(v)}")]


def run_main(out, *args):
    return main(["--out", str(out), *TINY_ARGS, *args])


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert err and err[-1].startswith("ldm-rt-train-autoencoder: error: ") and not any("Traceback" in line for line in err), err
    return err[-1]


def metric_steps(out):
    return [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines() if "loss" in line]


# A resumed run to step 4 that is killed (SIGKILL) inside its last checkpoint write: right after the atomic
# swap, or, where no swap exists, between the rename of the old checkpoint away and the new one in.
KILLED_WRITER = textwrap.dedent("""
    import os, signal, sys
    from pathlib import Path
    from ldm_rt.runtime import atomic
    from ldm_rt.training.train_autoencoder import main

    mode, out, args = sys.argv[1], sys.argv[2], sys.argv[3:]
    real_exchange, real_replace = atomic.exchange_paths, os.replace

    def exchange_then_die(a, b):
        assert real_exchange(a, b), "this file system cannot exchange; the test skips this case"
        if Path(b).name == "checkpoint":
            os.kill(os.getpid(), signal.SIGKILL)
        return True

    def die_before_second_rename(src, dst):
        if Path(dst).name == "checkpoint" and str(src).endswith(".tmp"):
            os.kill(os.getpid(), signal.SIGKILL)
        return real_replace(src, dst)

    if mode == "exchange":
        atomic.exchange_paths = exchange_then_die
    else:
        atomic.exchange_paths = lambda a, b: False
        os.replace = die_before_second_rename
    sys.exit(main(["--out", out, "--resume", *args]))
""")


@pytest.mark.parametrize("mode", ["exchange", "two_renames"])
def test_resume_after_a_kill_inside_the_checkpoint_write_continues_from_the_newest_checkpoint(tmp_path, mode, capsys):
    if mode == "exchange":
        a, b = tmp_path / "a", tmp_path / "b"
        a.mkdir(), b.mkdir()
        from ldm_rt.runtime.atomic import exchange_paths

        if not exchange_paths(a, b):
            pytest.skip("no renameat2(RENAME_EXCHANGE) on this file system")
    out = tmp_path / "run"
    assert run_main(out, "--set", "steps=2") == 0
    worker = tmp_path / "worker.py"
    worker.write_text(KILLED_WRITER)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, str(worker), mode, str(out), *TINY_ARGS, "--set", "steps=4"], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == -9, proc.stderr[-2000:]
    if mode == "two_renames":  # the state the issue found: no checkpoint/, both folders beside it
        assert not (out / "checkpoint").exists() and has_checkpoint(out)
    assert load_checkpoint(out)[1]["step"] == 4  # restored (two renames) or already in place (exchange)
    assert run_main(out, "--resume", "--set", "steps=6") == 0
    assert json.loads((out / "checkpoint" / "state.json").read_text())["step"] == 6
    assert metric_steps(out) == [1, 2, 3, 4, 5, 6]  # continued at step 4: nothing trained twice
    assert not [p.name for p in out.iterdir() if p.name.startswith(".checkpoint.")]  # leftovers cleaned


@pytest.fixture(scope="module")
def two_step_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("ckpt") / "run"
    train(tiny(steps=2), out)
    return out


def _copy(run, tmp_path):
    return shutil.copytree(run, tmp_path / "run")


@pytest.mark.parametrize("name", ["state.safetensors", "state.json"])
def test_flipped_bytes_are_refused_with_one_line(two_step_run, tmp_path, capsys, name):
    out = _copy(two_step_run, tmp_path)
    path = out / "checkpoint" / name
    data = bytearray(path.read_bytes())
    # Flips that still parse: two in the tensor data; in the JSON, "step": 2 becomes "step": 3.
    spots = [data.index(b'"step": ') + 8] if name == "state.json" else [len(data) // 2, len(data) // 2 + 7]
    for i in spots:
        data[i] ^= 0x01
    path.write_bytes(bytes(data))
    assert run_main(out, "--resume", "--set", "steps=3") == 2
    err = one_line_error(capsys)
    assert f"{path} does not match its sha256" in err and "start a new run" in err, err


def test_a_damaged_checkpoint_points_at_an_older_complete_one_beside_it(two_step_run, tmp_path):
    out = _copy(two_step_run, tmp_path)
    shutil.copytree(out / "checkpoint", out / ".checkpoint.abc123.tmp")  # e.g. left by a kill after a swap
    (out / "checkpoint" / "state.json").write_text("{}")
    with pytest.raises(TrainCheckpointError, match=r"older complete checkpoint \(step 2\) is at .*\.checkpoint\.abc123\.tmp"):
        load_checkpoint(out)


def test_a_checkpoint_state_that_is_a_list_is_one_line(two_step_run, tmp_path):
    out = _copy(two_step_run, tmp_path)
    (out / "checkpoint" / SUMS_FILE).unlink()  # as written before checkpoints had hashes
    (out / "checkpoint" / "state.json").write_text("[1, 2]")
    with pytest.raises(TrainCheckpointError, match="is not a training checkpoint's state"):
        load_checkpoint(out)


def test_non_finite_weights_are_never_written(two_step_run, tmp_path):
    out = _copy(two_step_run, tmp_path)
    tensors, meta = load_checkpoint(out)
    key = next(k for k in tensors if k.startswith("model/"))
    tensors[key] = tensors[key].clone().fill_(float("nan"))
    with pytest.raises(TrainingDiverged, match=rf"step 2: {key} holds NaN"):
        save_checkpoint(out, tensors, meta)
    assert torch.isfinite(load_file(str(out / "checkpoint" / "state.safetensors"))[key]).all()
    assert not [p for p in out.iterdir() if p.name.startswith(".checkpoint.")]


def test_a_diverging_run_stops_at_the_step_and_keeps_the_last_checkpoint(two_step_run, tmp_path, capsys):
    out = _copy(two_step_run, tmp_path)
    before = (out / "checkpoint" / "state.safetensors").read_bytes()
    assert run_main(out, "--resume", "--set", "steps=8", "--set", "lr=1e30", "--set", "warmup_steps=0") == 2
    err = one_line_error(capsys)
    assert "is nan" in err or "is inf" in err, err
    step = int(err.split("step ")[1].split(":")[0])
    assert 3 <= step <= 8 and "lower lr" in err
    assert (out / "checkpoint" / "state.safetensors").read_bytes() == before
    assert load_checkpoint(out)[1]["step"] == 2


@pytest.mark.parametrize(
    "args, message",
    [
        (["--set", "lr=Infinity"], "lr: inf is not a finite number"),
        (["--set", "lr=NaN"], "lr: nan is not a finite number"),
        (["--set", "batch_size=100000000"], "batch_size must be between 1 and 1024"),
        (["--set", "steps=1000000000000"], "steps must be between 1 and 1000000000"),
        (["--set", "data.resolution=100000"], "data.resolution 100000 is out of range"),
        (["--set", "seed=-1"], "seed must be between 0 and"),
        (["--set", "threads=100000"], "threads 100000 is more than 4x the"),
        (["--set", "disc_layers=4"], "disc_layers 4 leaves no patch of a 32-pixel image: use at most 3"),
        (["--set", "betas=[0.5, 1.5]"], "betas in [0, 1)"),
        (["--set", "data=[1, 2]"], "data must be an object"),
    ],
)
def test_config_out_of_bounds_is_one_line(tmp_path, capsys, args, message):
    assert run_main(tmp_path / "run", *args) == 2
    assert message in one_line_error(capsys)
    assert not (tmp_path / "run" / "checkpoint").exists()


def test_python_api_refuses_a_non_finite_lr():
    with pytest.raises(Exception, match="lr must be a finite number"):
        tiny().__class__(lr=float("inf"))


def test_config_file_holding_a_list_is_one_line(tmp_path, capsys):
    (tmp_path / "config.json").write_text("[]")
    assert main(["--config", str(tmp_path / "config.json"), "--out", str(tmp_path / "run")]) == 2
    assert "holds an array where a JSON object is expected" in one_line_error(capsys)


def test_out_that_is_a_file_is_one_line(tmp_path, capsys):
    (tmp_path / "run").write_text("notes")
    assert run_main(tmp_path / "run", "--set", "steps=1") == 2
    assert "is a file, not a folder" in one_line_error(capsys)
    assert (tmp_path / "run").read_text() == "notes"


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders; the check needs an ordinary user")
def test_read_only_out_is_one_line(tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    out.chmod(0o500)
    try:
        assert run_main(out, "--set", "steps=1") == 2
    finally:
        out.chmod(0o700)
    assert "Permission denied" in one_line_error(capsys)


def test_full_disk_at_the_checkpoint_is_one_line_naming_it(tmp_path, capsys, monkeypatch):
    def full(tensors, filename, metadata=None):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))  # as a write() that found no space

    monkeypatch.setattr(checkpoint, "save_file", full)
    assert run_main(tmp_path / "run", "--set", "steps=1") == 2
    err = one_line_error(capsys)
    assert f"{tmp_path / 'run' / 'checkpoint'}: No space left on device; the disk is full" in err, err
    assert not [p for p in (tmp_path / "run").iterdir() if p.name.startswith(".checkpoint")]


def test_a_file_size_limit_in_the_real_writer_is_one_line(tmp_path):
    """safetensors reports its own I/O errors (not OSError); RLIMIT_FSIZE makes the real one happen."""
    out = tmp_path / "run"
    limit = 256 * 1024

    def limit_file_size():
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    writer = textwrap.dedent(f"""
        import sys, torch
        from ldm_rt.training.checkpoint import save_checkpoint
        from ldm_rt.training.cli import run_main
        meta = {{"step": 1}}
        sys.exit(run_main("trainer", lambda: save_checkpoint({str(out)!r}, {{"w": torch.zeros(1 << 20)}}, meta)))  # 4 MB
    """)
    proc = subprocess.run([sys.executable, "-c", writer], capture_output=True, text=True, timeout=300, preexec_fn=limit_file_size)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert proc.stderr.strip() == f"trainer: error: {out / 'checkpoint'}: File too large; the file is larger than this file system or the process's file size limit (ulimit -f) allows"
    assert not out.exists() or not list(out.iterdir())  # no temp folder left behind


def _in_private_tmpfs(tmp_path, options: str, argv: list[str]) -> subprocess.CompletedProcess:
    """Run `python ARGV...` with a tmpfs (mount OPTIONS) at tmp_path/mnt, in a mount namespace of its own so the
    mount ends with the process. Root only (skipped elsewhere, and where the container forbids mounting)."""
    if os.geteuid() != 0 or shutil.which("unshare") is None:
        pytest.skip("mounting a tmpfs needs root and unshare")
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    script = f'mount -t tmpfs -o {options} tmpfs "{mnt}" || exit 99; exec "$0" "$@"'
    proc = subprocess.run(["unshare", "--mount", "--propagation", "private", "sh", "-c", script, sys.executable, *argv],
                          env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=300)  # fmt: skip
    if proc.returncode == 99:
        pytest.skip(f"cannot mount a tmpfs here: {proc.stderr.strip()}")
    return proc


def test_a_full_tmpfs_is_one_line_naming_the_checkpoint(tmp_path):
    out = tmp_path / "mnt" / "run"
    writer = textwrap.dedent(f"""
        import sys, torch
        from ldm_rt.training.checkpoint import save_checkpoint
        from ldm_rt.training.cli import run_main
        sys.exit(run_main("trainer", lambda: save_checkpoint({str(out)!r}, {{"w": torch.zeros(1 << 20)}}, {{"step": 1}})))  # 4 MB
    """)
    proc = _in_private_tmpfs(tmp_path, "size=256k", ["-c", writer])
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert proc.stderr.strip() == f"trainer: error: {out / 'checkpoint'}: No space left on device; the disk is full: free space or write somewhere else"


def test_a_read_only_file_system_is_refused_before_training(tmp_path):
    out = tmp_path / "mnt" / "run"
    starter = textwrap.dedent(f"""
        import sys
        from pathlib import Path
        from ldm_rt.training.cli import run_main
        from ldm_rt.training.run_folder import start_run
        sys.exit(run_main("trainer", lambda: start_run("cpu", 1, Path({str(out)!r}), resume=False)))  # what every trainer does first
    """)
    proc = _in_private_tmpfs(tmp_path, "ro", ["-c", starter])
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert proc.stderr.strip() == f"trainer: error: {out}: Read-only file system; the file system is read-only: write somewhere else"


@pytest.mark.parametrize("with_config", [False, True])
def test_a_resume_hashes_the_checkpoint_once(two_step_run, tmp_path, monkeypatch, with_config):
    """Without --config the command line reads the config from the checkpoint and the trainer loads it: one check
    (SHA256SUMS read, each hashed file hashed once), passed on; with --config the trainer checks it itself."""
    out = _copy(two_step_run, tmp_path)
    hashed = []
    real_sha256 = checkpoint.sha256_file
    monkeypatch.setattr(checkpoint, "sha256_file", lambda path: (hashed.append(Path(path)), real_sha256(path))[1])
    args = ["--resume", "--set", "steps=3"]
    if with_config:
        (tmp_path / "config.json").write_text(json.dumps(TINY))
        args += ["--config", str(tmp_path / "config.json")]
    assert run_main(out, *args) == 0
    checked = [p.name for p in hashed if p.parent == out / "checkpoint"]  # not the new checkpoint's, written in a temp folder
    assert sorted(checked) == sorted(checkpoint.HASHED), hashed
    assert json.loads((out / "checkpoint" / "state.json").read_text())["step"] == 3


def test_the_run_clock_says_when_a_timed_checkpoint_is_due(monkeypatch):
    """Both trainers' timing (run_folder.RunClock): due at the last step, or once checkpoint_minutes have passed
    since the last checkpoint was written; steps per second between calls."""
    now = [1000.0]
    monkeypatch.setattr(run_folder.time, "monotonic", lambda: now[0])
    ctx = DistContext(rank=0, world_size=1, device=torch.device("cpu"))
    clock = run_folder.RunClock(step=10, checkpoint_minutes=2)
    now[0] += 60
    assert not clock.checkpoint_due(ctx, last_step=False) and clock.checkpoint_due(ctx, last_step=True)
    assert clock.steps_per_second(step=40) == pytest.approx(0.5)  # 30 steps in 60 s, counted from the resumed step
    now[0] += 61
    assert clock.checkpoint_due(ctx, last_step=False)
    clock.checkpoint_written()
    now[0] += 119
    assert not clock.checkpoint_due(ctx, last_step=False)
    assert clock.steps_per_second(step=100) == pytest.approx(60 / 180)
