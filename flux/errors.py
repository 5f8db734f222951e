"""Errors a user can cause and fix; the CLI prints them as one paragraph, without a traceback."""

from collections.abc import Iterator


class UserError(Exception):
    """Something the user can fix (a flag, a missing file, access to a gated repo).

    The message says what went wrong and what to do. `exit_code` is what the CLI exits with.
    """

    exit_code = 1


class UsageError(UserError):
    """A bad command-line value; raised before any weights load or any output is written."""

    exit_code = 2


def error_chain(err: BaseException | None) -> Iterator[BaseException]:
    """`err`, then each error it was raised from or while handling (__cause__, else __context__), once each.

    Writers wrap what really happened: torch.save's zip writer, closing the file, raises "unexpected pos ..."
    with the file's OSError or the interrupt of the write as its __context__.
    """
    seen: set[int] = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        yield err
        err = err.__cause__ or err.__context__
