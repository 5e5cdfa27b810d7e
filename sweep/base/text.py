"""One way to turn an error into one line (the project's warnings and errors quote it), one
way to print a warning, and one way to read a number out of a name or a tag."""

from __future__ import annotations

import sys

from sweep.base.urls import mask_url


def first_line(err: BaseException, *, typed: bool = False, strerror: bool = False,
               limit: int = 300) -> str:
    """``err`` as one masked line of at most ``limit`` characters.

    The first non-empty line of the message, and the line after it when the first ends in a
    colon (a compiler's "backend='inductor' raised:" names no cause); store errors quote URLs,
    so passwords are masked. ``typed`` prefixes ``Type: ``; ``strerror`` takes an OSError's
    bare reason (``No space left on device``) instead of ``[Errno 28] ...: 'path'``. An empty
    message gives the type's name."""
    text = err.strerror if strerror and isinstance(err, OSError) and err.strerror else str(err)
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    line = ""
    if lines:
        line = f"{lines[0]} {lines[1]}" if lines[0].endswith(":") and len(lines) > 1 else lines[0]
    line = mask_url(line)[:limit]
    if typed:
        return f"{type(err).__name__}: {line}"
    return line or type(err).__name__


def warn(line: str) -> None:
    """``line`` on stderr as ``warning: LINE``, flushed (a job's log keeps it if it dies next)."""
    print(f"warning: {line}", file=sys.stderr, flush=True)


def number_in(text) -> int | None:
    """``text`` (a tag value, a file stem after its prefix) as a non-negative integer, or None
    when it is not one (no sign, no spaces: ``"12"`` -> 12, ``"12a"``/``None`` -> None)."""
    text = str(text)
    return int(text) if text.isascii() and text.isdigit() else None
