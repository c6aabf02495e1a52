"""Every exit status of every dslm command, and the exception for failures that are not bugs. A
command reports a DslmError as one line on stderr and exits with its `exit_status`, so that a
wrapper (slurm/pretrain.sh, dslm-submit) can tell what to do next. The statuses live here, in
dslm-complete's torch-free package, so that it reports as every command does; dslm.errors adds
the exceptions of training. The numbers follow BSD's sysexits.h where one fits."""

EXIT_DONE = 0
EXIT_BUG = 1
"""A crash with a traceback (or a signal's 128 + N): a bug."""
EXIT_BAD_INPUT = 2
"""A config typo, a missing file, nothing to resume with --resume auto: fix it first."""
EXIT_BAD_DATA = 65
"""sysexits' EX_DATAERR: a training shard no longer matches its manifest; the run stopped after a
checkpoint, and resumes once the shard is rebuilt (or with data.on_bad_shard=skip). Not requeued."""
EXIT_RETRY = 69
"""sysexits' EX_UNAVAILABLE: another rank or the rendezvous did not answer; run again (requeue)."""
EXIT_WRITE_FAILED = 74
"""sysexits' EX_IOERR: a checkpoint could not be written; free space before running again."""
EXIT_STOPPED = 75
"""sysexits' EX_TEMPFAIL: stopped on request after a checkpoint (or during start-up, before
writing anything); run again to continue. The wrappers requeue."""
EXIT_INTERRUPTED = 130
"""128 + SIGINT, as a shell reports Ctrl-C: stopped at once (dslm-train: a second Ctrl-C)."""
EXIT_BROKEN_PIPE = 141
"""128 + SIGPIPE, as a shell pipeline: the reader of the output went away (`| head`)."""

EXIT_STATUSES = {
    EXIT_DONE: "done",
    EXIT_BUG: "a bug: a traceback",
    EXIT_BAD_INPUT: "bad input: one line naming it",
    EXIT_BAD_DATA: "a damaged shard (dslm-train stopped after a checkpoint): rebuild it, then resume",
    EXIT_RETRY: "a rank or the rendezvous failed: run again",
    EXIT_WRITE_FAILED: "a checkpoint could not be written: free space first",
    EXIT_STOPPED: "stopped on a signal after a checkpoint: continue with --resume auto",
    EXIT_INTERRUPTED: "interrupted (Ctrl-C)",
    EXIT_BROKEN_PIPE: "the reader of the output went away",
}
"""Each status with what it means in a few words: --help texts and the docs' table are held to it."""


def exit_statuses() -> str:
    """EXIT_STATUSES as one sentence for a --help text, the bug's and done's left out."""
    return "; ".join(f"{status} {meaning}" for status, meaning in EXIT_STATUSES.items() if status > EXIT_BUG)


class DslmError(Exception):
    """A problem with the user's input or files, not a bug: its message says what and where."""

    exit_status = EXIT_BAD_INPUT
