"""What every dslm command does with a failure that is not a bug: one clear line on stderr, and an
exit status that tells a wrapper (slurm/pretrain.sh, dslm-submit) what to do next:

  0    done
  2    bad input (a config typo, a missing file, nothing to resume with --resume auto): fix it first
  69   another rank stopped answering (train.collective_timeout_s) or the rendezvous failed
       (MASTER_PORT taken): run again, from the last checkpoint; the wrappers requeue
  74   a checkpoint could not be written (disk full, quota): the partial tag is removed and the
       previous checkpoint is intact; running again helps only once space is freed: not requeued
  75   dslm-train stopped on a signal after a checkpoint (dslm.stop): the wrappers requeue
  130  interrupted (Ctrl-C)

Any other status (1, or a signal) is a crash with a traceback.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Callable, NoReturn

from tqdm import tqdm

from dslm.errors import EXIT_BAD_INPUT, DslmError

# Errors about the user's input and files; anything else is a bug and keeps its traceback.
USER_ERRORS = (DslmError, FileNotFoundError, IsADirectoryError, NotADirectoryError, PermissionError)


class ArgumentParser(argparse.ArgumentParser):
    """argparse's parser, with a usage error as one line like every other dslm error:
    `PROG: error: MESSAGE (see PROG --help)`, exit status 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def warn(prog: str, line: str) -> None:
    """One warning line on stderr that does not break a progress bar."""
    tqdm.write(f"{prog}: warning: {line}", file=sys.stderr)


def run_command(prog: str, main: Callable[[], None]) -> None:
    """Run a command's `main`: a DslmError or a file error becomes one line and its exit status
    (see above; DSLM_TRACEBACK=1 keeps the traceback)."""
    try:
        main()
    except USER_ERRORS as e:
        if os.environ.get("DSLM_TRACEBACK"):
            raise
        print(f"{prog}: error: {e}", file=sys.stderr)
        sys.exit(e.exit_status if isinstance(e, DslmError) else EXIT_BAD_INPUT)
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        sys.exit(130)
