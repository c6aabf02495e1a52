"""The exception for failures that are not bugs, and its exit status: every dslm command (the
torch ones through dslm.errors, which adds the statuses of training) reports one as one line on
stderr (dslm_local.cli.run_command)."""

EXIT_BAD_INPUT = 2


class DslmError(Exception):
    """A problem with the user's input or files, not a bug: its message says what and where."""

    exit_status = EXIT_BAD_INPUT
