"""Which code ran: the package version and the git commit (on every trial run and the parent)."""

from __future__ import annotations

import subprocess
from pathlib import Path

#: the package version, here (``sweep.__version__`` reads it) so that no module of sweep imports
#: the package root, which imports ``sweep.api`` on demand (keep it equal to pyproject.toml's)
__version__ = "0.1.0"


def code_version() -> str:
    """The package version and, when run from a git checkout, its commit."""
    try:
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                             text=True, timeout=5, cwd=Path(__file__).parent).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        sha = ""
    return f"{__version__}+{sha}" if sha else __version__
