"""Who may touch a spool segment: its writer while it lives, then one replayer at a time; readers
(``pending``, ``sweep status``) take nothing and need no write access.

Each writer first creates a marker ``NAME.live`` beside its segment ``NAME.jsonl`` (``O_EXCL``;
JSON: host, pid, and how the folder locks), removed when it closes. Which lock a folder has is
found once per folder and process, by a probe (``locking``):

* ``flock`` (local disks, NFS with lockd, Lustre mounted ``flock``): the writer holds
  ``LOCK_EX`` on its segment while it lives; a replayer takes ``LOCK_EX | LOCK_NB`` and skips a
  segment only when that says "held" (``EWOULDBLOCK``); the kernel frees a dead writer's lock.
* ``files``, where ``flock`` raises ``ENOLCK`` (NFS without lockd), ``ENOSYS`` or ``EOPNOTSUPP``
  (Lustre mounted ``noflock``): a replayer claims a segment by creating ``NAME.claim`` with
  ``O_EXCL``, and a writer proves it lives by touching its marker every ``LEASE_S / 6``
  seconds. A writer is dead when it ran on this host and its pid is gone, or its marker is older
  than ``LEASE_S``; a claim of a dead replayer is broken the same way.

A marker left by a killed writer on another host of a ``flock`` folder says nothing (the kernel
lock does): a replayer there takes the segment once it gets the lock.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import socket
import threading
import time
from pathlib import Path

LEASE_S = 300.0  # a lock-file writer or replayer not heard of for this long is dead
# flock refused by the file system itself (not "held"): the folder works with lock files
NO_FLOCK = {errno.ENOLCK, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EINVAL}
HELD = {errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES}

_found: dict[str, str] = {}
_found_lock = threading.Lock()


def locking(folder: Path) -> str:
    """``"flock"`` or ``"files"`` for ``folder`` (which must exist and be writable): probed once
    per folder and process. Raises OSError when the probe cannot be made."""
    key = str(folder)
    with _found_lock:
        if key not in _found:
            _found[key] = _probe(folder)
        return _found[key]


def _probe(folder: Path) -> str:
    probe = folder / f".probe-{socket.gethostname()}-{os.getpid()}-{threading.get_ident()}"
    fd = os.open(probe, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return "flock"
    except OSError as err:
        if err.errno in NO_FLOCK:
            return "files"
        raise
    finally:
        os.close(fd)
        with contextlib.suppress(OSError):
            probe.unlink()


def marker_of(segment: Path) -> Path:
    return segment.with_suffix(".live")


def claim_of(segment: Path) -> Path:
    return segment.with_suffix(".claim")


def create_note(path: Path, how: str) -> None:
    """Create ``path`` (``O_EXCL``: FileExistsError when it exists) naming this process."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        os.write(fd, json.dumps({"host": socket.gethostname(), "pid": os.getpid(),
                                 "locks": how}).encode())
        os.fsync(fd)
    finally:
        os.close(fd)


def read_note(path: Path) -> tuple[dict, float] | None:
    """A marker's or claim's JSON and its mtime (seconds since the epoch); None when gone."""
    try:
        stat = path.stat()
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    try:
        note = json.loads(text)
    except ValueError:  # being written this instant (create_note writes right after O_EXCL)
        note = {"locks": "files"}
    return (note if isinstance(note, dict) else {"locks": "files"}), stat.st_mtime


def note_alive(path: Path) -> bool | None:
    """Whether the process a marker or claim names still lives: True, False (it ran on this
    host and is gone; a lock-file note not touched for ``LEASE_S``; no note at all), or None
    (an flock writer on another host: only its lock can tell)."""
    found = read_note(path)
    if found is None:
        return False
    note, mtime = found
    files = note.get("locks") == "files"
    if note.get("host") == socket.gethostname() and isinstance(note.get("pid"), int):
        if not _pid_alive(note["pid"]):
            return False
        if not files:
            return True
    if files:
        return time.time() - mtime < LEASE_S
    return None


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's process
    return True


def live(segment: Path) -> bool:
    """Whether a writer may still be appending to ``segment`` (readers: no lock taken)."""
    return note_alive(marker_of(segment)) is not False


class LeaseKeeper:
    """Touches a lock-file marker every ``LEASE_S / 6`` seconds until stopped."""

    def __init__(self, path: Path):
        self.path, self._stop = path, threading.Event()
        self._thread = threading.Thread(target=self._beat, name="sweep-spool-lease", daemon=True)
        self._thread.start()

    def _beat(self) -> None:
        while not self._stop.wait(LEASE_S / 6):
            with contextlib.suppress(OSError):
                os.utime(self.path)

    def stop(self) -> None:
        self._stop.set()


@contextlib.contextmanager
def claimed(segment: Path, how: str):
    """The segment's bytes' file descriptor (read, and write when allowed), exclusively this
    process's, or None when a live writer or another replayer holds it or it is gone."""
    if how == "files":
        with _claim_file(segment) as ok:
            if not ok:
                yield None
                return
            with _opened(segment) as fd:
                yield fd if fd is not None and _writer_gone(segment, how) else None
        return
    with _opened(segment) as fd:
        if fd is None:
            yield None
            return
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            if err.errno not in HELD:
                raise
            yield None
            return
        if os.fstat(fd).st_nlink == 0 or not _writer_gone(segment, how):
            yield None  # replayed and deleted meanwhile; or a lock-file writer of another host
            return
        yield fd


@contextlib.contextmanager
def _opened(segment: Path):
    try:
        fd = os.open(segment, os.O_RDWR)
    except PermissionError:
        fd = os.open(segment, os.O_RDONLY)  # flock needs no write access on a local disk
    except FileNotFoundError:
        fd = None
    try:
        yield fd
    finally:
        if fd is not None:
            os.close(fd)


def _writer_gone(segment: Path, how: str) -> bool:
    """Once a replayer holds the segment: whether its writer is gone (its marker is removed
    then). Under flock the lock said so, unless the marker is a lock-file writer's (another
    host that found no flock) that lives."""
    marker = marker_of(segment)
    found = read_note(marker)
    if found is not None:
        files_writer = found[0].get("locks") == "files"
        if (how == "files" or files_writer) and note_alive(marker) is not False:
            return False
    with contextlib.suppress(FileNotFoundError):
        marker.unlink()
    return True


@contextlib.contextmanager
def _claim_file(segment: Path):
    """``NAME.claim`` created with ``O_EXCL`` (a dead replayer's is broken once), removed at
    the end: True while this process holds it."""
    claim = claim_of(segment)
    for attempt in range(2):
        try:
            create_note(claim, "files")
            break
        except FileExistsError:
            if attempt or note_alive(claim) is not False:
                yield False
                return
            # Renamed before it is removed: of two processes breaking it, one wins the rename.
            broken = claim.with_name(f"{claim.name}.broken-{os.getpid()}-{threading.get_ident()}")
            try:
                os.rename(claim, broken)
            except FileNotFoundError:
                continue
            if note_alive(broken) is not False:  # another breaker's fresh claim: give it back
                with contextlib.suppress(FileExistsError):
                    os.link(broken, claim)
            broken.unlink()
    beat = LeaseKeeper(claim)  # a long replay keeps its claim
    try:
        yield True
    finally:
        beat.stop()
        with contextlib.suppress(FileNotFoundError):
            claim.unlink()
