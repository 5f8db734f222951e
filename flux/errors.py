"""Errors a user can cause and fix; the CLI prints them as one paragraph, without a traceback."""


class UserError(Exception):
    """Something the user can fix (a flag, a missing file, access to a gated repo).

    The message says what went wrong and what to do. `exit_code` is what the CLI exits with.
    """

    exit_code = 1


class UsageError(UserError):
    """A bad command-line value; raised before any weights load or any output is written."""

    exit_code = 2
