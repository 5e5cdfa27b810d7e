"""Set-aside records: the points and ends of runs the store refused for good (``store_errors``:
a run deleted or not active, its row gone), kept in ``set-aside/`` of the spool folder with the
reason, and put back into the spool once the cause is fixed (a run restored in the UI or with
``MlflowClient.restore_run``) by ``sweep status --repair``.

A set-aside file ``set-aside/<host>-<pid>-<ms>.jsonl`` holds spool records (the spool's own
format), each with its ``reason``, appended and fsynced by the writer (``append``).

Putting them back (``restore``) moves each file into the spool folder as a segment of its own,
by one atomic rename: two restorers never take the same file, a crash leaves it in one place or
the other, and the file's format is the spool's whatever it is (a replay ignores ``reason``).
The replay that follows stores what the store takes now (exactly once, as every spooled point)
and sets aside again what it still refuses, with the reason it gives now. A writer appending to
a file that a restorer moved meanwhile notices (the path no longer names the file it wrote) and
writes the same records again under the path: nothing is lost, and a record put back twice is
stored once.
"""

from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path

SET_ASIDE = "set-aside"


def append(folder: Path, name: str, records: list[dict], reason: str) -> None:
    """Append ``records`` with ``reason`` to ``folder/set-aside/<name>.jsonl`` (fsynced).
    Raises OSError when the disk refuses."""
    target = folder / SET_ASIDE
    target.mkdir(parents=True, exist_ok=True)
    path = target / f"{name}.jsonl"
    text = "".join(json.dumps({**r, "reason": reason}, separators=(",", ":")) + "\n"
                   for r in records)
    while True:
        with open(path, "a", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
            written = os.fstat(f.fileno()).st_ino
        try:
            if os.stat(path).st_ino == written:
                return
        except FileNotFoundError:
            pass
        # a restorer moved the file into the spool while this wrote: these records may be past
        # the replay's read, so they go under the path again (stored once all the same)


def restore(folder: Path) -> int:
    """Move every set-aside file of ``folder`` (a spool folder) into it as a segment of its own,
    named ``restored-<host>-<pid>-<ns>-<name>.jsonl``; returns the files moved. Raises OSError
    when the file system refuses (what was not moved stays set aside)."""
    target = folder / SET_ASIDE
    moved = 0
    for path in sorted(target.glob("*.jsonl")) if target.is_dir() else []:
        name = f"restored-{socket.gethostname()}-{os.getpid()}-{time.time_ns()}-{path.name}"
        try:
            os.rename(path, folder / name)
        except FileNotFoundError:
            continue  # another restorer took it
        moved += 1
    return moved
