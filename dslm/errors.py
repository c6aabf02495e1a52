"""The exceptions of training's failures that are not bugs, each with its exit status. The
statuses, and DslmError itself, live in dslm_local.errors (the one table of them), for
dslm-complete, which has no torch."""

from dslm_local.errors import EXIT_BAD_DATA, EXIT_RETRY, EXIT_WRITE_FAILED, DslmError

__all__ = ["BadShard", "DslmError", "RankFailure", "WriteError"]


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
