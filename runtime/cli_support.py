"""One convention for every command line of ldm-rt (`ldm-rt`, `ldm-rt-export`, the trainers, the HTTP example, ...).

    parser = OneLineParser(prog=PROG, description=summary(__doc__))
    def main(argv=None) -> int:
        args = parser.parse_args(argv)
        return run(PROG, lambda: body(args))

- A usage error is one line, `PROG: error: MESSAGE; see --help`, exit status 2 (the usage is one --help away).
- A user error raised by the body (USER_ERRORS: our bad-input errors are ValueError subclasses with a one-line
  message; OSError covers unreadable or unwritable files, worded by atomic.explain_os_error) is one line,
  `PROG: error: MESSAGE`, exit status 2, no traceback. Anything else is a bug and keeps its traceback.
- A reader that goes away (`ldm-rt info --json | head -1`) ends the command quietly, exit status 1.
- Ctrl-C is one line, `PROG: interrupted`, exit status 130 (128 + SIGINT, what a shell reports).
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from typing import Any, NoReturn

from .atomic import explain_os_error

# Everything the library raises for bad input or bad artifacts is a ValueError subclass with a one-line
# message; OSError covers unreadable/unwritable files.
USER_ERRORS: tuple[type[BaseException], ...] = (ValueError, OSError)
INTERRUPTED = 130  # 128 + SIGINT


def summary(doc: str | None) -> str:
    """A module docstring's first paragraph on one line: the --help description (its first line alone is cut
    mid-sentence when the paragraph wraps)."""
    return " ".join((doc or "").strip().split("\n\n")[0].split())


def error_line(prog: str, error: BaseException | str) -> str:
    """`PROG: error: MESSAGE` on one line whatever a library put in the message; an OSError names its path and
    what to do."""
    if isinstance(error, OSError):
        message = explain_os_error(error)
    else:
        message = str(error) or type(error).__name__
    return f"{prog}: error: " + " ".join(message.split())


def fail(prog: str, message: BaseException | str) -> NoReturn:
    print(error_line(prog, message), file=sys.stderr)
    sys.exit(2)


class OneLineParser(argparse.ArgumentParser):
    """argparse that reports a usage error as one line under the command's own name (a subcommand's errors
    too: `ldm-rt: error: ...`, not `ldm-rt sample: error: ...`)."""

    def __init__(self, *args: Any, error_prog: str | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.error_prog = error_prog or self.prog

    def add_subparsers(self, **kwargs: Any):  # type: ignore[override]
        prog = self.error_prog

        def subparser(**sub_kwargs: Any) -> OneLineParser:
            return OneLineParser(error_prog=prog, **sub_kwargs)

        kwargs.setdefault("parser_class", subparser)
        return super().add_subparsers(**kwargs)

    def error(self, message: str) -> NoReturn:  # type: ignore[override]
        fail(self.error_prog, f"{message}; see --help")


def run(prog: str, body: Callable[[], int | None], errors: tuple[type[BaseException], ...] = USER_ERRORS,
        interrupted: str = "interrupted") -> int:
    """Run a command's body and return its exit status (the body's, 0 for None); see the module docstring."""
    try:
        code = body()
        sys.stdout.flush()  # inside the try: a reader that went away is noticed here, not at exit
        return 0 if code is None else code
    except BrokenPipeError:
        # Python's recipe (library docs, signal: "Note on SIGPIPE"): point stdout at devnull so the flush at
        # exit cannot fail again, and exit 1 without a word.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    except errors as e:
        print(error_line(prog, e), file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{prog}: {interrupted}", file=sys.stderr)
        return INTERRUPTED
