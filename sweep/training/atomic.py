"""Atomic file writes that hold on shared filesystems (NFS, Lustre): a temporary of its own
beside the target, flushed, renamed over it, the folder flushed after. Without torch, so the
commands that only read the stores (``sweep status``) can name the temporaries too."""

from __future__ import annotations

import os
import re
import secrets
import socket
from pathlib import Path
from typing import BinaryIO, Callable

TMP_SUFFIX = ".tmp"


def temporary_name(path: Path) -> Path:
    """``.NAME.HOST.PID.RANDOM.tmp`` beside ``path``: unique across the nodes sharing a folder
    (two nodes may run workers with equal pids)."""
    host = re.sub(r"[^\w.-]", "_", socket.gethostname())[:40] or "host"
    return path.with_name(f".{path.name}.{host}.{os.getpid()}.{secrets.token_hex(6)}{TMP_SUFFIX}")


def write_bytes_atomic(path: Path, write: Callable[[BinaryIO], None]) -> None:
    """``write(file)`` into a fresh temporary beside ``path`` (created exclusively, never through
    a symlink), flushed to disk, renamed over ``path`` (a link there is replaced, not followed),
    then the folder flushed: a kill at any moment leaves the previous file or the new one, and
    the rename survives a crash of the node. The temporary is removed if anything fails."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_name(path)
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0)
    fd = os.open(tmp, flags, 0o644)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    fsync_dir(path.parent)


def fsync_dir(folder: Path) -> None:
    """Flush ``folder``'s entries (a rename or unlink in it) to disk; a filesystem that cannot
    open folders for it (some network ones) is left as it is."""
    try:
        fd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
