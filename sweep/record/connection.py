"""The connection to one MLflow store: which tracking URIs are accepted, whether a server
answers, and the client itself (created once per store, under a lock for a fresh SQLite file)."""

from __future__ import annotations

import logging
import os

from sweep.base.files import check_writable_file, creation_lock
from sweep.base.stopping import stop_seconds
from sweep.base.text import first_line
from sweep.base.urls import mask_url, pinned_sqlite, sqlite_path
from sweep.errors import TrackingError
from sweep.record.metric_writer import backlog_points, spool_after_s
from sweep.record.store_errors import CREDENTIALS_FIX, is_credentials

DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"
# Every store call has a bound, so a hung store becomes an outage (retried, then spooled) rather
# than a writer that waits for ever while its queue grows: PostgreSQL gets TCP keepalives (a
# half-open connection is found in 30 + 3 x 10 s) and a statement timeout; a tracking server
# MLflow's HTTP timeout (``connect``); SQLite the driver's 5 s busy timeout (pysqlite's default).
PG_BOUNDS = {"keepalives": "1", "keepalives_idle": "30", "keepalives_interval": "10",
             "keepalives_count": "3", "options": "-c statement_timeout=60000"}


def check_tracking_uri(uri: str) -> None:
    """Validate a tracking URI (and the writer's ``SWEEP_SPOOL_AFTER_S``, ``SWEEP_STOP_S`` and
    ``SWEEP_BACKLOG_POINTS``) without creating anything. ``file:`` stores are refused: they have
    no primary key on metrics, so a retried or replayed write would store points twice."""
    spool_after_s()
    stop_seconds()
    backlog_points()
    path = sqlite_path(uri)
    if path is not None:
        check_writable_file(path, "MLflow store", TrackingError)
    elif uri.startswith(("http://", "https://")):
        check_server_answers(uri)
    elif uri.startswith("sqlite:"):
        raise TrackingError(f"tracking URI {mask_url(uri)!r}: use sqlite:///PATH.db")
    elif uri.startswith("file:") or "://" not in uri:
        raise TrackingError(f"tracking URI {mask_url(uri)!r}: MLflow's file store keeps no key "
                            f"on metrics, so a retried or replayed write would store points twice; "
                            f"use sqlite:///PATH.db or http://HOST:PORT of an MLflow server")
    elif not uri.startswith(("postgresql", "mysql", "databricks")):
        raise TrackingError(f"tracking URI {mask_url(uri)!r}: unsupported; use sqlite:///PATH.db "
                            f"or http://HOST:PORT of an MLflow server")


def check_server_answers(uri: str, timeout_s: float = 10) -> None:
    """Raise TrackingError when nothing listens at a tracking server's URL. Asked before any
    store is created, so a launch against a server that is down writes nothing; MLflow's own
    client would fail only after its retries (over 10 s) with a page of urllib3 text."""
    import socket
    import urllib.error
    import urllib.request
    from urllib.parse import urlsplit

    parts = urlsplit(uri)
    bare = parts._replace(netloc=parts.netloc.rpartition("@")[2], path=parts.path.rstrip("/"),
                          query="", fragment="")  # no credentials in the probe: /health needs none
    try:
        with urllib.request.urlopen(f"{bare.geturl()}/health", timeout=timeout_s):
            pass
    except urllib.error.HTTPError:
        pass  # something answers (a proxy, a login in front of /health): the client decides
    except (urllib.error.URLError, OSError) as err:
        reason = getattr(err, "reason", err)
        if isinstance(reason, (ConnectionError, socket.gaierror, TimeoutError)):
            raise TrackingError(f"no MLflow tracking server answers at {mask_url(uri)} "
                                f"({reason}); start it (mlflow server ...) or fix --tracking-uri "
                                f"/ MLFLOW_TRACKING_URI") from None


def client_uri(uri: str) -> str:
    """The URI the client connects with: ``uri`` plus the bounds of ``PG_BOUNDS`` for
    PostgreSQL (those the user did not set). Only the connection uses it: the spool and every
    message keep the user's spelling."""
    from urllib.parse import parse_qsl, urlencode, urlsplit

    parts = urlsplit(uri)
    if not parts.scheme.startswith("postgresql"):
        return uri
    query = dict(parse_qsl(parts.query, keep_blank_values=True))
    added = {k: v for k, v in PG_BOUNDS.items() if k not in query}
    return parts._replace(query=urlencode({**query, **added})).geturl() if added else uri


def _not_handled(record: logging.LogRecord) -> bool:
    """False for MLflow's traceback of a database error the writer handles: a SQL store that
    is away (``OperationalError``) becomes ``TEMPORARILY_UNAVAILABLE``, retried, then spooled,
    and says so in one line; MLflow's logger printed a page per refused call besides."""
    return not record.getMessage().startswith("SQLAlchemy database error")


def connect(uri: str):
    """An ``MlflowClient`` for ``uri`` (checked with ``check_tracking_uri``) that has answered
    one query. Raises TrackingError, one masked line, when the store cannot be used."""
    check_tracking_uri(uri)
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "30")
    # Over HTTP MLflow prints two "View run ... at" lines per ended run, after fetching the
    # run once more: a request on the trial's thread and clutter in every job's output.
    os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")
    from mlflow.tracking import MlflowClient

    logging.getLogger("mlflow.store.db.utils").addFilter(_not_handled)  # once: a set of filters
    path = sqlite_path(uri)
    try:
        if path is not None:
            # Creating a fresh MLflow SQLite store from several processes at once corrupts
            # it (alembic migrations race); serialise the first connection.
            with creation_lock(path):
                client = MlflowClient(tracking_uri=pinned_sqlite(uri))
                client.search_experiments(max_results=1)
        else:
            client = MlflowClient(tracking_uri=client_uri(uri))
            client.search_experiments(max_results=1)
    except Exception as err:
        fix = f"; {CREDENTIALS_FIX}" if is_credentials(err) else ""  # HTTP 401/403
        raise TrackingError(f"MLflow tracking URI {mask_url(uri)!r} cannot be used: "
                            f"{first_line(err)}{fix}") from None
    return client


def artifact_root(uri: str) -> str | None:
    """Where a new experiment keeps its artifacts: beside a SQLite store's file (None: the
    store's own default)."""
    path = sqlite_path(uri)
    return (path.resolve().parent / "mlartifacts").as_uri() if path is not None else None


def check_store_exists(uri: str) -> None:
    """Raise TrackingError when ``uri`` is a SQLite file that does not exist (commands that
    read a study's record must not create a fresh empty store)."""
    path = sqlite_path(uri)
    if path is not None and not path.is_file():
        raise TrackingError(f"no MLflow store at {path}: run `sweep launch` in this folder first, "
                            f"or pass --tracking-uri URI of the study's MLflow store")
