"""Reading a trial's checkpoint file and judging it: readable, whole, written for this trial's
identity (study, search space, code version, trial, device type, configuration) and not older
than the epochs its trial recorded. Every problem is one line saying why; the caller restarts the
trial from step 0 with it (``checkpoints.CheckpointDir.open``)."""

from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import Mapping

from sweep.base.text import first_line

FORMAT = 1  # of the file's payload: a file of another format is refused, never guessed at


_WHAT = {"study": "another study", "study_uid": "an earlier study of the same name",
         "space": "another search space", "code": "another code version", "trial": "another trial",
         "device": "another device type", "config": "another configuration"}


def load_checked(path: Path, identity: Mapping, expected: int | None) -> tuple[dict | None, str | None]:
    """(payload, None) for a checkpoint to check further; (None, None) when there is none and
    none was expected; (None, problem) otherwise. ``expected``: the epochs its trial recorded;
    the file may be ahead of it (the note follows the write: a kill between them, or a note
    the storage refused while the file was written), never behind (an older file)."""
    from sweep.training.checkpoint import check_state, read

    try:
        is_file = stat.S_ISREG(os.stat(path).st_mode)
    except FileNotFoundError:
        return None, (f"its checkpoint {path} (epoch {expected}) is missing" if expected else None)
    except OSError as err:  # ESTALE on NFS, EACCES, an I/O error: one line, from step 0
        return None, f"checkpoint {path} cannot be opened ({first_line(err, typed=True)})"
    if not is_file:
        return None, f"checkpoint {path} cannot be opened (not a regular file)"
    try:
        payload = read(path)
        if payload.get("format") != FORMAT:
            raise ValueError(f"format {payload.get('format')!r}, not {FORMAT}")
        check_state(payload["state"])
        if len(payload["lrs"]) != payload["state"]["steps"] or \
                len(payload["losses"]) != len(payload["lrs"]):
            raise ValueError("its step record does not match its state")
        saved = dict(payload["identity"])
    except (ValueError, KeyError, TypeError) as err:
        return None, f"checkpoint {path} is corrupt ({err})"
    for key, what in _WHAT.items():
        if saved.get(key) != identity.get(key):
            detail = _difference(saved.get(key), identity.get(key)) if key != "config" else \
                _config_difference(saved.get(key) or {}, identity["config"])
            return None, f"checkpoint {path} was written for {what} ({detail})"
    epochs = payload["state"]["epochs"]
    if not isinstance(epochs, int) or epochs < (expected or 0):
        return None, (f"checkpoint {path} holds {epochs!r} epochs, older than the {expected} its "
                      f"trial recorded")
    return payload, None


def _difference(saved, now) -> str:
    return f"{saved!r}, this is {now!r}"


def _config_difference(saved: Mapping, now: Mapping) -> str:
    key = next((k for k in sorted({*saved, *now}) if saved.get(k) != now.get(k)), "?")
    return f"{key} {saved.get(key)!r}, now {now.get(key)!r}"
