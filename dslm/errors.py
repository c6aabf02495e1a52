"""The one exception type for bad input: commands report it as a single line and exit 2."""


class DslmError(Exception):
    """A problem with the user's input or files, not a bug: its message says what and where."""
