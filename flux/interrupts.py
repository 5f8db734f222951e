"""Ctrl-C and SIGTERM as KeyboardInterrupt, but never raised inside the standard library's thread
synchronization.

Python runs a signal handler in the main thread between two of its bytecodes, wherever they are. In the
pure-Python parts of `threading`, `queue` and `concurrent.futures` that can be after a lock was taken and
before the block that releases it began: `Condition.__enter__` is Python code that takes the lock and then
returns. An exception there leaves the lock taken for good, and the next thread that wants it waits
forever: the capture writer handing back a buffer, the main thread queueing the last steps to finish the
capture, or the interpreter joining its threads at exit. A capture stopped with Ctrl-C at that moment hung.

`raising_interrupts()` installs handlers that raise at once everywhere else, and inside that code only where
it is blocked in a wait written to clean up after an exception (Condition.wait, which every Queue.get,
Event.wait and Future.result blocks in, and Thread.join). Anywhere else in it they defer the signal and look
again every 10 ms (SIGALRM) until the main thread has left it: the interrupt usually comes 10 ms late. One
case waits longer: a `with` on a Condition whose lock another thread holds is not interrupted until that
thread lets it go (no thread of this program holds one for long). SIGTERM raises
`KeyboardInterrupt("signal 15")`, so that the same cleanup runs for both.
"""

import concurrent.futures._base
import concurrent.futures.thread
import linecache
import os
import queue
import signal
import threading
from types import FrameType
from typing import Any

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
_state = {"active": False, "armed": False, "alarm": signal.SIG_DFL}  # see raising_interrupts


def safe_to_raise(frame: FrameType | None) -> bool:
    """Whether an exception raised in `frame` leaves every lock as it should be (see the docstring above)."""
    if frame is None or os.path.abspath(frame.f_code.co_filename) not in _SYNC_FILES:
        return True
    line = linecache.getline(frame.f_code.co_filename, frame.f_lineno).strip()
    if not line:  # a Python installed without its sources: no wait can be told apart; raise, as Python does
        return True
    return any(frame.f_code.co_name == name and line.startswith(start) for name, start in _INTERRUPTIBLE)


def _interrupt(signum: int, frame: FrameType | None) -> None:
    # Inside _Handlers' own methods the handlers are being installed or put back: raising there would leave
    # some of them behind. Deferred once the block has ended (no retry then), a signal is dropped.
    own = frame is not None and frame.f_code in _OWN_CODE
    if own or not safe_to_raise(frame):
        _pending[:] = [signum]
        if _state["active"]:
            _state["armed"] = True
            signal.setitimer(signal.ITIMER_REAL, RETRY_S)
        return
    _pending.clear()
    raise KeyboardInterrupt() if signum == signal.SIGINT else KeyboardInterrupt(f"signal {signum}")


def _retry(signum: int, frame: FrameType | None) -> None:
    _state["armed"] = False
    if _pending:
        _interrupt(_pending[0], frame)
    elif callable(_state["alarm"]):  # not our timer: whoever set SIGALRM's handler before us
        _state["alarm"](signum, frame)


class _Handlers:
    """The context manager `raising_interrupts` returns."""

    def __enter__(self) -> None:
        self.earlier: dict[int, Any] = {}
        # Nested: the outer block's handlers serve, and its deferred signal must survive the inner block.
        self.own = (
            not _state["active"]
            and threading.current_thread() is threading.main_thread()
            and hasattr(signal, "setitimer")
        )
        if not self.own:
            return
        _state["active"], _pending[:] = True, []
        try:
            # SIGALRM first, whatever it was (even ignored): the retries of SIGINT and SIGTERM need it.
            # Those two stay as they are where ignored (`nohup`, a job a script starts with `&`) or where
            # their handler was set outside Python (which `signal.signal` could not put back).
            _state["alarm"] = self.earlier[signal.SIGALRM] = signal.signal(signal.SIGALRM, _retry)
            for sig in (signal.SIGINT, signal.SIGTERM):
                if signal.getsignal(sig) not in (signal.SIG_IGN, None):
                    self.earlier[sig] = signal.signal(sig, _interrupt)
        except BaseException:  # e.g. the earlier SIGINT handler raised before ours was in: put all back
            self.__exit__()
            raise

    def __exit__(self, *exc: object) -> None:
        if not self.own:
            return
        _state["active"] = False
        if _state["armed"]:
            signal.setitimer(signal.ITIMER_REAL, 0)
            _state["armed"] = False
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGALRM):  # SIGALRM last, as it came first
            if sig in self.earlier:
                signal.signal(sig, self.earlier[sig])
        _pending.clear()


_OWN_CODE = frozenset((_Handlers.__enter__.__code__, _Handlers.__exit__.__code__))


def raising_interrupts() -> _Handlers:
    """SIGINT and SIGTERM raise KeyboardInterrupt inside the block, outside lock-holding library code; the
    earlier handlers come back after it. A signal still deferred when the block ends is dropped: what it
    would have stopped is done. A no-op outside the main thread (only it may set handlers), where SIGALRM's
    timer is missing (Windows), and inside another such block."""
    return _Handlers()
