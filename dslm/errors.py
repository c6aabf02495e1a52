"""The exceptions for failures that are not bugs. Commands report each as one line on stderr and
exit with its `exit_status` (dslm.cli lists them), so that a wrapper can tell bad input (2, fix
it first) from a failure that running again can get past (69), a damaged shard (65) and a
checkpoint that could not be written (74). DslmError itself lives in dslm_local.errors, for
dslm-complete, which has no torch."""

from dslm_local.errors import EXIT_BAD_INPUT, DslmError

__all__ = ["EXIT_BAD_DATA", "EXIT_BAD_INPUT", "EXIT_RETRY", "EXIT_WRITE_FAILED", "BadShard", "DslmError", "RankFailure",
           "WriteError"]

EXIT_BAD_DATA = 65
"""sysexits' EX_DATAERR: a training shard does not match its manifest; the run stopped after a
checkpoint, and resumes once the shard is rebuilt (or with data.on_bad_shard=skip)."""

EXIT_RETRY = 69
"""sysexits' EX_UNAVAILABLE: another rank or the rendezvous did not answer; run again (requeue)."""
EXIT_WRITE_FAILED = 74
"""sysexits' EX_IOERR: a checkpoint could not be written; free space before running again."""


class RankFailure(DslmError):
    """Another rank stopped answering (a collective timed out) or the rendezvous failed (MASTER_PORT
    taken, rank 0 unreachable): nothing is wrong with the input, and running again, from the last
    checkpoint, can get past it."""

    exit_status = EXIT_RETRY


class BadShard(DslmError):
    """A training shard no longer matches its manifest (cut short, overwritten, unreadable): the
    ranks stopped together after a checkpoint (data.on_bad_shard=stop)."""

    exit_status = EXIT_BAD_DATA


class WriteError(DslmError):
    """A checkpoint's files could not be written (disk full, quota, file size limit, read-only):
    the partial tag is gone and the previous checkpoint is intact; running again fails the same way
    until space is freed."""

    exit_status = EXIT_WRITE_FAILED
