"""Store URLs: the file behind a SQLite or journal URL, and the masking of every password in a
URL before it is printed or logged. Shared by the Optuna storage and the MLflow record."""

from __future__ import annotations

import re
from pathlib import Path
from urllib.parse import urlsplit

_PASSWORD_IN_NETLOC = re.compile(r"(?P<head>[a-zA-Z][\w+.-]*://[^/:@\s]*:)(?P<pw>[^@\s]*)(?=@)")
_PASSWORD_IN_QUERY = re.compile(r"(?P<head>[?&;](?:password|passwd|pwd|token)=)(?P<pw>[^&;\s]*)",
                                re.IGNORECASE)


def mask_url(text: str) -> str:
    """Hide every password in ``text``: ``postgresql://u:secret@h/db`` -> ``postgresql://u:***@h/db``."""
    text = _PASSWORD_IN_NETLOC.sub(lambda m: m.group("head") + "***", text)
    return _PASSWORD_IN_QUERY.sub(lambda m: m.group("head") + "***", text)


def sqlite_path(url: str) -> Path | None:
    """The file behind a ``sqlite:///`` URL (None for other schemes or in-memory)."""
    if not url.startswith("sqlite:///"):
        return None
    path = url[len("sqlite:///"):]
    if path.startswith("file:"):  # SQLite URI form, e.g. sqlite:///file:/x.db?mode=ro&uri=true
        path = path[len("file:"):].split("?", 1)[0]
    return None if path in ("", ":memory:") else Path(path)


def pinned_sqlite(url: str) -> str:
    """``url`` with a relative SQLite file made absolute (``sqlite:///mlflow.db`` ->
    ``sqlite:////work/mlflow.db``); any other URL unchanged. For MLflow clients: MLflow keeps
    one store per URI string for the life of the process, so after a ``chdir`` (a notebook, a
    second in-process launch elsewhere) a relative URI would go on naming the first folder's
    file."""
    path = sqlite_path(url)
    if path is None or path.is_absolute() or url.startswith("sqlite:///file:"):
        return url
    return f"sqlite:///{path.resolve()}"


def journal_path(url: str) -> Path | None:
    """The file behind a ``journal:///`` URL (None for other schemes)."""
    return Path(url[len("journal://"):]) if url.startswith("journal:///") else None


def local_file(url: str) -> Path | None:
    """The local file behind a SQLite or journal URL; None for a server."""
    return sqlite_path(url) or journal_path(url)


_DEFAULT_PORTS = {"postgresql": 5432, "mysql": 3306, "http": 80, "https": 443}


def store_identity(url: str) -> str:
    """One name per store, however its URL is spelled, with nothing secret in it.

    A local file (SQLite, journal) is ``file:`` and its absolute path; a server is its scheme
    without the driver alias (``postgresql+psycopg2`` -> ``postgresql``), the host in lower
    case, the port (the scheme's default when none is given) and the database or path without
    a trailing ``/``: no user, no password, no query (``?sslmode=``, ``?password=``). Folders
    that must be the same for every worker of a study (checkpoints, the spool) are named from
    this, and it may be written to shared files."""
    path = local_file(url)
    if path is not None:
        return f"file:{path.expanduser().resolve()}"
    parts = urlsplit(url)
    scheme = parts.scheme.split("+", 1)[0].lower()
    try:
        port = parts.port
    except ValueError:  # a port that is not a number: keep the text, still without credentials
        port = None
    port = port or _DEFAULT_PORTS.get(scheme)
    host = (parts.hostname or "").lower()
    where = f"{host}:{port}" if port else host
    return f"{scheme}://{where}{parts.path.rstrip('/')}"
