"""Which MLflow store errors pass, which never will, and which are the credentials (the writer,
the spool's replay and a trial's run start ask).

Three classes, each with its cost (``docs/record.md``, "What each store error costs"):

* **Permanent**: the run itself can never take this write however often it is retried: the
  run (or its experiment) does not exist (MLflow's own ``RESOURCE_DOES_NOT_EXIST``: a row gone,
  a run hard-deleted), it is not active (deleted in the UI or through the API: MLflow's
  ``INVALID_PARAMETER_VALUE``, the code of MLflow's own checks of what it is sent), or the
  direct insert's foreign key is gone (``IntegrityError``). Retrying would hold up every other
  run's points, so that run's points are set aside with the reason (replayable once the run is
  restored: ``sweep status --repair``).
* **Credentials refused**: HTTP 401/403 (an expired token, a wrong password, a role without
  write access): nothing this process sends will pass until a person fixes them, but nothing is
  wrong with the runs. The writer spools at once and keeps every point; a run start stops the
  worker (``CredentialsRefused``) instead of failing trial after trial.
* **Transient**: everything else: the store is away or busy (connection refused, a timeout,
  "database is locked", a full disk, HTTP 408, 429 and 5xx), a proxy answering 404 during a
  redeploy (MLflow makes ``ENDPOINT_NOT_FOUND`` of a 404 without MLflow's own error body, so it
  is never mistaken for a run that is gone), and for SQL stores the ``BAD_REQUEST`` MLflow
  makes of every SQLAlchemy error that is not an ``OperationalError`` (a pool ``TimeoutError``,
  PostgreSQL's read-only error during a failover, an ``InterfaceError``): wait and retry, then
  spool.
"""

from __future__ import annotations

import time
from typing import Callable, TypeVar

from sweep.base.backoff import MAX_WAIT_S, Backoff
from sweep.base.text import first_line
from sweep.base.urls import mask_url
from sweep.errors import CredentialsRefused

T = TypeVar("T")

# MLflow's error codes (mlflow.protos.databricks_pb2), by name: the module is imported lazily.
CREDENTIAL_CODES = ("UNAUTHENTICATED", "CUSTOMER_UNAUTHORIZED", "PERMISSION_DENIED")
# Codes only MLflow itself answers with (never derived from a bare HTTP status, which gives
# ENDPOINT_NOT_FOUND for 404 and BAD_REQUEST for 400): its checks of the run and of the values.
PERMANENT_CODES = ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE")
CREDENTIALS_FIX = ("fix the credentials (MLFLOW_TRACKING_TOKEN, or MLFLOW_TRACKING_USERNAME and "
                   "MLFLOW_TRACKING_PASSWORD; the role's write permission on the experiment)")


def _code(err: BaseException) -> str | None:
    """MLflow's error code name of ``err`` (``RESOURCE_DOES_NOT_EXIST``; None: not an
    ``MlflowException``)."""
    from mlflow.exceptions import MlflowException

    if not isinstance(err, MlflowException):
        return None
    return str(err.error_code)  # MLflow keeps the code's name


def is_credentials(err: BaseException) -> bool:
    """True for HTTP 401/403: the store refuses this process's credentials."""
    return _code(err) in CREDENTIAL_CODES


def is_permanent(err: BaseException) -> bool:
    """True for an error that retrying cannot cure (see the module docstring)."""
    code = _code(err)
    if code is not None:
        return code in PERMANENT_CODES
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


def credentials_refused(err: BaseException, what: str) -> CredentialsRefused:
    """The one line a worker stops with when the store refuses its credentials for ``what``."""
    return CredentialsRefused(mask_url(
        f"MLflow store refused this process's credentials for {what} ({first_line(err)}): the "
        f"worker stops; its trials are retried by the next launch and every queued point is "
        f"stored or spooled; {CREDENTIALS_FIX}, then launch again"))


def wait_for_store(call: Callable[[], T], what: str, check: Callable[[], None] | None = None,
                   warn: Callable[[str], None] = print,
                   permanent: Callable[[BaseException], bool] = is_permanent) -> T:
    """``call()``, retried with backoff (0.5 s doubling to 10 s) while the store refuses it for
    a transient reason; a permanent error is raised at once, and credentials refused (HTTP
    401/403) as ``CredentialsRefused`` (one line naming the fix). ``check`` runs between tries
    (a stop raises from it: a trial waiting for its run is then retried, its budget untouched).
    ``warn`` hears one line when the waiting starts and one when it ends; ``permanent`` says
    which errors are raised at once."""
    backoff, since = Backoff(), None
    while True:
        try:
            result = call()
        except Exception as err:
            if is_credentials(err):
                raise credentials_refused(err, what) from None
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
