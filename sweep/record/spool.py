"""The tracking spool: MLflow writes that a store kept refusing, kept on disk until a later
``sweep launch``/``sweep worker`` or ``sweep status --repair`` replays them.

Where (``spool_dir``), from the store alone, so every command finds it from any folder and any
spelling of the URL: beside an MLflow SQLite file ``DIR/mlflow.db`` in ``DIR/mlflow.db.spool/``;
for any other store (a tracking server, PostgreSQL) in ``ROOT/<12 hex of the store's
identity>/``, where the identity is ``sweep.base.urls.store_identity`` (scheme without driver
alias, host, port, database or path: ``http://h:5000/`` and ``http://h:5000`` are one store)
and ``ROOT`` is ``SWEEP_SPOOL_DIR``, else the per-user ``${XDG_CACHE_HOME:-~/.cache}/sweep/spool``
(a home folder every node of a cluster mounts). One folder for every host: each writing process
appends to its own segment ``<host>-<pid>-<ms>.jsonl`` and holds it while it lives
(``spool_locks``: flock, or lock files where the file system has no flock), so a replayer on
any host never reads a segment that is still growing and two replayers never take the same one.

Set aside: the points and ends of a run the store will never take (``store_errors``: deleted,
not active, its row gone) go to ``set-aside/<segment>.jsonl`` in the same folder, each record
with its ``reason``; ``sweep status`` names them. They are never replayed. Moved aside: a
segment holding a line that cannot be read (an append torn by a crash) goes to ``damaged/``
once its whole records are replayed, and ``sweep status`` names it until a person removes it.

A segment is framed JSON lines (``spool_format``), one per spooled write:

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
import os
import socket
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from sweep.base.text import first_line
from sweep.base.urls import mask_url, sqlite_path, store_identity
import sweep.record.spool_format as spool_format
from sweep.record.batch import MAX_BATCH, log_batch
from sweep.record.set_aside import SET_ASIDE
from sweep.record.set_aside import append as append_set_aside
from sweep.record.spool_locks import LeaseKeeper, claimed, create_note, live, locking, marker_of

DAMAGED = "damaged"


def spool_root() -> Path:
    """Where the spools of servers live: ``SWEEP_SPOOL_DIR``, else the per-user cache folder
    ``${XDG_CACHE_HOME:-~/.cache}/sweep/spool`` (absolute)."""
    root = os.environ.get("SWEEP_SPOOL_DIR")
    if not root:
        cache = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
        root = str(Path(cache) / "sweep" / "spool")
    return Path(root).expanduser().resolve()


def spool_dir(tracking_uri: str) -> Path:
    """The spool folder of a tracking URI (see the module docstring): the same for every
    spelling of the store's URL and from any working folder."""
    path = sqlite_path(tracking_uri)
    if path is not None:
        path = path.expanduser().resolve()
        return path.with_name(path.name + ".spool")
    digest = hashlib.sha256(store_identity(tracking_uri).encode()).hexdigest()[:12]
    return spool_root() / digest


class SpoolWriter:
    """This process's segment of a spool, created on the first write. ``host`` names the
    segment (default: this machine's name; tests give two processes two hosts)."""

    def __init__(self, folder: Path, tracking_uri: str, host: str | None = None):
        self.folder, self.uri = folder, tracking_uri
        self.host = host or socket.gethostname()
        self.path: Path | None = None
        self._fd: int | None = None
        self._beat: LeaseKeeper | None = None
        self._opened = 0  # segments opened (a lock-file writer judged dead opens another)
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
        Raises OSError when the disk or its locks refuse (the writer keeps them in memory then,
        and tries again); a failed append leaves no part of its records in the segment."""
        with self._lock:
            if self._fd is not None and self._beat is not None and not marker_of(self.path).exists():
                # A lock-file writer that was silent past its lease (a suspended job) was judged
                # dead and its segment replayed: what follows goes to a new one.
                self.close()
            if self._fd is None:
                self._open()
            spool_format.append(self._fd, spool_format.encode(records))

    def _open(self) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        how = locking(self.folder)  # probed once per folder and process
        note = self.folder / "STORE"
        if not note.exists():  # which store these points belong to (no credentials)
            note.write_text(f"{store_identity(self.uri)}\n{mask_url(self.uri)}\n")
        self._opened += 1
        name = self._name if self._opened == 1 else f"{self._name}-{self._opened}"
        segment = self.folder / f"{name}.jsonl"
        marker = marker_of(segment)
        create_note(marker, how)  # before the segment exists: a reader never sees it unowned
        try:
            if how == "flock":
                # Locked under a name no replayer looks at, then renamed: a replayer that saw
                # the segment empty and unlocked would delete it under the writer's feet.
                hidden = self.folder / f".{name}.tmp"
                fd = os.open(hidden, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o644)
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # a fresh file: never held
                    os.rename(hidden, segment)
                except BaseException:
                    os.close(fd)
                    with contextlib.suppress(OSError):
                        hidden.unlink()
                    raise
            else:
                fd = os.open(segment, os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_EXCL, 0o644)
                self._beat = LeaseKeeper(marker)
        except BaseException:
            with contextlib.suppress(OSError):
                marker.unlink()
            raise
        self._fd, self.path = fd, segment

    def close(self) -> None:
        """Release the segment: a replay can take it now."""
        with self._lock:
            if self._fd is None:
                return
            if self._beat is not None:
                self._beat.stop()
                self._beat = None
            with contextlib.suppress(OSError):
                marker_of(self.path).unlink()
            os.close(self._fd)  # releases the flock
            self._fd = None


@dataclass
class Pending:
    """What a spool holds that is not stored yet."""

    folder: Path
    points: dict[str, int] = field(default_factory=dict)  # per run id
    ends: set[str] = field(default_factory=set)  # runs whose end (tags, status) is spooled
    segments: int = 0
    live: int = 0  # segments a live process may still be writing
    set_aside: dict[str, tuple[int, str]] = field(default_factory=dict)  # run -> (points, reason)
    # spool files a person must look at: path -> why (moved aside, torn, cannot be read)
    unreadable: dict[str, str] = field(default_factory=dict)

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


def pending(tracking_uri: str) -> Pending:
    """The points and run ends waiting in the spool of ``tracking_uri``. Reads only: takes no
    lock (a replay beside it skips nothing), needs no write access, and a segment that a replay
    removes between the listing and the read is simply gone."""
    out = Pending(spool_dir(tracking_uri))
    for path in _segments(out.folder):
        try:
            got = spool_format.read(path)
        except FileNotFoundError:
            continue  # replayed meanwhile
        except OSError as err:
            out.unreadable[str(path)] = f"cannot be read ({first_line(err, strerror=True)})"
            continue
        out.segments += 1
        is_live = live(path)
        out.live += is_live
        if got.damaged and not is_live:
            out.unreadable[str(path)] = (f"{got.damaged} line(s) cannot be read (an append cut "
                                         f"short); the next replay moves it aside")
        for record in got.records:
            run = record.get("run")
            if "metrics" in record:
                out.points[run] = out.points.get(run, 0) + len(record["metrics"])
            elif "end" in record:
                out.ends.add(run)
    for path in _segments(out.folder / SET_ASIDE):
        with contextlib.suppress(FileNotFoundError):
            for record in spool_format.read(path).records:
                run = record.get("run")
                points, _ = out.set_aside.get(run, (0, ""))
                out.set_aside[run] = (points + len(record.get("metrics", ())),
                                      record.get("reason", "?"))
    for path in _segments(out.folder / DAMAGED):
        out.unreadable[str(path)] = ("moved aside by a replay: it holds line(s) that cannot be "
                                     "read (its whole records are stored); look, then remove it")
    return out


def _read_fd(fd: int) -> spool_format.Read:
    os.lseek(fd, 0, os.SEEK_SET)
    chunks = []
    while chunk := os.read(fd, 1 << 20):
        chunks.append(chunk)
    return spool_format.parse(b"".join(chunks))


def replay(tracking_uri: str, client) -> tuple[int, list[str]]:
    """Send every segment no live process holds to the store with ``client`` (an
    ``MlflowClient``), then delete it (or move it to ``damaged/`` when a line of it cannot be
    read). Returns (points sent, problems: one line per segment that could not be replayed,
    which stays for the next replay, or that was moved aside)."""
    sent, problems = 0, []
    folder = spool_dir(tracking_uri)
    if not _segments(folder):
        return 0, []
    try:
        how = locking(folder)
    except OSError as err:
        return 0, [f"{folder}: cannot take its segments ({first_line(err, strerror=True)}); "
                   f"make the folder writable or replay from a host that can write it"]
    aside = SpoolWriter(folder, tracking_uri)  # records the store will never take go here
    for path in _segments(folder):
        try:
            sent += _replay_segment(path, how, client, aside, problems)
        except OSError as err:  # the claim itself failed (not "held": that is no error)
            problems.append(f"{path}: cannot take it ({first_line(err, strerror=True)})")
    return sent, problems


def _replay_segment(path: Path, how: str, client, aside: SpoolWriter, problems: list) -> int:
    """Replay one segment if this process can claim it: the points it sent. A refusal (kept
    for the next replay) or a segment moved aside is one line in ``problems``."""
    from sweep.record.store_errors import is_permanent

    with claimed(path, how) as fd:
        if fd is None:
            return 0  # still being written, or another process replays it now
        count = 0
        try:
            got = _read_fd(fd)
            # points first, then ends: a run ends once it holds every point
            for record in sorted(got.records, key=lambda r: "end" in r):
                try:
                    count += _replay_record(client, record)
                except Exception as err:
                    if not is_permanent(err):
                        raise
                    aside.set_aside([record], first_line(err))  # skipped; the rest goes on
            if got.damaged:
                moved = _move_aside(path)
                problems.append(f"{path}: {got.damaged} line(s) cannot be read (an append cut "
                                f"short); its {len(got.records)} whole record(s) are stored "
                                f"and the segment moved aside to {moved}")
            else:
                path.unlink()
        except Exception as err:
            problems.append(f"{path}: {first_line(err)}")
            return 0
        return count


def _move_aside(path: Path) -> Path:
    """Move a segment holding unreadable lines to ``damaged/`` of its folder (never deleted)."""
    folder = path.parent / DAMAGED
    folder.mkdir(exist_ok=True)
    moved = folder / path.name
    os.replace(path, moved)
    return moved


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
    """Remove the records of ``run_ids`` from every spool file no live process holds, set-aside
    and moved-aside files included (``sweep delete``): a file left empty is deleted, one that
    holds other runs too is rewritten with theirs only (beside it, then renamed; lines that
    cannot be read go with the rewrite). Returns the records removed."""
    removed = 0
    folder = spool_dir(tracking_uri)
    files = _segments(folder) + _segments(folder / SET_ASIDE) + _segments(folder / DAMAGED)
    if not files:
        return 0
    how = locking(folder)
    for path in files:
        with claimed(path, how) as fd:
            if fd is None:
                continue  # a live writer's: the caller refuses studies with running trials
            got = _read_fd(fd)
            keep = [line for record, line in zip(got.records, got.lines)
                    if record.get("run") not in run_ids]
            if len(keep) == len(got.records):
                continue
            removed += len(got.records) - len(keep)
            if keep:
                tmp = path.with_name(f".{path.name}.tmp")
                tmp.write_bytes(b"".join(keep))
                os.replace(tmp, path)
            else:
                path.unlink()
    return removed
