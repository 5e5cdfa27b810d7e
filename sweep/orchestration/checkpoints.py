"""Trial checkpoints: where they live, what a file holds, when one is trusted, when it goes.

A trial (unfused, or a slot of a fused pack) writes its checkpoint at every epoch end except the
last, atomically (``sweep.training.checkpoint.write_atomic``), to

    CHECKPOINT_DIR/STUDY/trial-N.pt

where N is the number of the trial first started with these parameters (a retry writes to its
original's file: ``retry.RETRY_HISTORY``). CHECKPOINT_DIR is ``--checkpoint-dir`` (env
``SWEEP_CHECKPOINT_DIR``), by default ``sweep-checkpoints`` beside the Optuna store (its SQLite or
journal file; the working folder for a server storage): on a cluster, a folder every node sees.

A file holds ``format``, ``identity`` (what must match to resume), ``state`` (the training state,
``sweep.training.checkpoint``) and the trial's ``lrs`` and ``losses`` of every step so far (the
per-epoch metrics are the state's ``history``). A retry of an interrupted trial loads it, replays
those steps and epochs into its listeners (its MLflow run gets the whole curve from step 0, its
Optuna trial every epoch's intermediate value, its divergence monitor the state it had, a
function of the losses it heard) and trains on from the first unfinished epoch. A file that is
missing (when the interrupted trial had recorded one), unreadable, or written for another study,
search space, code version, configuration or device type is reported in one line and the retry
restarts from step 0. The file is removed when its trial finishes (complete, pruned, diverged,
failed), and kept when it is interrupted and retried.
"""

from __future__ import annotations

import hashlib
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Mapping, Sequence

import optuna

from sweep.orchestration.checkpoint_writer import CheckpointWriter
from sweep.orchestration.retry import CHECKPOINT_EPOCHS, FAILED_TRIAL, RETRY_HISTORY
from sweep.orchestration.storage import journal_path, sqlite_path

FORMAT = 1
DIR_NAME = "sweep-checkpoints"
RESUMED_AT_STEP = "sweep.resumed_at_step"  # MLflow tag and Optuna user attribute
STUDY_UID = "sweep.uid"  # study user attribute, set at creation: tells a re-created study apart
# Settings that change how a trial is run, not what it computes: a trial may resume under others.
_NOT_IDENTITY = ("fuse", "compile", "sync_every_steps")


def default_dir(storage_url: str) -> Path:
    """``sweep-checkpoints`` beside the storage's file, else in the working folder."""
    path = sqlite_path(storage_url) or journal_path(storage_url)
    return (path.resolve().parent if path is not None else Path.cwd()) / DIR_NAME


def original_number(system_attrs: Mapping, number: int) -> int:
    """The trial whose checkpoint file a trial uses: the first of its retry chain."""
    history = system_attrs.get(RETRY_HISTORY)
    return int(history[0]) if history else number


def _safe(name: str) -> str:
    return re.sub(r"[^\w.-]", "_", name) or "_"


class Record:
    """A training listener that keeps the LR and loss of every step it hears; replays them, with
    the per-epoch metrics, into other listeners."""

    def __init__(self, lrs: Sequence[float] = (), losses: Sequence[float] = ()):
        self.lrs, self.losses = list(lrs), list(losses)

    def on_steps(self, first_step: int, lrs: Sequence[float], losses: Sequence[float]) -> None:
        del self.lrs[first_step:], self.losses[first_step:]  # never twice, whatever happens
        self.lrs.extend(lrs)
        self.losses.extend(losses)

    def on_epoch_end(self, epoch: int, metrics: dict) -> None:
        pass  # the metrics are in the training state's history

    def replay(self, listeners: Sequence, history: Sequence[dict]) -> None:
        """Every recorded epoch again, in order, as training told it: its steps, then its end."""
        steps_per_epoch = len(self.lrs) // max(len(history), 1)
        for epoch, metrics in enumerate(history):
            first = epoch * steps_per_epoch
            lrs = self.lrs[first: first + steps_per_epoch]
            losses = self.losses[first: first + steps_per_epoch]
            for listener in listeners:
                listener.on_steps(first, lrs, losses)
            for listener in listeners:
                listener.on_epoch_end(epoch, dict(metrics))


@dataclass
class TrialCheckpoint:
    """One trial's checkpoint file: ``save`` is the training loop's ``checkpoint`` callback;
    ``resume`` the state to continue from (None: from step 0)."""

    path: Path
    identity: dict
    total_epochs: int
    on_saved: Callable[[int], None]  # told the finished epochs of each checkpoint written
    record: Record = field(default_factory=Record)
    resume: dict | None = None
    _warned: bool = False

    def save(self, state: dict) -> None:
        from sweep.training.checkpoint import write_atomic

        epochs, steps = state["epochs"], state["steps"]
        if epochs >= self.total_epochs:
            return  # the trial ends now: nothing would be left to resume
        payload = {"format": FORMAT, "identity": self.identity, "state": state,
                   "lrs": self.record.lrs[:steps], "losses": self.record.losses[:steps]}
        try:
            write_atomic(self.path, payload)
        except OSError as err:  # a full or read-only disk costs the resume, not the trial
            if not self._warned:
                print(f"warning: checkpoint {self.path} not written ({err.strerror or err}); "
                      f"the trial trains on, but an interruption will restart it from step 0",
                      file=sys.stderr, flush=True)
                self._warned = True
            return
        self.on_saved(epochs)

    def remove(self) -> None:
        try:
            self.path.unlink(missing_ok=True)
        except OSError:
            pass  # a read-only folder: the file is stale, and refused once its trial is done

    def replay(self, listeners: Sequence) -> None:
        """The resumed steps and epochs into ``listeners`` (may raise what they raise)."""
        self.record.replay(listeners, self.resume["history"])


@dataclass(frozen=True)
class CheckpointDir:
    """The checkpoint folder of the trials a worker runs, and the process's one writer of it
    (``checkpoint_writer``: saves and removals run there, off the training thread)."""

    root: Path
    code_version: str
    device_type: str
    log: Callable[[str], None] = lambda line: print(line, file=sys.stderr, flush=True)
    writer: CheckpointWriter = field(default_factory=CheckpointWriter, compare=False, repr=False)

    def path(self, study_name: str, original: int) -> Path:
        return self.root / _safe(study_name) / f"trial-{original}.pt"

    def open(self, trial: optuna.Trial, cfg, on_saved: Callable[[int], None]) -> TrialCheckpoint:
        """The checkpoint of ``trial`` (config ``cfg``): for a retry, loaded and checked (a
        problem is one line through ``log``, and the retry starts from step 0)."""
        study, storage = trial.study, trial.study._storage
        system_attrs = storage.get_trial_system_attrs(trial._trial_id)
        original = original_number(system_attrs, trial.number)
        identity = self._identity(study, original, cfg)
        found = TrialCheckpoint(self.path(study.study_name, original), identity,
                                cfg.train.epochs, on_saved)
        failed = system_attrs.get(FAILED_TRIAL)
        if failed is None:
            return found  # a fresh trial: whatever is in the file is not its own
        expected = _recorded_epochs(study, failed)
        self.writer.wait_for(found.path)  # never read a file while a write of it is pending
        payload, problem = _load(found.path, identity, expected)
        if problem:
            self.log(f"trial {trial.number} (a retry of trial {failed}): {problem}; it restarts "
                     f"from step 0")
            return found
        if payload is not None:
            state = payload["state"]
            found.resume = state
            found.record = Record(payload["lrs"], payload["losses"])
        return found

    def discard(self, study_name: str, system_attrs: Mapping, number: int) -> None:
        """Remove the checkpoint of a trial that will not be retried (after any pending
        write of it)."""
        self.writer.remove(self.path(study_name, original_number(system_attrs, number)))

    def _identity(self, study: optuna.Study, original: int, cfg) -> dict:
        attrs = study.user_attrs
        space = hashlib.sha256(str(attrs.get("sweep.space", "")).encode()).hexdigest()[:16]
        config = {k: v for k, v in cfg.flat_params().items() if k not in _NOT_IDENTITY}
        return {"study": study.study_name, "study_uid": attrs.get(STUDY_UID, ""), "space": space,
                "code": self.code_version, "trial": original, "device": self.device_type,
                "config": config}


def _recorded_epochs(study: optuna.Study, number: int) -> int | None:
    """The epochs of the checkpoint trial ``number`` said it wrote last (None: none)."""
    storage = study._storage
    try:
        trial_id = storage.get_trial_id_from_study_id_trial_number(study._study_id, number)
        return storage.get_trial(trial_id).user_attrs.get(CHECKPOINT_EPOCHS)
    except KeyError:
        return None


_WHAT = {"study": "another study", "study_uid": "an earlier study of the same name",
         "space": "another search space", "code": "another code version", "trial": "another trial",
         "device": "another device type", "config": "another configuration"}


def _load(path: Path, identity: Mapping, expected: int | None) -> tuple[dict | None, str | None]:
    """(payload, None) for a checkpoint to resume from; (None, None) when there is none and
    none was expected; (None, problem) otherwise."""
    from sweep.training.checkpoint import check_state, read

    if not path.is_file():
        return None, (f"its checkpoint {path} (epoch {expected}) is missing" if expected else None)
    try:
        payload = read(path)
        if payload.get("format") != FORMAT:
            raise ValueError(f"format {payload.get('format')!r}, not {FORMAT}")
        check_state(payload["state"])
        if len(payload["lrs"]) != payload["state"]["steps"] or \
                len(payload["losses"]) != len(payload["lrs"]):
            raise ValueError("its step record does not match its state")
    except (ValueError, KeyError, TypeError) as err:
        return None, f"checkpoint {path} is corrupt ({err})"
    saved = payload["identity"]
    for key, what in _WHAT.items():
        if saved.get(key) != identity.get(key):
            detail = _difference(saved.get(key), identity.get(key)) if key != "config" else \
                _config_difference(saved.get(key) or {}, identity["config"])
            return None, f"checkpoint {path} was written for {what} ({detail})"
    return payload, None


def _difference(saved, now) -> str:
    return f"{saved!r}, this is {now!r}"


def _config_difference(saved: Mapping, now: Mapping) -> str:
    key = next((k for k in sorted({*saved, *now}) if saved.get(k) != now.get(k)), "?")
    return f"{key} {saved.get(key)!r}, now {now.get(key)!r}"


def waiting_with_checkpoint(trials) -> list[tuple[int, int]]:
    """(waiting trial, epochs of the checkpoint it will resume from) for each waiting retry whose
    interrupted trial recorded one; from the stores alone (``sweep status``)."""
    by_number = {t.number: t for t in trials}
    out = []
    for t in trials:
        failed = t.system_attrs.get(FAILED_TRIAL)
        if t.state != optuna.trial.TrialState.WAITING or failed not in by_number:
            continue
        epochs = by_number[failed].user_attrs.get(CHECKPOINT_EPOCHS)
        if epochs:
            out.append((t.number, int(epochs)))
    return out


def resolve_dir(given: str | None, storage_url: str) -> Path:
    """``--checkpoint-dir`` as given (made absolute), else the default beside the storage.
    Raises CheckpointError when it could not be written (it is created at the first save)."""
    import os

    from sweep.errors import CheckpointError

    folder = Path(given).expanduser().resolve() if given else default_dir(storage_url)
    existing = next(p for p in (folder, *folder.parents) if p.exists())
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        raise CheckpointError(f"checkpoint folder {folder} cannot be written ({existing} is not a "
                              f"writable folder); pass --checkpoint-dir DIR")
    return folder

