"""Which MLflow store errors pass and which never will (the writer, the spool's replay and a
trial's run start ask).

Transient: the store is away or busy (connection refused, a timeout, "database is locked", a
full disk, HTTP 429 and 5xx): wait and retry, then spool. Permanent: this write will never be
taken however often it is retried (a run deleted in the UI or through the API, a run no longer
active, a run hard-deleted so its foreign key is gone, any other HTTP 4xx): retrying it would
hold up every other run's points, so its points are set aside with the reason instead.
"""

from __future__ import annotations

import time
from typing import Callable, TypeVar

from sweep.base.backoff import MAX_WAIT_S, Backoff
from sweep.base.text import first_line

T = TypeVar("T")


def is_permanent(err: BaseException) -> bool:
    """True for an error that retrying cannot cure (see the module docstring)."""
    from mlflow.exceptions import MlflowException

    if isinstance(err, MlflowException):
        code = err.get_http_status_code()
        return 400 <= code < 500 and code != 429
    try:
        from sqlalchemy.exc import IntegrityError
    except ImportError:  # pragma: no cover - MLflow's SQL stores need SQLAlchemy
        return False
    return isinstance(err, IntegrityError)  # the direct insert: the run's row is gone


def is_read_only(err: BaseException) -> bool:
    """A SQLite store opened or mounted read-only: transient for points (the file may become
    writable; they spool meanwhile), but no run can start in it, so a trial fails loudly
    instead of waiting without end for a setting to be fixed."""
    return "readonly database" in str(err) or "read-only file system" in str(err).lower()


def wait_for_store(call: Callable[[], T], what: str, check: Callable[[], None] | None = None,
                   warn: Callable[[str], None] = print,
                   permanent: Callable[[BaseException], bool] = is_permanent) -> T:
    """``call()``, retried with backoff (0.5 s doubling to 10 s) while the store refuses it for
    a transient reason; a permanent error is raised at once. ``check`` runs between tries (a
    stop raises from it: a trial waiting for its run is then retried, its budget untouched).
    ``warn`` hears one line when the waiting starts and one when it ends; ``permanent`` says
    which errors are raised at once."""
    backoff, since = Backoff(), None
    while True:
        try:
            result = call()
        except Exception as err:
            if permanent(err):
                raise
            if since is None:
                since = time.monotonic()
                warn(f"MLflow store refused {what} ({first_line(err)}); waiting for it, "
                     f"retrying every {MAX_WAIT_S:g} s at most")
        else:
            if since is not None:
                warn(f"MLflow store took {what} after {time.monotonic() - since:.0f} s")
            return result
        until = time.monotonic() + backoff.next_wait()
        while time.monotonic() < until:
            if check is not None:
                check()
            time.sleep(min(0.2, max(0.0, until - time.monotonic())))
