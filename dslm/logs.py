"""Who prints where. dslm's own lines (results, progress bars, warnings, one-line errors) go to
stdout and stderr as always; what the libraries print goes to the libraries' stream instead:
DeepSpeed's and torch's log records, Python warnings, prints from inside DeepSpeed (its op build,
zero_to_fp32, its universal converter), torch.onnx's exporter, and whatever C++ code and child
processes write to file descriptors 1 and 2. That stream is

- for dslm-train, the run's `logs/rankR.log` (RunDir.rank_log), one file per rank, appended on every start;
- for dslm-eval, dslm-generate and dslm-export, nowhere: it is printed only when the command
  crashes (a traceback), before the traceback;
- with `--verbose`, the terminal, as the libraries print it (LibraryOutput does nothing).

How: LibraryOutput points file descriptors 1 and 2 at the libraries' stream, and makes sys.stdout
and sys.stderr copies of the terminal's for dslm's lines; sys.__stdout__ and sys.__stderr__ keep
writing to descriptors 1 and 2. The few calls into libraries that print with Python's `print` or
tqdm run inside `libraries()`, which hands them those streams for the call.

A multi-rank run prints an error once (`first_to_report`).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import logging
import os
import shutil
import sys
import tempfile
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import TextIO

import psutil
from tqdm import tqdm

from dslm.files import make_folder
from dslm_local.cli import command_name

VERBOSE_HELP = (
    "print what DeepSpeed, torch and the tools they run print, as they print it (without it: "
    "hidden, and shown only before the traceback of a crash)"
)


def rank() -> int:
    """This process's rank as its launcher set it (RANK); 0 in a command without ranks."""
    return int(os.environ.get("RANK", "0"))


def info(line: str) -> None:
    """One line of dslm's own on stdout, printed by rank 0 alone."""
    if rank() == 0:
        print(line, flush=True)


def warning(line: str, every_rank: bool = False) -> None:
    """One line `COMMAND: warning: LINE` on stderr, printed by rank 0 alone unless `every_rank` (what
    only this rank saw), written so that it does not break a progress bar (tqdm.write)."""
    if every_rank or rank() == 0:
        tqdm.write(f"{command_name()}: warning: {line}", file=sys.stderr)


def library_stream() -> TextIO:
    """The libraries' stream: file descriptor 2 (sys.__stderr__), the log while LibraryOutput is on,
    else stderr, so that a command's results alone stay on stdout."""
    return sys.__stderr__


@contextlib.contextmanager
def libraries() -> Iterator[None]:
    """Run a call into a library that prints (print, tqdm): its lines go to the libraries' stream.
    Afterwards DeepSpeed's logger, which holds the sys.stdout of the moment deepspeed was imported,
    writes there too (route_deepspeed_logger)."""
    with contextlib.redirect_stdout(library_stream()), contextlib.redirect_stderr(library_stream()):
        try:
            yield
        finally:
            route_deepspeed_logger()


def route_deepspeed_logger() -> None:
    """Point the handlers DeepSpeed gives its own logger (it does not propagate) at the libraries' stream."""
    for handler in logging.getLogger("DeepSpeed").handlers:
        if type(handler) is logging.StreamHandler:
            handler.setStream(library_stream())


class LibraryOutput:
    """While a command runs (a context manager): the libraries' output away from the terminal, into
    a temporary file until `keep_in` names the log. With `verbose` it does nothing."""

    def __init__(self, prog: str, verbose: bool = False):
        self.prog, self.active = prog, not verbose
        self.path: Path | None = None

    def __enter__(self) -> LibraryOutput:
        if not self.active:
            return self
        self.saved = (sys.stdout, sys.stderr, warnings.showwarning)
        self.terminal = (os.dup(1), os.dup(2))
        self.spool = tempfile.TemporaryFile()
        point_at(self.spool.fileno(), self.spool.fileno())
        sys.stdout = terminal_copy(sys.stdout, 1, self.terminal[0])
        sys.stderr = terminal_copy(sys.stderr, 2, self.terminal[1])
        warnings.showwarning = show_warning
        self.handler = logging.StreamHandler(library_stream())
        logging.getLogger().addHandler(self.handler)  # records of loggers without a handler, which would print
        route_deepspeed_logger()
        return self

    def keep_in(self, path: Path) -> None:
        """From now on, append the libraries' output to `path`, beginning with what they printed so far."""
        if not self.active:
            return
        make_folder(path.parent)
        with open(path, "ab") as log:
            log.write(f"==== {self.prog} (pid {os.getpid()}) {time.strftime('%Y-%m-%d %H:%M:%S')} ====\n".encode())
            log.flush()
            point_at(log.fileno(), log.fileno())  # descriptors 1 and 2 stay open on the file
            self.spool.seek(0)
            shutil.copyfileobj(self.spool, log)
        self.path = path

    def report(self, line: str) -> None:
        """A rank's error line: into the log, and on stderr unless another rank of the launch printed it."""
        if self.active:
            library_stream().write(line + "\n")
        if first_to_report(line):
            print(line, file=sys.stderr, flush=True)

    def __exit__(self, kind, error, traceback) -> None:
        if not self.active:
            return
        route_deepspeed_logger()  # off the terminal copies closed here, had deepspeed been imported outside libraries()
        for copy, saved in zip((sys.stdout, sys.stderr), self.saved):
            copy.flush()
            if copy is not saved:
                copy.close()
        point_at(*self.terminal)
        for fd in self.terminal:
            os.close(fd)
        sys.stdout, sys.stderr, warnings.showwarning = self.saved
        logging.getLogger().removeHandler(self.handler)
        if error is not None and not isinstance(error, (SystemExit, KeyboardInterrupt)):
            self.show_after_crash()
        self.spool.close()

    def show_after_crash(self) -> None:
        """Before a traceback: what the libraries printed, or the log that holds it."""
        if self.path is not None:
            print(f"{self.prog}: what DeepSpeed and torch printed is in {self.path}", file=sys.stderr, flush=True)
            return
        self.spool.seek(0)
        if printed := self.spool.read().decode(errors="replace"):
            print(f"{self.prog}: what DeepSpeed and torch printed:\n{printed}", file=sys.stderr, end="", flush=True)


def point_at(out_fd: int, err_fd: int) -> None:
    """File descriptors 1 and 2 onto `out_fd` and `err_fd`, after what Python holds for them is written."""
    for stream in (sys.__stdout__, sys.__stderr__):
        stream.flush()
    os.dup2(out_fd, 1)
    os.dup2(err_fd, 2)


def terminal_copy(stream: TextIO, fd: int, terminal_fd: int) -> TextIO:
    """A stream like `stream` on the terminal (`terminal_fd`) when `stream` writes to descriptor `fd`;
    else `stream` itself (pytest's capture, a caller's redirect), which LibraryOutput leaves alone."""
    try:
        if stream.fileno() != fd:
            return stream
    except (AttributeError, ValueError, io.UnsupportedOperation):
        return stream
    copy = open(os.dup(terminal_fd), "w", encoding=stream.encoding, errors=stream.errors)
    copy.reconfigure(line_buffering=stream.line_buffering, write_through=stream.write_through)
    return copy


def show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """warnings.showwarning for LibraryOutput: to the libraries' stream."""
    library_stream().write(warnings.formatwarning(message, category, filename, lineno, line))


def launch_key() -> str | None:
    """What names this launch for all its ranks on this machine, and no other launch: its rendezvous
    (MASTER_ADDR:MASTER_PORT) and, under srun when its tasks are the ranks, SLURM's job, step and
    restart count, else the process that started this one (DeepSpeed's launcher, torchrun), by pid
    and start time. None for a single process."""
    if int(os.environ.get("WORLD_SIZE", "1")) < 2:
        return None
    rendezvous = f"{os.environ.get('MASTER_ADDR')}:{os.environ.get('MASTER_PORT')}"
    if "SLURM_STEP_ID" in os.environ and os.environ.get("SLURM_NTASKS") == os.environ["WORLD_SIZE"]:
        step = " ".join(os.environ.get(k, "") for k in ("SLURM_JOB_ID", "SLURM_STEP_ID", "SLURM_RESTART_COUNT"))
        return f"{rendezvous} slurm {step}"
    parent = psutil.Process(os.getppid())
    return f"{rendezvous} launcher {parent.pid} {parent.create_time()}"


def first_to_report(line: str) -> bool:
    """Whether this process is the first rank of its launch (launch_key) on this machine to report
    `line`: the one that creates an empty marker named by both in the temporary folder. True for a
    single process, and whenever that cannot be known (the line is then printed twice rather than
    never). The markers stay, a few bytes each, for the system's temporary-file cleaning."""
    try:
        if (key := launch_key()) is None:
            return True
        folder = Path(tempfile.gettempdir()) / f"dslm-{os.getuid()}-reported"
        folder.mkdir(exist_ok=True)
    except (OSError, psutil.Error):
        return True
    try:
        os.close(
            os.open(
                folder / hashlib.sha256(f"{key}\n{line}".encode()).hexdigest()[:32],
                os.O_WRONLY | os.O_CREAT | os.O_EXCL,
                0o600,
            )
        )
    except FileExistsError:
        return False
    except OSError:
        return True
    return True
