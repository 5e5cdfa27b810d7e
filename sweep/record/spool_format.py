"""How a spool file is written and read back: one record per line, each line framed so that a
torn or damaged line is found instead of glued to the next or silently skipped.

A line is the record's compact JSON (which never holds a raw tab: JSON escapes it), a tab, the
CRC-32 of the JSON's UTF-8 bytes as 8 lower-case hex digits, and a newline:
``{"run":"ab12","metrics":[...]}\\t1a2b3c4d\\n``. A line without the tab is a record of the format
before framing (plain JSON lines, spools written before 2026-12-07) and is read as before. A
line whose checksum does not match, that is not a JSON object, or a last line without its
newline (an append cut short by a crash) cannot be read: ``Read.damaged`` counts it.

An append that fails part-way (a full disk, ``ulimit -f``, a signal) cuts the file back to its
length before the append and raises; where even that fails, the next append first ends the torn
line, so a whole record is never glued to a torn one.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import zlib
from dataclasses import dataclass, field
from pathlib import Path


def encode(records: list[dict]) -> bytes:
    """The framed lines of ``records``."""
    out = []
    for record in records:
        text = json.dumps(record, separators=(",", ":")).encode()
        out.append(text + b"\t%08x\n" % zlib.crc32(text))
    return b"".join(out)


@dataclass
class Read:
    """What a spool file holds: its whole records, in order, and the count of lines that could
    not be read (torn, damaged)."""

    records: list[dict] = field(default_factory=list)
    damaged: int = 0
    lines: list[bytes] = field(default_factory=list)  # each whole record's line, as stored


def parse(data: bytes) -> Read:
    """The records framed (or plain JSON lines) in ``data``."""
    out = Read()
    *lines, tail = data.split(b"\n")  # tail: b"" when the data ends with a newline
    for line in lines:
        record = decode(line)
        if record is None:
            out.damaged += bool(line.strip())  # an empty line is the end of a torn one
        else:
            out.records.append(record)
            out.lines.append(line + b"\n")
    out.damaged += bool(tail)
    return out


def read(path: Path) -> Read:
    """``parse`` of a file's bytes, read without a lock and without write access. Raises
    ``FileNotFoundError`` when it is gone (a replay took it between a listing and the read)."""
    with open(path, "rb") as f:
        return parse(f.read())


def decode(line: bytes) -> dict | None:
    """One line's record, or None when it cannot be read."""
    body, tab, crc = line.rpartition(b"\t")
    if not tab:
        body = line  # the format before framing
    elif crc != b"%08x" % zlib.crc32(body):
        return None
    try:
        record = json.loads(body)
    except ValueError:
        return None
    return record if isinstance(record, dict) else None


def append(fd: int, data: bytes) -> None:
    """Append ``data`` to the file open (read and write, ``O_APPEND``) as ``fd`` and fsync it;
    once this returns the data survives a crash. On any failure the file is cut back to its
    length before the call and the error raised: an append never reports success it did not
    have, and never leaves half a record behind (where the cut fails too, the next append ends
    the torn line first)."""
    start = os.fstat(fd).st_size
    if start and os.pread(fd, 1, start - 1) != b"\n":
        data = b"\n" + data  # an earlier append was cut short and could not be cut back
    try:
        view = memoryview(data)
        while view:
            written = os.write(fd, view)
            if written <= 0:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            view = view[written:]
        os.fsync(fd)
    except BaseException:
        with contextlib.suppress(OSError):
            os.ftruncate(fd, start)
            os.fsync(fd)
        raise


def append_file(path: Path, records: list[dict]) -> None:
    """``append`` to the file at ``path`` (created when missing)."""
    fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        append(fd, encode(records))
    finally:
        os.close(fd)
