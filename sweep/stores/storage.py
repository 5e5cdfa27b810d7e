"""Optuna storages from a URL, and the masking of credentials in any URL we print.

* ``sqlite:///path.db`` (the embedded default): WAL journal, a busy timeout
  (``SWEEP_BUSY_TIMEOUT_S``, 60 s) and heartbeats, so several local workers never crash on
  "database is locked".

The RDB storages are guarded (``guard.py``): in a worker, a storage that goes away (a server
restart, a lock held past the busy timeout) is waited for with the project's backoff.
* ``journal:///path/file.log``: Optuna's JournalStorage on a file (shared file systems).
* ``postgresql://user:pass@host/db``: the cluster storage (``pip install -e '.[postgres]'`` in the checkout).

Heartbeats (RDB storages): a trial whose worker died is failed after the grace period and its
parameters are re-enqueued by the one retry rule (``sweep.stores.retry``).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
from pathlib import Path
from urllib.parse import urlsplit

import optuna

from sweep.base.files import check_writable_file, creation_lock, path_lock
from sweep.base.urls import journal_path, local_file, mask_url, sqlite_path
from sweep.errors import StorageError
from sweep.stores.guard import Guarded, StorageGuard
from sweep.stores.retry import retry_later

DEFAULT_STORAGE = "sqlite:///sweep.db"
def heartbeat_settings() -> tuple[int, int]:
    """(interval, grace period) in seconds; ``SWEEP_HEARTBEAT_INTERVAL``/``SWEEP_GRACE_PERIOD``."""
    interval = int(os.environ.get("SWEEP_HEARTBEAT_INTERVAL", "15"))
    grace = int(os.environ.get("SWEEP_GRACE_PERIOD", str(4 * interval)))
    return interval, grace


class _SQLiteStates(optuna.storages.RDBStorage):
    """RDBStorage whose trial state changes are atomic between the processes of a host.

    Optuna checks and sets a trial's state in one session with ``SELECT ... FOR UPDATE``; SQLite
    has no row locks and pysqlite runs that SELECT outside any transaction, so two workers both
    read WAITING and both set RUNNING: the same enqueued trial (a retry, a confirmation
    replicate) was popped and trained by two workers at once (measured: 6 processes popping 60
    enqueued trials got 22-26 numbers twice; ``tests/test_storage_race.py``), and two workers
    failing one dead trial both re-enqueued it. A file lock around the check-and-set restores
    the atomicity PostgreSQL gives; SQLite stores are local files, so a host lock suffices."""

    def __init__(self, path: Path, url: str, **kwargs):
        self._path = path
        super().__init__(url, **kwargs)

    def set_trial_state_values(self, trial_id, state, values=None):
        with path_lock(self._path, "-state"):
            return super().set_trial_state_values(trial_id, state, values)


class _SQLiteStorage(Guarded, _SQLiteStates):
    """The SQLite storage, guarded (``guard``): the file lock is taken by each try, so no
    process holds it while the guard waits."""


class _ServerStorage(Guarded, optuna.storages.RDBStorage):
    """A database server's storage (PostgreSQL, MySQL), guarded (``guard``)."""


def busy_timeout_s() -> float:
    """How long a SQLite write waits for a lock another process holds before the guard's
    backoff takes over (``SWEEP_BUSY_TIMEOUT_S``, default 60). Raises StorageError."""
    text = os.environ.get("SWEEP_BUSY_TIMEOUT_S", "60")
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0 < value < float("inf"):
        raise StorageError(f"SWEEP_BUSY_TIMEOUT_S must be a number of seconds > 0, got {text!r}; "
                           f"fix or unset it")
    return value


@contextlib.contextmanager
def study_lock(url: str, study_name: str, purpose: str):
    """An exclusive lock on ``study_name``'s ``purpose`` between every process that uses the
    storage at ``url``, on any host that reaches it: a file lock for SQLite (a local file), the
    journal's own NFS-safe lock file beside a journal, an advisory lock on the database server
    for PostgreSQL/MySQL. For read-then-write steps Optuna has no transaction for, such as two
    ``sweep confirm`` runs enqueueing the same study's replicates at once."""
    key = f"sweep:{study_name}:{purpose}"
    sha = hashlib.sha1(key.encode())
    digest = sha.hexdigest()[:8]
    path = sqlite_path(url)
    if path is not None:
        with path_lock(path, "-" + digest):
            yield
        return
    journal = journal_path(url)
    if journal is not None:
        from optuna.storages.journal import JournalFileOpenLock

        lock = JournalFileOpenLock(f"{journal}.{digest}.lock")
        lock.acquire()  # waits; a lock file left by a crashed holder expires (grace period)
        try:
            yield
        finally:
            lock.release()
        return
    import sqlalchemy

    engine = sqlalchemy.create_engine(url, poolclass=sqlalchemy.pool.NullPool)
    try:
        with engine.connect() as conn:
            if conn.dialect.name == "postgresql":
                number = int.from_bytes(sha.digest()[:8], "big", signed=True)
                conn.exec_driver_sql(f"SELECT pg_advisory_lock({number})")
                try:
                    yield
                finally:
                    conn.exec_driver_sql(f"SELECT pg_advisory_unlock({number})")
            else:  # MySQL: a named lock, waited for without limit
                conn.exec_driver_sql("SELECT GET_LOCK(%s, -1)", (key[:64],))
                try:
                    yield
                finally:
                    conn.exec_driver_sql("SELECT RELEASE_LOCK(%s)", (key[:64],))
    finally:
        engine.dispose()


def check_storage_url(url: str) -> None:
    """Validate a storage URL without creating or writing anything."""
    scheme, journal = urlsplit(url).scheme, journal_path(url)
    if journal is not None:
        check_writable_file(journal, "journal file")
    elif scheme == "sqlite":
        path = sqlite_path(url)
        if path is None:
            raise StorageError(f"storage {url!r}: use sqlite:///PATH.db (a file, so workers share it)")
        check_writable_file(path, "SQLite storage")
        busy_timeout_s()
    elif scheme.startswith("postgresql") or scheme.startswith("mysql"):
        if not urlsplit(url).hostname and "host=" not in url:
            raise StorageError(f"storage {mask_url(url)!r}: no host; expected "
                               f"postgresql://USER:PASSWORD@HOST:PORT/DB")
    else:
        raise StorageError(f"storage {mask_url(url)!r}: unsupported URL; use sqlite:///PATH.db, "
                           f"journal:///PATH.log or postgresql://USER:PASSWORD@HOST/DB")


def _unreachable(url: str, err: Exception) -> StorageError:
    """The one line for a storage that cannot be opened (a missing driver module, or the
    server's or file's own complaint, credentials masked)."""
    if isinstance(err, ModuleNotFoundError):
        return StorageError(f"storage {mask_url(url)!r} needs the Python module {err.name!r}; "
                            f"install it with: pip install -e '.[postgres]' in the sweep checkout")
    reason = mask_url(str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__)
    return StorageError(f"storage {mask_url(url)!r} is unreachable: {reason}; check the URL, "
                        f"the server and the credentials")


def open_storage(url: str) -> optuna.storages.BaseStorage:
    """Open (creating if needed) the Optuna storage at ``url``. Raises StorageError."""
    check_storage_url(url)
    journal = journal_path(url)
    if journal is not None:
        from optuna.storages.journal import JournalFileBackend, JournalStorage

        return JournalStorage(JournalFileBackend(str(journal)))
    interval, grace = heartbeat_settings()
    # Heartbeats are marked experimental in Optuna; they are the documented way to recover from
    # dead workers (the CLI silences that warning). A stale trial is retried by sweep's one rule,
    # not Optuna's RetryHeartbeatStaleTrialCallback: that one would add a second retry to a
    # trial an interrupted worker had already re-enqueued, and copy every user attribute.
    kwargs = dict(heartbeat_interval=interval, grace_period=grace,
                  heartbeat_stale_trial_callback=retry_later)
    path = sqlite_path(url)
    guard = StorageGuard(mask_url(url))
    timeout = busy_timeout_s() if path is not None else None
    try:
        if path is not None:
            with creation_lock(path):
                storage = _SQLiteStorage(
                    path, url, engine_kwargs={"connect_args": {"timeout": timeout}},
                    guard=guard, **kwargs)
                with storage.engine.connect() as conn:  # WAL persists in the file once set
                    conn.exec_driver_sql("PRAGMA journal_mode=WAL")
            return storage
        connect = {"connect_timeout": 10}
        if urlsplit(url).scheme.startswith("postgresql"):
            # A server that vanished in a failover sends no reset: keepalives find the dead
            # connection (30 + 3 x 10 s), which the guard then waits out, instead of a call
            # that never returns.
            connect.update(keepalives=1, keepalives_idle=30, keepalives_interval=10,
                           keepalives_count=3)
        return _ServerStorage(url, engine_kwargs={"pool_pre_ping": True, "connect_args": connect},
                              guard=guard, **kwargs)
    except Exception as err:
        raise _unreachable(url, err) from None


def open_existing_storage(url: str):
    """Open an Optuna storage that must already exist; a missing SQLite/journal file is a
    StorageError (opening it would create an empty one)."""
    path = local_file(url)
    if path is not None and not path.is_file():
        raise StorageError(f"no Optuna storage at {path}: run `sweep launch` in this folder first, "
                           f"or pass --storage URL of the study's storage")
    return open_storage(url)


def load_existing_study(name: str, storage_url: str) -> optuna.Study:
    storage = open_existing_storage(storage_url)
    try:
        return optuna.load_study(study_name=name, storage=storage)
    except KeyError:
        names = sorted(s.study_name for s in optuna.get_all_study_summaries(storage, False))
        raise StorageError(f"no study {name!r} in storage {mask_url(storage_url)}; studies there: "
                           f"{', '.join(names) or 'none'} (see `sweep list`)") from None


def peek_study(name: str, url: str) -> optuna.Study | None:
    """The stored study ``name``, or None where the storage holds none (no file, no tables, no
    such study). Creates nothing: no file, no table, no pragma (``sweep launch --dry-run``).
    Raises StorageError for a bad URL or an unreachable server."""
    check_storage_url(url)
    path = local_file(url)
    if path is not None and not path.is_file():
        return None
    if journal_path(url) is not None:
        storage = open_storage(url)  # the file exists; reading it writes nothing
    else:
        import sqlalchemy

        engine = sqlalchemy.create_engine(url, poolclass=sqlalchemy.pool.NullPool)
        try:
            with engine.connect() as conn:
                if not sqlalchemy.inspect(conn).has_table("studies"):
                    return None
        except Exception as err:
            raise _unreachable(url, err) from None
        finally:
            engine.dispose()
        storage = optuna.storages.RDBStorage(url, skip_table_creation=True)
    try:
        return optuna.load_study(study_name=name, storage=storage)
    except KeyError:
        return None


def study_names(url: str) -> list[str]:
    """Names of the studies in the storage at ``url``, for shell completion: empty when it is
    unreachable, holds none, or is a SQLite/journal file that does not exist (never created)."""
    path = local_file(url)
    if path is not None and not path.is_file():
        return []
    try:
        if journal_path(url) is not None:
            storage = open_storage(url)
        else:  # no table creation; a server gets a short wait at most
            storage = optuna.storages.RDBStorage(
                url, skip_table_creation=True,
                engine_kwargs={} if path else {"connect_args": {"connect_timeout": 3}})
        return sorted(s.study_name for s in optuna.get_all_study_summaries(storage, False))
    except Exception:
        return []
