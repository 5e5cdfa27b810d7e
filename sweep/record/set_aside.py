"""Set-aside records: the points and ends of runs the store refused for good (``store_errors``:
a run deleted or not active, its row gone), kept in ``set-aside/`` of the spool folder with the
reason, and put back into the spool once the cause is fixed (a run restored in the UI or with
``MlflowClient.restore_run``) by ``sweep status --repair``.

Format: ``set-aside/<host>-<pid>-<ms>.jsonl``, one JSON line per record (a spool record, plus
its ``reason``), appended and fsynced by the writer (``append``).

Putting them back (``restore``): each file is claimed by an atomic rename to
``<name>.restoring-<host>-<pid>.jsonl`` (still in ``set-aside/``, so ``sweep status`` keeps
counting it until it is gone; a second restorer skips it), its records go to a fresh spool
segment (fsynced, without their reason), and the claimed file is deleted. The next replay then
stores them (exactly once, as every spooled point) or, when the store still refuses them for
good, sets them aside again with the reason it gives now. A writer appending to a file that a
restorer renamed meanwhile notices (the path no longer names the file it wrote) and writes the
same records again under the path: nothing is lost, and a record restored twice is stored once.
A claim whose restorer died (same host, its pid gone) is taken over by the next restorer; one
left by a restorer on another host stays, counted by ``sweep status`` as set aside (rename it
back to ``<name>.jsonl`` once that host is known to be down).
"""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

SET_ASIDE = "set-aside"
RESTORING = ".restoring-"


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
        # a restorer renamed the file while this wrote: these records may be past its read


def _claims(folder: Path) -> list[Path]:
    """The set-aside files a restorer may take now: unclaimed ones, and claims of a restorer
    on this host whose process is gone (or this one's, left by a restore the disk cut short)."""
    target = folder / SET_ASIDE
    if not target.is_dir():
        return []
    host = socket.gethostname()
    out = []
    for path in sorted(target.glob("*.jsonl")):
        if RESTORING not in path.name:
            out.append(path)
            continue
        owner = path.name.rsplit(RESTORING, 1)[1][:-len(".jsonl")]
        owner_host, _, pid = owner.rpartition("-")
        if owner_host == host and pid.isdigit() and (int(pid) == os.getpid()
                                                     or not _alive(int(pid))):
            out.append(path)
    return out


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _records(path: Path) -> list[dict]:
    out = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            try:
                record = json.loads(line)
            except ValueError:
                continue  # a partial last line of a writer that died while appending
            record.pop("reason", None)
            out.append(record)
    return out


def restore(folder: Path, spool) -> int:
    """Put every set-aside record of ``folder`` back into the spool through ``spool`` (a
    ``spool.SpoolWriter`` of this process, closed here so that a replay may take its segment);
    returns the records put back. Raises OSError when the disk refuses (what was not put back
    stays set aside)."""
    restored = 0
    me = f"{RESTORING}{socket.gethostname()}-{os.getpid()}.jsonl"
    try:
        for path in _claims(folder):
            base = path.name.split(RESTORING, 1)[0].removesuffix(".jsonl")
            claimed = path.with_name(base + me)
            try:
                os.rename(path, claimed)
            except FileNotFoundError:
                continue  # another restorer took it
            records = _records(claimed)
            if records:
                spool.append(records)
            claimed.unlink()
            restored += len(records)
    finally:
        spool.close()
    return restored
