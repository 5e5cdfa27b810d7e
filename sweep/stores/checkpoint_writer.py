"""One checkpoint writer per process: trial checkpoints are written off the training thread.

At an epoch end the training thread only copies the state off the device (``host_copy``,
``fused_snapshot``) and hands ``save`` a function that returns it; this thread calls it and the
checkpoint's save entry point (``TrialCheckpoint.save``: file, fsync, rename), one file at a
time. The Optuna notes the saves make (``deferred``: "checkpoint_epochs") wait until the files of
their round are written, so the notes of one epoch boundary go out together, after their files.

Bounded and safe:

* At most one operation waits per file: a newer checkpoint (or the removal of the file) replaces
  a waiting older one, so memory holds at most one waiting copy per slot plus those of the
  round being written (a pack's slots share one copy: two or three copies of the pack in all),
  however slow the disk.
* A file is never read or removed while a write of it waits or runs: ``remove`` is an operation
  of this thread, after any write of that file in progress; ``wait_for`` (before a retry loads a
  checkpoint) returns once nothing of that file is left.
* ``flush(deadline)`` (a stop) waits until everything is written or the deadline passes;
  ``close(deadline)`` then stops the thread, dropping the writes that wait. A checkpoint not
  written by then is simply the previous one: the rename is atomic, a file is never torn. The
  removals that wait are done by ``close`` itself (an unlink is quick): a finished trial's file
  leaves with it even when a slow disk held the flush past the deadline.

``SWEEP_CHECKPOINT_WRITE_DELAY_S`` (tests only) delays every write by that many seconds: a slow
disk, for the tests that show training never waits for one.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

DELAY_ENV = "SWEEP_CHECKPOINT_WRITE_DELAY_S"


def write_delay_s() -> float:
    """``SWEEP_CHECKPOINT_WRITE_DELAY_S`` (default 0): seconds each write waits first. A test
    hook, not a setting: not validated beyond ``float``."""
    return max(0.0, float(os.environ.get(DELAY_ENV) or 0))


@dataclass
class _Op:
    run: Callable[[], None]
    write: bool  # a write (delayed by the test hook); else a removal
    on_done: Callable[[float], None] | None  # told the seconds this thread spent on it


def _unlink(path: Path) -> None:
    try:
        path.unlink(missing_ok=True)
    except OSError:
        pass  # a read-only folder: the file is stale, and refused once its trial is done


class CheckpointWriter:
    """The thread that writes and removes a process's checkpoint files (module docstring). The
    thread starts with the first operation and again after ``close``."""

    def __init__(self, log: Callable[[str], None] | None = None):
        self._cond = threading.Condition()
        self._pending: dict[Path, _Op] = {}  # one per file, oldest first
        self._round: set[Path] = set()  # the files of the round in progress not yet done
        self._todo: list[tuple[Path, _Op]] = []  # the round's operations not yet started
        self._working = False  # a round is in progress
        # the writer thread's own: the operation running, the notes its round holds back
        self._current: _Op | None = None
        self._notes: list[tuple[Callable[[], None], Callable[[float], None] | None]] = []
        self._thread: threading.Thread | None = None
        self._stop: threading.Event | None = None
        self._delay = write_delay_s()
        self._log = log or (lambda line: print(line, file=sys.stderr, flush=True))
        self._warned: set[Path] = set()

    # --- what other threads call -------------------------------------------------------------
    def save(self, checkpoint, take: Callable[[], dict],
             on_written: Callable[[float], None] | None = None) -> None:
        """Queue ``checkpoint.save(take())`` (``checkpoint``: a ``TrialCheckpoint``); it
        replaces a waiting, not yet started write of the same file. ``on_written(seconds)`` is
        told this thread's seconds for it (the cut from the copy, the file, the notes)."""
        self._put(checkpoint.path, _Op(lambda: checkpoint.save(take()), True, on_written))

    def remove(self, path: Path) -> None:
        """Remove ``path`` once any write of it in progress is done; a waiting write of it is
        dropped."""
        self._put(path, _Op(lambda: _unlink(path), False, None))

    def deferred(self, note: Callable[..., None]) -> Callable[..., None]:
        """``note`` as a callback for ``TrialCheckpoint.on_saved``: called on this thread it is
        held until the round's files are written (one boundary's notes together, after their
        files); called on another thread it runs at once."""
        def later(*args) -> None:
            if threading.current_thread() is not self._thread:
                note(*args)
                return
            current = self._current
            self._notes.append((lambda: note(*args), current.on_done if current else None))
        return later

    def wait_for(self, path: Path) -> None:
        """Return once no operation on ``path`` waits or runs (before the file is read)."""
        with self._cond:
            while path in self._pending or path in self._round:
                self._cond.wait()

    def flush(self, deadline: float | None = None) -> bool:
        """Wait until every queued write, removal and note is done, or until ``deadline`` (a
        ``time.monotonic()`` value; None: no limit); whether everything was done."""
        with self._cond:
            while self._pending or self._working:
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    return False
                self._cond.wait(left)
            return True

    def close(self, deadline: float | None = None) -> bool:
        """``flush(deadline)``, then stop the thread: the writes that still wait are dropped
        (the previous checkpoint stays), the removals that wait are done here (but not of a
        file whose write is in progress past the deadline: that write finishes or dies with the
        process, and ``sweep status --repair`` removes what it leaves). Whether everything was
        done."""
        done = self.flush(deadline)
        with self._cond:
            if self._stop is not None:
                self._stop.set()
            self._thread = self._stop = None
            running = self._round - {path for path, _ in self._todo}  # a write under way
            removals = [path for path, op in (*self._pending.items(), *self._todo)
                        if not op.write and path not in running]
            self._pending.clear()
            self._todo = []
            self._cond.notify_all()
        for path in removals:
            _unlink(path)
        return done

    # --- the thread --------------------------------------------------------------------------
    def _put(self, path: Path, op: _Op) -> None:
        with self._cond:
            self._pending.pop(path, None)  # newest wins; it goes to the back of the queue
            self._pending[path] = op
            if self._thread is None:
                self._stop = threading.Event()
                self._thread = threading.Thread(target=self._loop, args=(self._stop,),
                                                daemon=True, name="checkpoint-writer")
                self._thread.start()
            self._cond.notify_all()

    def _loop(self, stop: threading.Event) -> None:
        """Rounds: everything queued when a round starts (one epoch boundary's checkpoints,
        as the training thread hands them over together), its files, then its notes. What
        arrives meanwhile waits for the next round, so notes never wait behind a busy disk for
        more than a round."""
        while True:
            with self._cond:
                while not (self._pending or stop.is_set()):
                    self._cond.wait()
                if stop.is_set():
                    return
                self._todo = list(self._pending.items())
                self._pending.clear()
                self._round, self._working = {path for path, _ in self._todo}, True
            try:
                self._write_round(stop)
            finally:
                with self._cond:
                    if self._stop in (stop, None):  # not a thread started after a close
                        self._todo = []  # the copies go now, not at the next round
                        self._round, self._working = set(), False
                    self._cond.notify_all()

    def _write_round(self, stop: threading.Event) -> None:
        self._notes = []
        while True:
            with self._cond:  # one at a time: ``close`` takes the removals not yet started
                if stop.is_set() or not self._todo:
                    break
                path, op = self._todo.pop(0)
            self._current = op
            self._timed(lambda: self._run(op, stop), op.on_done, path)
            self._current = op = None  # done with its copy
            with self._cond:
                self._round.discard(path)
                self._cond.notify_all()
        if stop.is_set():
            return
        notes, self._notes = self._notes, []
        for note, on_done in notes:
            if stop.is_set():
                return
            self._timed(note, on_done)

    def _run(self, op: _Op, stop: threading.Event) -> None:
        # the test hook's slow disk; closed meanwhile, the write is dropped as one the stop's
        # deadline did not reach
        if op.write and self._delay and stop.wait(self._delay):
            return
        op.run()

    def _timed(self, call: Callable[[], None], on_done: Callable[[float], None] | None,
               path: Path | None = None) -> None:
        began = time.perf_counter()
        try:
            call()
        except Exception as err:  # one bad checkpoint must not stop the others' writes
            if path not in self._warned:
                self._warned.add(path)
                first = (str(err).strip().splitlines() or [""])[0][:200]
                self._log(f"warning: checkpoint {path or 'note'} not written "
                          f"({type(err).__name__}: {first}); training goes on")
        finally:
            if on_done is not None:
                on_done(time.perf_counter() - began)


