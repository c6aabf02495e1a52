"""How every dslm command, dslm-complete included, reports a failure that is not a bug: one clear
line on stderr and an exit status (dslm_local.errors lists them all)."""

from __future__ import annotations

import argparse
import os
import sys
from typing import Callable, NoReturn

from dslm_local.errors import EXIT_BAD_INPUT, EXIT_BROKEN_PIPE, EXIT_INTERRUPTED, DslmError

# Errors about the user's input and files; anything else is a bug and keeps its traceback.
USER_ERRORS = (DslmError, FileNotFoundError, FileExistsError, IsADirectoryError, NotADirectoryError, PermissionError)


class ArgumentParser(argparse.ArgumentParser):
    """argparse's parser, with a usage error as one line like every other dslm error:
    `PROG: error: MESSAGE (see PROG --help)`, exit status 2. An option is known by its whole name
    only (allow_abbrev=False: `--resum` is not taken for `--resume`), in the subcommands too."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **{"allow_abbrev": False, **kwargs})

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


COMMAND_ENV = "DSLM_COMMAND"
"""The running command's name, which run_command sets in the environment so that the processes it
starts (loader and build workers, ranks) inherit it: dslm's warning lines start with it."""


def command_name() -> str:
    """The running command's name (run_command's `prog`), "dslm" outside a command."""
    return os.environ.get(COMMAND_ENV, "dslm")


def run_command(prog: str, main: Callable[[], None], report: Callable[[str], None] | None = None) -> None:
    """Run a command's `main`: a DslmError or a file error becomes one line and its exit status
    (DSLM_TRACEBACK=1 keeps the traceback). `report` prints that line (default: on stderr; a rank
    of dslm-train: dslm.logs.LibraryOutput.report, once for all ranks). The command's name is in
    COMMAND_ENV while `main` runs, and what it was before after."""
    previous = os.environ.get(COMMAND_ENV)
    os.environ[COMMAND_ENV] = prog
    try:
        main()
    except USER_ERRORS as e:
        if os.environ.get("DSLM_TRACEBACK"):
            raise
        (report or print_error)(f"{prog}: error: {e}")
        sys.exit(e.exit_status if isinstance(e, DslmError) else EXIT_BAD_INPUT)
    except KeyboardInterrupt:
        (report or print_error)(f"{prog}: interrupted")
        sys.exit(EXIT_INTERRUPTED)
    except BrokenPipeError:  # the reader went away (`| head`): stop as a shell pipeline does, quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # so that exit's flush cannot fail again
        sys.exit(EXIT_BROKEN_PIPE)
    finally:
        if previous is None:
            os.environ.pop(COMMAND_ENV, None)
        else:
            os.environ[COMMAND_ENV] = previous


def print_error(line: str) -> None:
    print(line, file=sys.stderr)


def counted(n: int, noun: str) -> str:
    """`n` with `noun`, plural (an s added) unless n is 1: "1 rank", "2 ranks", "0 ranks"."""
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"
