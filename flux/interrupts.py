"""Ctrl-C and SIGTERM as KeyboardInterrupt, but never raised inside the standard library's thread
synchronization.

Python runs a signal handler in the main thread between two of its bytecodes, wherever they are. In the
pure-Python parts of `threading`, `queue` and `concurrent.futures` that can be after a lock was taken and
before the block that releases it began: `Condition.__enter__` is Python code that takes the lock and then
returns. An exception there leaves the lock taken for good, and the next thread that wants it waits
forever: the capture writer handing back a buffer, the main thread queueing the last steps to finish the
capture, or the interpreter joining its threads at exit. A capture stopped with Ctrl-C at that moment hung.

`raising_interrupts()` installs handlers that raise at once everywhere else, and inside that code only where
it is blocked in a wait written to clean up after an exception. Anywhere else in it they defer the signal
and look again 10 ms later (SIGALRM), by when the main thread has left it: a delay of microseconds in
practice. SIGTERM raises `KeyboardInterrupt("signal 15")`, so that the same cleanup runs for both.
"""

import concurrent.futures._base
import concurrent.futures.thread
import linecache
import os
import queue
import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from types import FrameType

RETRY_S = 0.01
_SYNC_FILES = frozenset(
    os.path.abspath(m.__file__)
    for m in (threading, queue, concurrent.futures._base, concurrent.futures.thread)
)
# (function, start of its line): the blocking waits in that code that restore its state if the wait raises
# (Condition.wait's finally takes the lock back; a join's lock is released again). Blocking there, a
# deferred signal would wait for whatever the wait waits for.
_INTERRUPTIBLE = (
    ("wait", "waiter.acquire("),
    ("wait", "gotit = waiter.acquire("),
    ("_wait_for_tstate_lock", "if lock.acquire("),  # Thread.join, Python < 3.13
    ("join", "self._handle.join("),  # Thread.join, Python >= 3.13
)
_pending: list[int] = []  # the signal deferred, if any


def safe_to_raise(frame: FrameType | None) -> bool:
    """Whether an exception raised in `frame` leaves every lock as it should be (see the docstring above)."""
    if frame is None or os.path.abspath(frame.f_code.co_filename) not in _SYNC_FILES:
        return True
    line = linecache.getline(frame.f_code.co_filename, frame.f_lineno).strip()
    return any(frame.f_code.co_name == name and line.startswith(start) for name, start in _INTERRUPTIBLE)


def _interrupt(signum: int, frame: FrameType | None) -> None:
    if not safe_to_raise(frame):
        _pending[:] = [signum]
        signal.setitimer(signal.ITIMER_REAL, RETRY_S)
        return
    _pending.clear()
    raise KeyboardInterrupt() if signum == signal.SIGINT else KeyboardInterrupt(f"signal {signum}")


def _retry(signum: int, frame: FrameType | None) -> None:
    if _pending:
        _interrupt(_pending[0], frame)


@contextmanager
def raising_interrupts() -> Iterator[None]:
    """SIGINT and SIGTERM raise KeyboardInterrupt inside the block, outside lock-holding library code; the
    earlier handlers come back after it. A signal still deferred when the block ends is dropped: what it
    would have stopped is done. A no-op outside the main thread (only it may set handlers) and
    where SIGALRM's timer is missing (Windows)."""
    if threading.current_thread() is not threading.main_thread() or not hasattr(signal, "setitimer"):
        yield
        return
    wanted = {signal.SIGINT: _interrupt, signal.SIGTERM: _interrupt, signal.SIGALRM: _retry}
    # A signal ignored when the process began (`nohup`, a job started with `&` by a script) stays ignored.
    wanted = {sig: h for sig, h in wanted.items() if signal.getsignal(sig) is not signal.SIG_IGN}
    earlier = {sig: signal.signal(sig, handler) for sig, handler in wanted.items()}
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        _pending.clear()
        for sig, handler in earlier.items():
            signal.signal(sig, handler)
