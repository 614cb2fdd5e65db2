"""Errors that mean "the user asked for something unusable": the CLI prints them as one line, exit 2."""


class UserError(Exception):
    """Bad input from the user: printed as `distar <cmd>: error: <message>` and exit code 2."""


class CheckpointError(UserError):
    """A checkpoint that cannot be read (truncated, corrupted, not distar's) or written (disk full)."""
