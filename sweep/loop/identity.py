"""A study is one experiment: the settings that decide what a trial's number means.

Beside the search space (``sweep.space``, checked by ``worker.open_study``), a study stores the
settings it was created with as its identity: every ``train.*`` key but ``fuse`` (a fused trial
is the same computation as an unfused one: docs/packs.md), every ``data.*``, ``objective.*``,
``divergence.*`` and ``pruner.*`` key, and the seed the sampler draws from. A relaunch, worker,
submission or confirmation whose study file and ``--set`` flags give other values would mix
two experiments in one study (3-epoch and 30-epoch trials ranked together; a budget stored by
the shrunk copy), so it is refused with the first differing key, unless
``--allow-config-change`` says the change is meant: it is then recorded in the study
(``sweep.config_changes``) as a space change is.

Keys are compared from the typed specs (defaults resolved, so writing a default out changes
nothing). A key one side lacks is not compared: a setting added by a later sweep version does
not make an older study "changed"; a study created before this rule adopts its identity on its
first open.
"""

from __future__ import annotations

import dataclasses
import json
import time
from typing import Any, Mapping

from sweep.errors import ConfigChangedError
from sweep.study.specs import StudySpec

IDENTITY = "sweep.identity"  # study user attribute: the flat settings below, as JSON values
CHANGES = "sweep.config_changes"  # study user attribute: the accepted changes, oldest first
NOT_PART = {"train.fuse"}


def _flat(prefix: str, value: Any, out: dict) -> None:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        value = {f.name: getattr(value, f.name) for f in dataclasses.fields(value)}
    if isinstance(value, Mapping):
        for key, inner in value.items():
            _flat(f"{prefix}.{key}", inner, out)
        if not value:
            out[prefix] = {}
        return
    if isinstance(value, tuple):
        value = list(value)
    out[prefix] = json.loads(json.dumps(value, default=str))  # what the storage gives back


def _as_written(pruner) -> dict:
    """A pruner spec keyed as a study file writes it (``pruner.n_warmup_steps``)."""
    if pruner is None:
        return {}
    return {"type": pruner.type, **dict(pruner.params), "per": pruner.per,
            "wrapped": _as_written(pruner.wrapped) if pruner.wrapped else None}


def identity_of(spec: StudySpec) -> dict[str, Any]:
    """``{"train.epochs": 30, "data.train_size": 48000, ..., "seed": 0}`` for ``spec``."""
    out: dict[str, Any] = {"seed": spec.seed}
    for section in ("train", "data", "objective", "divergence"):
        _flat(section, getattr(spec, section), out)
    _flat("pruner", _as_written(spec.pruner), out)
    return {key: value for key, value in out.items() if key not in NOT_PART}


def differences(stored: Mapping[str, Any],
                current: Mapping[str, Any]) -> list[tuple[str, Any, Any]]:
    """``(key, stored value, current value)`` for every key both sides have and disagree on,
    in sorted key order."""
    return [(key, stored[key], current[key]) for key in sorted(set(stored) & set(current))
            if stored[key] != current[key]]


def _text(value: Any) -> str:
    return json.dumps(value) if not isinstance(value, str) else value


def check_identity(study, spec: StudySpec, allow_change: bool = False) -> bool:
    """Store ``spec``'s identity in a study that has none; refuse (``ConfigChangedError``) or,
    with ``allow_change``, record and adopt one that differs (then True). ``study`` is an
    Optuna study."""
    current = identity_of(spec)
    stored = study.user_attrs.get(IDENTITY)
    if stored is None:
        study.set_user_attr(IDENTITY, current)
        return False
    changed = differences(stored, current)
    if not changed:
        if set(current) - set(stored):  # keys a newer sweep added: remember them from now on
            study.set_user_attr(IDENTITY, {**current, **stored})
        return False
    key, old, new = changed[0]
    if not allow_change:
        more = f" (and {len(changed) - 1} more)" if len(changed) > 1 else ""
        raise ConfigChangedError(
            f"study {spec.name!r} was created with {key}={_text(old)}, but {spec.path} and the "
            f"--set flags now give {key}={_text(new)}{more}: its trials would not be comparable; "
            f"use another study name (--set name=NEW), restore the setting, or pass "
            f"--allow-config-change")
    history = list(study.user_attrs.get(CHANGES, []))
    history.append({"at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                    "changed": {k: {"from": o, "to": n} for k, o, n in changed}})
    study.set_user_attr(CHANGES, history)
    study.set_user_attr(IDENTITY, {**stored, **current})
    return True
