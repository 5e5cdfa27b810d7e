"""The bounded stop: from the first SIGTERM/SIGINT a worker has ``SWEEP_STOP_S`` seconds (default
20) to end its trials, get every queued MLflow point and run end into the store or the spool,
and exit.

Why a bound: SLURM sends SIGTERM at a time limit, ``scancel`` or a preemption, then SIGKILL
after ``KillWait`` (30 s by default); whatever is still in memory then is lost. A store that is
down can hold a graceful exit for minutes (MLflow's HTTP retries), so the orderly path gets the
time up to the deadline, and a timer takes over one second before it: the process's "last
words" (spool every queued point synchronously) and ``os._exit``. A second signal does the same
at once.

One speaker: the last words may already be under way on the main thread (the orderly path
spools what its drain could not store). The timer and a second signal then wait for them to
finish (at most ``WORDS_WAIT_S``) instead of exiting under their feet, and the exit line quotes
what the last words report: what is stored, what is spooled (with counts) and what is lost. The
second signal's handler does no work itself: it starts the exit on its own thread and returns,
so a handler that lands inside the main thread's spool write lets that write finish.

The rule lives here once: ``stop_seconds`` reads and checks the variable, ``BoundedStop`` owns
the signal handlers for a whole command (``sweep launch``, ``sweep worker``), and code that must
finish work at a stop takes the deadline (a ``time.monotonic()`` value) as a parameter.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from typing import Callable

from sweep.base.text import first_line
from sweep.errors import TrackingError

DEFAULT_STOP_S = 20.0
LAST_WORDS_S = 1.0  # the timer fires this long before the deadline: a spool write is milliseconds
# The longest the timer or a second signal waits for last words already under way (a spool
# write of a 500,000-point backlog takes about a second): a stop ends by SWEEP_STOP_S plus this
# at worst, within SLURM's default KillWait (30 s) at the default SWEEP_STOP_S (20 s).
WORDS_WAIT_S = 5.0


def stop_seconds() -> float:
    """Seconds from the first stop signal to the process's exit (``SWEEP_STOP_S``, default 20).
    Raises TrackingError (one line, exit 2) for a value that is not a number > 0."""
    text = os.environ.get("SWEEP_STOP_S", f"{DEFAULT_STOP_S:g}")
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not value > 0 or value == float("inf"):  # also NaN
        raise TrackingError(f"SWEEP_STOP_S must be a number of seconds > 0 (SLURM's default "
                            f"KillWait is 30), got {text!r}; fix or unset it")
    return value


class BoundedStop:
    """Signal handlers and the deadline timer of one command (a context manager).

    First SIGINT/SIGTERM: ``signum`` is set (the study loop stops its trials at the next check)
    and the deadline starts. ``last_words`` (set by the command once its tracker exists) is
    called by the timer just before the deadline, or at once on a second signal (on a thread of
    its own), and the process exits with 128 + the signal number; it returns the line that says
    what is where (or None), which the exit line quotes. The handler itself never raises: an exception
    raised from a signal handler can land in a finalizer, where Python prints and ignores it.
    Leaving the ``with`` block restores the handlers; the timer stays armed once a stop began
    (the process is on its way out; the bound covers the interpreter's own exit too)."""

    def __init__(self, last_words: Callable[[], str | None] | None = None):
        self.signum: int | None = None
        self.deadline: float | None = None
        self.last_words = last_words
        self._old: dict = {}
        self._cancelled = threading.Event()
        self._timer: threading.Thread | None = None
        self._words_lock = threading.Lock()

    def __enter__(self) -> "BoundedStop":
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        if self.deadline is None:
            self._cancelled.set()
        # else a stop is under way: the timer stays armed until the process has exited (the
        # interpreter's exit joins threads that may still wait on a store that is away)
        for sig, old in self._old.items():
            signal.signal(sig, old)
        self._old.clear()

    def _handle(self, signum, frame) -> None:
        if self.signum is not None:
            # Not here: this handler may have landed inside the main thread's own last words,
            # which must finish first (``_exit`` waits for them on its thread).
            threading.Thread(target=self._exit, daemon=True, name="second-signal",
                             args=(128 + signum, f"interrupted again "
                                                 f"({signal.Signals(signum).name})")).start()
            return
        self.signum = signum
        self.begin(128 + signum)

    def begin(self, exit_code: int) -> float:
        """Start the deadline (once; later calls return the same one): ``exit_code`` is the
        process's exit status should the timer have to end it."""
        if self.deadline is None:
            self.deadline = time.monotonic() + stop_seconds()
            self._timer = threading.Thread(target=self._expire, args=(exit_code,), daemon=True,
                                           name="bounded-stop")
            self._timer.start()
        return self.deadline

    def remaining(self) -> float | None:
        """Seconds left before the deadline (None: no stop under way)."""
        return None if self.deadline is None else max(0.0, self.deadline - time.monotonic())

    def _expire(self, exit_code: int) -> None:
        fire_at = self.deadline - min(LAST_WORDS_S, (self.deadline - time.monotonic()) / 4)
        if not self._cancelled.wait(max(0.0, fire_at - time.monotonic())):
            self._exit(exit_code, f"interrupted: the {stop_seconds():g} s bound of a stop "
                                  f"(SWEEP_STOP_S) is reached")

    def _exit(self, exit_code: int, why: str) -> None:
        with self._words_lock:  # the timer and a second signal: one of them speaks
            words = None
            if self.last_words is not None:
                try:
                    words = self.last_words()
                except BaseException as err:  # nothing may stand between the stop and the exit
                    words = f"the last words failed ({first_line(err, typed=True)})"
            try:  # the job's log says why it ends here (stdout: where the summary would be)
                print(f"{why}: exiting; {words or 'nothing was queued for MLflow'}; the next "
                      f"launch retries the interrupted trial(s)", flush=True)
            except Exception:
                pass
            for stream in (sys.stdout, sys.stderr):  # the job's log keeps its last lines
                try:
                    stream.flush()
                except Exception:
                    pass
            os._exit(exit_code)
