"""The error type for problems a user can fix; the CLI prints its message as one line."""


class StageError(RuntimeError):
    """A stage cannot run as configured: the message names the key or file and the fix."""
