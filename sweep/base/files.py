"""Checks and locks on local store files, shared by the Optuna storage and the MLflow record."""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import tempfile
from pathlib import Path

from sweep.errors import StorageError


def check_writable_file(path: Path, what: str, error=StorageError) -> None:
    """Raise ``error`` unless ``path`` can be created or written; creates nothing."""
    parent = path.parent if str(path.parent) else Path(".")
    if path.exists():
        if not os.access(path, os.W_OK):
            raise error(f"{what} {path} is not writable; fix its permissions or choose another")
        return
    if not parent.is_dir():
        raise error(f"{what} {path}: folder {parent} does not exist; create it or choose another")
    if not os.access(parent, os.W_OK):
        raise error(f"{what} {path}: folder {parent} is not writable; choose another")


@contextlib.contextmanager
def path_lock(path: Path, purpose: str):
    """An exclusive lock between the processes of this host, one per store file and purpose."""
    # The lock lives in the temp folder, keyed by the store's absolute path, so that the
    # user's folder holds only the store itself.
    digest = hashlib.sha1(str(path.resolve()).encode()).hexdigest()[:16]
    lock_path = Path(tempfile.gettempdir()) / f"sweep-{digest}{purpose}.lock"
    with open(lock_path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def creation_lock(path: Path):
    """Serialise the creation of a store file across processes (fresh-store migrations race)."""
    return path_lock(path, "")
