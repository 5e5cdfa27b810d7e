"""The tracking spool: MLflow writes that a store kept refusing, kept on local disk until a later
``sweep launch``/``sweep worker`` or ``sweep status --repair`` replays them.

Where: beside an MLflow SQLite file ``DIR/mlflow.db`` in ``DIR/mlflow.db.spool/``; for any other
store (a tracking server, PostgreSQL) in ``./sweep-spool/<12 hex of the URI>/`` of the folder
the process runs in (``SWEEP_SPOOL_DIR`` replaces ``./sweep-spool``; ``sweep submit`` sets it to
the job folder's, which every node shares). One folder for every host: each writing process
appends to its own segment ``<host>-<pid>-<ms>.jsonl`` and holds an exclusive ``flock`` on it
while it lives, so a replayer (on any host that mounts the folder) never reads a segment that
is still growing, and two replayers never take the same segment.

Set aside: the points and ends of a run the store will never take (``store_errors``: deleted,
not active, its row gone) go to ``set-aside/<segment>.jsonl`` in the same folder, each line with
its ``reason``; ``sweep status`` names them. They are never replayed.

A segment is append-only JSON lines, one per spooled write:

* ``{"run": ID, "metrics": [[key, value, timestamp_ms, step], ...]}``
* ``{"run": ID, "end": STATUS, "end_time": MS, "tags": {...}}`` (after the run's metrics)

Exactly once: every point keeps the timestamp it was logged with, and MLflow's SQL store (also
behind a tracking server) treats a metric with the same run, key, value, timestamp and step as
already logged (the metrics table's primary key; ``SqlAlchemyStore._log_metrics`` skips the
duplicates of an insert that fails on it). So a replay that was interrupted and run again stores
each point once. A segment is deleted only once every line of it is stored.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import socket
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from sweep.base.urls import mask_url, sqlite_path
from sweep.base.text import first_line
from sweep.record.batch import MAX_BATCH, log_batch
from sweep.record.set_aside import append as append_set_aside


def spool_dir(tracking_uri: str) -> Path:
    """The spool folder of a tracking URI (see the module docstring)."""
    path = sqlite_path(tracking_uri)
    if path is not None:
        return path.resolve().with_name(path.name + ".spool")
    root = Path(os.environ.get("SWEEP_SPOOL_DIR") or SPOOL_DIR_NAME)
    digest = hashlib.sha256(tracking_uri.encode()).hexdigest()[:12]
    return (root / digest).resolve()


SPOOL_DIR_NAME = "sweep-spool"
SET_ASIDE = "set-aside"


class SpoolWriter:
    """This process's segment of a spool, created on the first write. ``host`` names the
    segment (default: this machine's name; tests give two processes two hosts)."""

    def __init__(self, folder: Path, tracking_uri: str, host: str | None = None):
        self.folder, self.uri = folder, tracking_uri
        self.host = host or socket.gethostname()
        self.path: Path | None = None
        self._file = None
        # the writer thread, and a stop's last words: reentrant, as a second signal's handler may
        # run on a thread that is inside append already
        self._lock = threading.RLock()
        self._name = f"{self.host}-{os.getpid()}-{int(time.time() * 1000)}"

    def set_aside(self, records: list[dict], reason: str) -> None:
        """Append records the store will never take, with the reason, to this process's
        set-aside file (fsynced). Raises OSError when the disk refuses."""
        with self._lock:  # set_aside.append: safe beside a repair moving the file
            append_set_aside(self.folder, self._name, records, reason)

    def append(self, records: list[dict]) -> None:
        """Append records and fsync: once this returns they survive a crash of the process.
        Raises OSError when the disk refuses (the writer keeps them in memory then)."""
        with self._lock:
            self._append(records)

    def _append(self, records: list[dict]) -> None:
        if self._file is None:
            self.folder.mkdir(parents=True, exist_ok=True)
            note = self.folder / "STORE"
            if not note.exists():  # which store these points belong to (no credentials)
                note.write_text(mask_url(self.uri) + "\n")
            name = self._name
            # Locked under a name no replayer looks at, then renamed: a replayer that saw the
            # segment empty and unlocked would delete it under the writer's feet.
            hidden = self.folder / f".{name}.tmp"
            self._file = open(hidden, "a", encoding="utf-8")
            fcntl.flock(self._file, fcntl.LOCK_EX)
            self.path = self.folder / f"{name}.jsonl"
            os.rename(hidden, self.path)
        # One write per call: a crash mid-write leaves at most one partial last line, which a
        # replay skips (its points never left this process's memory as a whole line).
        self._file.write("".join(json.dumps(r, separators=(",", ":")) + "\n" for r in records))
        self._file.flush()
        os.fsync(self._file.fileno())

    def close(self) -> None:
        with self._lock:
            if self._file is not None:
                self._file.close()  # releases the lock: the segment can be replayed now
                self._file = None


def _append_synced(path: Path, records: list[dict]) -> None:
    with open(path, "a", encoding="utf-8") as f:
        f.write("".join(json.dumps(r, separators=(",", ":")) + "\n" for r in records))
        f.flush()
        os.fsync(f.fileno())


@dataclass
class Pending:
    """What a spool holds that is not stored yet."""

    folder: Path
    points: dict[str, int] = field(default_factory=dict)  # per run id
    ends: set[str] = field(default_factory=set)  # runs whose end (tags, status) is spooled
    segments: int = 0
    live: int = 0  # segments a live process is still writing
    set_aside: dict[str, tuple[int, str]] = field(default_factory=dict)  # run -> (points, reason)

    @property
    def total(self) -> int:
        return sum(self.points.values())

    @property
    def waiting(self) -> bool:
        """Whether anything waits for a replay (points or run ends)."""
        return bool(self.total or self.ends)

    def describe(self) -> str:
        return (f"{self.total} point(s) of {len(set(self.points) | self.ends)} run(s) pending in "
                f"{self.folder}")


def _segments(folder: Path) -> list[Path]:
    return sorted(folder.glob("*.jsonl")) if folder.is_dir() else []


def _records(path: Path):
    with open(path, encoding="utf-8") as f:
        for line in f:
            try:
                yield json.loads(line)
            except ValueError:
                continue  # a partial last line of a process that died while appending


@contextlib.contextmanager
def _claimed(path: Path):
    """An exclusive lock on a segment, or None when another process holds it (a live writer
    or another replayer)."""
    try:
        f = open(path, "r+", encoding="utf-8")
    except FileNotFoundError:
        yield None
        return
    try:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            yield None
            return
        if os.fstat(f.fileno()).st_nlink == 0:  # replayed and deleted while this one waited
            yield None
            return
        yield f
    finally:
        f.close()


def pending(tracking_uri: str) -> Pending:
    """The points and run ends waiting in the spool of ``tracking_uri`` (reads only)."""
    out = Pending(spool_dir(tracking_uri))
    for path in _segments(out.folder):
        out.segments += 1
        with _claimed(path) as held:
            out.live += held is None
        for record in _records(path):
            run = record.get("run")
            if "metrics" in record:
                out.points[run] = out.points.get(run, 0) + len(record["metrics"])
            elif "end" in record:
                out.ends.add(run)
    for path in sorted((out.folder / SET_ASIDE).glob("*.jsonl")) if out.folder.is_dir() else []:
        for record in _records(path):
            run = record.get("run")
            points, _ = out.set_aside.get(run, (0, ""))
            out.set_aside[run] = (points + len(record.get("metrics", ())), record.get("reason", "?"))
    return out


def replay(tracking_uri: str, client) -> tuple[int, list[str]]:
    """Send every segment no live process holds to the store with ``client`` (an
    ``MlflowClient``), then delete it. Returns (points sent, problems: one line per segment
    that could not be replayed, which stays for the next replay)."""
    from sweep.record.store_errors import is_permanent

    sent, problems = 0, []
    folder = spool_dir(tracking_uri)
    aside = SpoolWriter(folder, tracking_uri)  # records the store will never take go here
    for path in _segments(folder):
        with _claimed(path) as held:
            if held is None:
                continue  # still being written, or another process replays it now
            count = 0
            try:
                records = list(_records(path))
                # points first, then ends: a run ends once it holds every point
                for record in sorted(records, key=lambda r: "end" in r):
                    try:
                        count += _replay_record(client, record)
                    except Exception as err:
                        if not is_permanent(err):
                            raise
                        aside.set_aside([record], first_line(err))  # skipped; the rest goes on
            except Exception as err:
                problems.append(f"{path}: {first_line(err)}")
                continue
            path.unlink()
            sent += count
    return sent, problems


def _replay_record(client, record: dict) -> int:
    """Store one spool line; returns the points it held."""
    from mlflow.entities import Metric, RunTag

    if "metrics" in record:
        items = record["metrics"]
        for start in range(0, len(items), MAX_BATCH):
            log_batch(client, record["run"], metrics=[
                Metric(k, v, ts, s) for k, v, ts, s in items[start:start + MAX_BATCH]])
        return len(items)
    if "end" in record:
        tags = [RunTag(k, v) for k, v in record.get("tags", {}).items()]
        if tags:
            log_batch(client, record["run"], tags=tags)
        client.set_terminated(record["run"], record["end"], end_time=record.get("end_time"))
    return 0


def drop_runs(tracking_uri: str, run_ids: set[str]) -> int:
    """Remove the records of ``run_ids`` from every segment of the spool no live process holds,
    set-aside segments included (``sweep delete``): a segment left empty is deleted, one that holds other runs too is
    rewritten with theirs only (beside it, then renamed). Returns the records removed."""
    removed = 0
    folder = spool_dir(tracking_uri)
    for path in _segments(folder) + _segments(folder / SET_ASIDE):  # set-aside records too
        with _claimed(path) as held:
            if held is None:
                continue  # a live writer's: the caller refuses studies with running trials
            lines = held.read().splitlines(keepends=True)
            keep = []
            for line in lines:
                try:
                    run = json.loads(line).get("run")
                except ValueError:
                    run = None  # a partial last line: nobody's, dropped with the rest
                if run in run_ids or run is None:
                    removed += run is not None
                else:
                    keep.append(line)
            if len(keep) == len(lines):
                continue
            if keep:
                tmp = path.with_name(f".{path.name}.tmp")
                tmp.write_text("".join(keep), encoding="utf-8")
                os.replace(tmp, path)
            else:
                path.unlink()
    return removed
