"""The command line shared by the trainers: --config, --out, --resume, --set key=value.

A user error raised while setting up or running (bad config, unreadable data, a checkpoint that does not
fit or is damaged, a run that diverged: the ValueError subclasses in USER_ERRORS; and any OSError, such as a
full disk or a read-only --out) is printed as one line, `PROG: error: ...` (runtime/cli_support.py), and the
process exits with status 2; anything else is a bug and keeps its traceback. Under torchrun every process
exits so.
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from ldm_rt.reference.checkpoint_errors import CheckpointError
from ldm_rt.reference.configs import ConfigError
from ldm_rt.runtime.cli_support import OneLineParser, run, summary

from .checkpoint import CheckedCheckpoint, TrainCheckpointError, check_checkpoint
from .config_loading import TrainConfigError, load_config, read_json
from .data_folder import DataError
from .optim import TrainingDiverged
from .perceptual import PerceptualWeightsError

USER_ERRORS = (TrainConfigError, ConfigError, DataError, TrainCheckpointError, TrainingDiverged, PerceptualWeightsError, CheckpointError)


@dataclass(frozen=True)
class RunArgs:
    config: Path | None
    out: Path
    resume: bool
    overrides: list[str]


def parse_args(argv: list[str] | None, prog: str, doc: str | None, extra: Callable[[argparse.ArgumentParser], None] | None = None):
    """The trainer's arguments; its --help description is the first paragraph of `doc` (its module docstring)."""
    parser = OneLineParser(prog=prog, description=summary(doc))
    parser.add_argument("--config", type=Path, help="JSON config file (keys of the trainer's config dataclass)")
    parser.add_argument("--out", type=Path, required=True, help="run folder: checkpoint, samples, metrics, final model")
    parser.add_argument("--resume", action="store_true", help="continue the run in --out from its checkpoint")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE", help="override a config key, e.g. --set lr=1e-4 --set model.ch=64")
    if extra is not None:
        extra(parser)
    return parser.parse_args(argv)


def config_for_run(cls, args, extra_overrides: list[str] | tuple[str, ...] = (), checkpoint: CheckedCheckpoint | None = None):
    """--config (or, when resuming without one, the checkpoint's config: `checkpoint`, else checked here) plus
    --set overrides."""
    if args.config is not None:
        data = read_json(args.config)
    elif args.resume:
        data = (checkpoint or check_checkpoint(args.out)).meta["config"]
    else:
        data = {}
    return load_config(cls, data, [*args.overrides, *extra_overrides])


def train_from_args(train: Callable[..., object], cls, args, extra_overrides: list[str] | tuple[str, ...] = ()) -> object:
    """`train(config, out, resume=, checkpoint=)` as the command line asks. A resume without --config reads its
    config from the checkpoint, so the checkpoint is checked here, once, and handed to the trainer to load
    (hashing reads all of it); with --config the trainer checks it, after its own checks of --out."""
    checkpoint = check_checkpoint(args.out) if args.resume and args.config is None else None
    config = config_for_run(cls, args, extra_overrides, checkpoint)
    return train(config, args.out, resume=args.resume, checkpoint=checkpoint)


def setup_logging() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")


def quiet_unless_main(is_main: bool) -> None:
    """Only rank 0 reports progress; the other processes log warnings and errors only."""
    if not is_main:
        logging.getLogger("ldm_rt").setLevel(logging.WARNING)


def run_main(prog: str, fn: Callable[[], object]) -> int:
    """Run a trainer's main body; a user error is one line on stderr and exit status 2."""

    def body() -> int:
        fn()  # a trainer's result is for its callers in Python, not an exit status
        return 0

    return run(prog, body, errors=(*USER_ERRORS, OSError), interrupted="interrupted; resume with --resume")
