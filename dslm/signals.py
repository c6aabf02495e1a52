"""The stop signals, torch-free, so that dslm-train answers them from its first instruction: while
Python imports torch and DeepSpeed (seconds, longer on a loaded machine) dslm.stop's handlers do
not exist yet, and the default actions would end the process without a word (SIGTERM, status 143)
or with a KeyboardInterrupt traceback (SIGINT)."""

from __future__ import annotations

import os
import signal
import sys

from dslm_local.errors import EXIT_STOPPED

STOP_SIGNALS = (signal.SIGUSR1, signal.SIGUSR2, signal.SIGTERM, signal.SIGINT)
"""What schedulers (SIGUSR1, submitit's SIGUSR2, SIGTERM) and terminals (SIGINT) send to stop a job."""


def stopped_at_startup(signum: int) -> str:
    """The line of a stop during start-up, before anything is written."""
    return (
        f"stopped on {signal.Signals(signum).name} during start-up, before the first step: no checkpoint was "
        f"written and the run stands as it was; run the same command again"
    )


def stop_during_imports() -> None:
    """Until dslm.stop's handlers replace them: a stop signal ends the process at once with
    `dslm-train: error: <stopped_at_startup>` (rank 0's, the others quiet) and EXIT_STOPPED. Nothing
    exists yet to clean up or write: the process is only importing."""

    def stop(signum: int, frame: object) -> None:
        if os.environ.get("RANK", "0") == "0":
            os.write(sys.stderr.fileno(), f"dslm-train: error: {stopped_at_startup(signum)}\n".encode())
        os._exit(EXIT_STOPPED)

    for sig in STOP_SIGNALS:
        signal.signal(sig, stop)


def test_pause(point: str) -> None:
    """Where the environment's DSLM_TEST_PAUSE names `point` ("imports", "start-up", or "step N":
    after step N, before its boundary; "eval": dslm-eval as it starts), the process stops itself (SIGSTOP) until it gets SIGCONT: a
    test signals a run at a known point instead of racing it. Unset outside tests."""
    if os.environ.get("DSLM_TEST_PAUSE") == point:
        os.kill(os.getpid(), signal.SIGSTOP)
