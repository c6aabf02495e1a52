"""What every dslm command does with bad input: one clear line on stderr, exit status 2."""

from __future__ import annotations

import os
import sys
from typing import Callable

from tqdm import tqdm

from dslm.errors import DslmError

# Errors about the user's input and files; anything else is a bug and keeps its traceback.
USER_ERRORS = (DslmError, FileNotFoundError, IsADirectoryError, NotADirectoryError, PermissionError)


def warn(prog: str, line: str) -> None:
    """One warning line on stderr that does not break a progress bar."""
    tqdm.write(f"{prog}: warning: {line}", file=sys.stderr)


def run_command(prog: str, main: Callable[[], None]) -> None:
    try:
        main()
    except USER_ERRORS as e:
        if os.environ.get("DSLM_TRACEBACK"):
            raise
        print(f"{prog}: error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        sys.exit(130)
