"""Trial checkpoints: where they live, what a file holds, when one is trusted, who may write
or remove it, when it goes (the rules for users: docs/checkpoints.md).

A trial (unfused, or a slot of a fused pack) writes its checkpoint at every epoch end except the
last, atomically (``sweep.training.checkpoint.write_atomic``), to

    CHECKPOINT_DIR/STUDY-HASH/trial-N.pt

where HASH is the study's identity (its storage, study id and creation uid, hashed:
``study_folder``) so two studies never share or escape a folder, and N is the number of the
trial first started with these parameters (a retry writes to its original's file:
``retry.RETRY_HISTORY``). Beside the files, ``study.json`` names the study the folder belongs to
(``sweep status`` tells a deleted study's folder by it). CHECKPOINT_DIR is ``--checkpoint-dir``
(env ``SWEEP_CHECKPOINT_DIR``), by default ``sweep-checkpoints`` beside the Optuna store (its
SQLite or journal file; the working folder for a server storage): on a cluster, a folder every
node sees.

A file holds ``format``, ``identity`` (what must match to resume), ``state`` (the training state,
``sweep.training.checkpoint``) and the trial's ``lrs`` and ``losses`` of every step so far (the
per-epoch metrics are the state's ``history``). A retry of an interrupted trial loads it, checks
it (identity, counts, the epochs its trial recorded, that it restores into the trial's model and
optimizer), replays those steps and epochs into its listeners (its MLflow run gets the whole
curve from step 0, its Optuna trial every epoch's intermediate value, its divergence monitor the
state it had) and trains on from the first unfinished epoch. Any problem opening, reading or
checking a file (an OSError such as ESTALE or EACCES, a storage error reading the epochs its
trial recorded, a corrupt file) is one line naming the file and the cause, and a restart from
step 0 of that trial alone; any problem writing one is a warning and training goes on. Only the
trial that owns a file (its Optuna trial is RUNNING) writes it: a stalled worker whose trial was
failed meanwhile leaves its retry's file alone. The file leaves with its trial
(``loop.lifecycle``): removed once the trial is told (complete, pruned, diverged, failed) or
not retried, kept while it is re-enqueued; ``sweep status`` lists files of no live trial
(``orphans``) and ``--repair`` removes them (the safety net).
"""

from __future__ import annotations

import hashlib
import json
import re
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Mapping, Sequence

import optuna

from sweep.stores.checkpoint_load import FORMAT, load_checked
from sweep.stores.checkpoint_writer import CheckpointWriter
from sweep.base.text import first_line, number_in
from sweep.stores.retry import CHECKPOINT_EPOCHS, FAILED_TRIAL, RESUMED_EPOCHS, RETRY_HISTORY
from sweep.base.urls import local_file, store_identity
from sweep.training.atomic import TMP_SUFFIX, temporary_name, write_bytes_atomic

DIR_NAME = "sweep-checkpoints"
RESUMED_AT_STEP = "sweep.resumed_at_step"  # MLflow tag and Optuna user attribute
STUDY_UID = "sweep.uid"  # study user attribute, set at creation: tells a re-created study apart
MANIFEST = "study.json"  # in each study folder: whose files these are
# A temporary older than the oldest running trial by this much belongs to no live writer (the
# margin covers clocks of the nodes and the file server that differ by a little).
TMP_MARGIN_S = 60.0
# A temporary not written to for this long belongs to no live writer either, whatever trial is
# RUNNING (one stuck RUNNING must not pin the sweep): a write's bytes move its mtime, and a
# save is one file of at most a few hundred MB (a frozen writer's rename then fails: a warning).
TMP_IDLE_S = 600.0
# Settings that change how a trial is run, not what it computes: a trial may resume under others.
_NOT_IDENTITY = ("fuse", "compile", "sync_every_steps")


def default_dir(storage_url: str) -> Path:
    """``sweep-checkpoints`` beside the storage's file, else in the working folder."""
    path = local_file(storage_url)
    return (path.resolve().parent if path is not None else Path.cwd()) / DIR_NAME


def original_number(system_attrs: Mapping, number: int) -> int:
    """The trial whose checkpoint file a trial uses: the first of its retry chain."""
    history = system_attrs.get(RETRY_HISTORY)
    return int(history[0]) if history else number


def storage_key(storage_url: str) -> str:
    """The storage as every worker names it, written into ``study.json`` on the shared folder:
    ``sweep.base.urls.store_identity`` (a local file by its absolute path; a server by scheme
    without driver alias, host, port and database; no user, password or query), so one database
    spelled two ways is one folder and no credential reaches the shared file system."""
    return store_identity(storage_url)


def study_folder(storage: str, study_id: int, uid: str, study_name: str) -> str:
    """The study's folder name: readable (its name, made safe) and unique (a hash of its storage
    key, study id and creation uid): ``exp 1`` and ``exp_1``, or one name in two storages, get
    two folders; ``..`` one inside the checkpoint folder."""
    digest = hashlib.sha256(f"{storage}\n{study_id}\n{uid}".encode()).hexdigest()[:16]
    readable = re.sub(r"[^\w.-]", "_", study_name).lstrip(".")[:48] or "study"
    return f"{readable}-{digest}"


def folder_of(root: Path, storage: str, study: optuna.Study) -> Path:
    """``study``'s checkpoint folder under ``root`` (``storage``: ``storage_key`` of the
    study's storage URL)."""
    return Path(root) / study_folder(storage, study._study_id, study.user_attrs.get(STUDY_UID, ""),
                                     study.study_name)


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


def _log(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


@dataclass
class TrialCheckpoint:
    """One trial's checkpoint file: ``save`` is the training loop's ``checkpoint`` callback (the
    one entry point that writes a file); ``resume`` the state to continue from (None: from step
    0). ``owns()`` says whether the trial still owns the file (its Optuna trial is RUNNING):
    ``save`` and ``remove`` ask it first, so a stalled worker whose trial another worker failed
    neither overwrites nor removes the file its retry now writes."""

    path: Path
    identity: dict
    total_epochs: int
    on_saved: Callable[[int], None]  # told the finished epochs of each checkpoint written
    owns: Callable[[], bool] = lambda: True
    record: Record = field(default_factory=Record)
    resume: dict | None = None
    log: Callable[[str], None] = _log
    manifest: dict | None = None  # written beside the file with the first one (study.json)
    _warned: bool = False

    def save(self, state: dict) -> None:
        """Write ``state`` (the training state after an epoch) with the steps recorded so far.
        Never raises: a problem is one warning per trial, and the trial trains on."""
        from sweep.training.checkpoint import write_atomic

        epochs, steps = state["epochs"], state["steps"]
        if epochs >= self.total_epochs:
            return  # the trial ends now: nothing would be left to resume
        try:
            if not self.owns():
                return  # failed by another worker meanwhile: the file is its retry's now
            if self.manifest is not None and not (self.path.parent / MANIFEST).exists():
                text = json.dumps(self.manifest, sort_keys=True).encode()
                write_bytes_atomic(self.path.parent / MANIFEST, lambda f: f.write(text))
            payload = {"format": FORMAT, "identity": self.identity, "state": state,
                       "lrs": self.record.lrs[:steps], "losses": self.record.losses[:steps]}
            write_atomic(self.path, payload)
        except Exception as err:  # a full or read-only disk, an outage: the resume, not the trial
            self._warn(f"checkpoint {self.path} not written ({first_line(err, typed=True, strerror=True, limit=200)}); the trial "
                       f"trains on, but an interruption will resume it from its last checkpoint "
                       f"written, or from step 0 if none was")
            return
        try:
            self.on_saved(epochs)
        except Exception as err:  # the store is away: the file is there, the note may lag
            self._warn(f"checkpoint {self.path} written, but its epoch count was not recorded "
                       f"({first_line(err, typed=True, strerror=True, limit=200)}); a retry may restart from step 0")

    def _warn(self, message: str) -> None:
        if not self._warned:
            self.log(f"warning: {message}")
            self._warned = True

    def remove_after(self, writer) -> None:
        """At the trial's own end: whether it still owns the file is asked now, while its Optuna
        trial is RUNNING (the writer runs after Optuna has heard the result, when the trial
        owns nothing any more); then ``writer`` removes it after any pending write of it."""
        try:
            owned = self.owns()
        except Exception:
            return  # the storage is away: `sweep status` lists the file as an orphan
        if owned:
            writer.remove(self.path)

    def replay(self, listeners: Sequence) -> None:
        """The resumed steps and epochs into ``listeners`` (may raise what they raise)."""
        self.record.replay(listeners, self.resume["history"])


def owner_check(storage, trial_id: int) -> Callable[[], bool]:
    """Whether the trial is still RUNNING, read from the storage (never a cached copy). On an
    RDB storage one column of one row: 2.3 ms against SQLite with 200 trials where
    ``get_trial``, which reads the whole trial, took 16 ms (the shared 2-core machine under
    load, 2026-12-05, side by side)."""
    backend = getattr(storage, "_backend", storage)
    if not isinstance(backend, optuna.storages.RDBStorage):
        return lambda: storage.get_trial(trial_id).state == optuna.trial.TrialState.RUNNING

    def running() -> bool:
        from optuna.storages._rdb import models

        session = backend.scoped_session()
        try:
            state = session.query(models.TrialModel.state).filter(
                models.TrialModel.trial_id == trial_id).scalar()
        finally:
            session.close()
        return state == optuna.trial.TrialState.RUNNING

    return running


@dataclass
class CheckpointDir:
    """The checkpoint folder of the trials a worker runs (``storage``: ``storage_key`` of the
    study's storage URL), and the process's one writer of it (``checkpoint_writer``: saves and
    removals run there, off the training thread)."""

    root: Path
    code_version: str
    device_type: str
    storage: str = ""
    log: Callable[[str], None] = _log
    writer: CheckpointWriter = field(default_factory=CheckpointWriter, compare=False, repr=False)
    _swept: set = field(default_factory=set)  # study folders whose stale temporaries are gone

    def folder(self, study: optuna.Study) -> Path:
        return folder_of(self.root, self.storage, study)

    def path(self, study: optuna.Study, original: int) -> Path:
        return self.folder(study) / f"trial-{original}.pt"

    def open(self, trial: optuna.Trial, cfg, on_saved: Callable[[int], None],
             steps_per_epoch: int) -> TrialCheckpoint:
        """The checkpoint of ``trial`` (config ``cfg``): for a retry, loaded and checked (a
        problem is one line through ``log``, and the retry starts from step 0)."""
        study, storage = trial.study, trial.study._storage
        system_attrs = storage.get_trial_system_attrs(trial._trial_id)
        original = original_number(system_attrs, trial.number)
        identity = self._identity(study, original, cfg)
        manifest = {"storage": self.storage, "study": study.study_name,
                    "study_id": study._study_id, "uid": study.user_attrs.get(STUDY_UID, "")}
        found = TrialCheckpoint(self.path(study, original), identity, cfg.train.epochs, on_saved,
                                owns=owner_check(storage, trial._trial_id), log=self.log,
                                manifest=manifest)
        self._sweep_temporaries(study)
        failed = system_attrs.get(FAILED_TRIAL)
        if failed is None:
            return found  # a fresh trial: whatever is in the file is not its own
        try:
            self.writer.wait_for(found.path)  # never read a file while a write of it is pending
            payload, problem = load_checked(found.path, identity, _recorded_epochs(study, failed))
            if payload is not None and problem is None:
                problem = self._fits(found.path, payload["state"], cfg, steps_per_epoch)
        except Exception as err:  # the storage refused the epochs its trial recorded, ...
            payload, problem = None, (f"checkpoint {found.path} cannot be opened "
                                      f"({first_line(err, typed=True, limit=200)})")
        if problem:
            self.log(f"trial {trial.number} (a retry of trial {failed}): {problem}; it restarts "
                     f"from step 0")
            return found
        if payload is not None:
            found.resume = payload["state"]
            found.record = Record(payload["lrs"], payload["losses"])
        return found

    def _fits(self, path: Path, state: dict, cfg, steps_per_epoch: int) -> str | None:
        import torch

        from sweep.training.train import check_resumable

        try:
            check_resumable(state, cfg, steps_per_epoch, torch.device(self.device_type))
        except Exception as err:  # ValueError as a rule; anything else is the file's fault too
            return f"checkpoint {path} does not fit the trial ({first_line(err, typed=True, strerror=True, limit=200)})"
        return None

    def _sweep_temporaries(self, study: optuna.Study) -> None:
        """Once per study folder and process: remove the temporaries no live writer holds."""
        folder = self.folder(study)
        if folder in self._swept:
            return
        self._swept.add(folder)
        try:
            stale = stale_temporaries(study, folder)
        except Exception as err:  # the folder or the storage refused: the next process sweeps
            self.log(f"warning: the stale temporaries of {folder} were not looked for "
                     f"({first_line(err, typed=True, limit=200)}); `sweep status --repair` "
                     f"removes them")
            return
        for path in stale:
            try:
                path.unlink(missing_ok=True)
            except OSError as err:  # another user's file in a sticky /scratch, a stale handle
                self.log(f"warning: stale temporary {path} not removed "
                         f"({first_line(err, typed=True, strerror=True, limit=200)}); "
                         f"`sweep status --repair` lists it")

    def _identity(self, study: optuna.Study, original: int, cfg) -> dict:
        attrs = study.user_attrs
        space = hashlib.sha256(str(attrs.get("sweep.space", "")).encode()).hexdigest()[:16]
        config = {k: v for k, v in cfg.flat_params().items() if k not in _NOT_IDENTITY}
        return {"study": study.study_name, "study_uid": attrs.get(STUDY_UID, ""), "space": space,
                "code": self.code_version, "trial": original, "device": self.device_type,
                "config": config}


def _recorded_epochs(study: optuna.Study, number: int) -> int | None:
    """The epochs the interrupted trial ``number`` said its checkpoint holds: the last it wrote,
    else the one it resumed from (None: neither)."""
    storage = study._storage
    try:
        trial_id = storage.get_trial_id_from_study_id_trial_number(study._study_id, number)
        attrs = storage.get_trial(trial_id).user_attrs
    except KeyError:
        return None
    counts = [attrs[k] for k in (CHECKPOINT_EPOCHS, RESUMED_EPOCHS) if attrs.get(k)]
    return max(counts) if counts else None


# --- files of no live trial --------------------------------------------------------------------

def stale_temporaries(study: optuna.Study, folder: Path) -> list[Path]:
    """Temporaries in ``folder`` older than every running trial of ``study`` (by
    ``TMP_MARGIN_S``), or not written to for ``TMP_IDLE_S`` whatever is running: a write renames
    its temporary within one save, so these were left by a killed writer."""
    temporaries = sorted(folder.glob(f".*{TMP_SUFFIX}")) if folder.is_dir() else []
    if not temporaries:
        return []
    starts = [t.datetime_start for t in study.get_trials(
        deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)) if t.datetime_start]
    oldest = min(starts).timestamp() if starts else time.time()
    cutoff = max(oldest - TMP_MARGIN_S, time.time() - TMP_IDLE_S)
    out = []
    for path in temporaries:
        try:
            if path.lstat().st_mtime < cutoff:
                out.append(path)
        except FileNotFoundError:
            pass  # renamed or removed meanwhile
    return out


def orphans(study: optuna.Study, root: Path, storage: str) -> list[Path]:
    """Checkpoint files under ``root`` that belong to no live trial of ``study``'s storage:
    in ``study``'s folder, files of no RUNNING or WAITING trial's chain and stale temporaries;
    the files of folders whose study (by ``study.json``) is gone from the storage (deleted or
    re-created). Other storages' folders are never listed."""
    folder = folder_of(root, storage, study)
    trials = study.get_trials(deepcopy=False)
    live = {original_number(t.system_attrs, t.number) for t in trials
            if t.state in (optuna.trial.TrialState.RUNNING, optuna.trial.TrialState.WAITING)}
    out = [p for p in sorted(folder.glob("trial-*.pt")) if number_in(p.stem.removeprefix("trial-")) not in live]
    out += stale_temporaries(study, folder)
    existing = {(s._study_id, s.user_attrs.get(STUDY_UID, ""))
                for s in study._storage.get_all_studies()} if root.is_dir() else set()
    for manifest in sorted(root.glob(f"*/{MANIFEST}")):
        try:
            owner = json.loads(manifest.read_text())
            key = (owner["study_id"], owner["uid"])
        except (OSError, ValueError, KeyError, TypeError):
            continue  # not ours to judge
        if owner.get("storage") == storage and key not in existing:
            out += sorted(p for p in manifest.parent.iterdir() if p.is_file())
    return out


def remove_orphans(paths: Sequence[Path]) -> int:
    """Remove ``orphans``' files (a folder's ``study.json`` last, then the folder once empty);
    the count removed."""
    removed = 0
    for path in sorted(paths, key=lambda p: p.name == MANIFEST):
        try:
            path.unlink()
            removed += 1
        except FileNotFoundError:
            pass
        if path.name == MANIFEST:
            try:
                path.parent.rmdir()
            except OSError:
                pass  # not empty: a file written since
    return removed


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


def checkpoint_root(given: str | None, storage_url: str) -> Path:
    """``--checkpoint-dir`` as given (made absolute), else the default beside the storage."""
    return Path(given).expanduser().resolve() if given else default_dir(storage_url)


def _remove_folders(folders: list[Path]) -> None:
    """Remove the (empty) folders a probe created, deepest first."""
    for path in folders:
        try:
            path.rmdir()
        except OSError:
            pass  # another worker wrote there meanwhile


def resolve_dir(given: str | None, storage_url: str) -> Path:
    """``checkpoint_root``, once a file could be written there: the folder is created, a probe
    file written, flushed and removed, and the folders it created removed again (the first
    checkpoint creates them; a run refused for another input leaves nothing). Raises
    CheckpointError (one line) when it could not be written."""
    from sweep.errors import CheckpointError

    folder = checkpoint_root(given, storage_url)
    # this process's own probe: workers starting together must not remove each other's
    probe = temporary_name(folder / ".sweep-write-probe")
    problem: OSError | None = None
    for _ in range(20):  # another worker's probe may remove the folder this one just made: again
        created = [p for p in (folder, *folder.parents) if not p.exists()]  # deepest first
        try:
            folder.mkdir(parents=True, exist_ok=True)
            write_bytes_atomic(probe, lambda f: f.write(b"sweep"))
            probe.unlink()
            problem = None
        except OSError as err:
            problem = err
        _remove_folders(created)
        if not isinstance(problem, FileNotFoundError):
            break
    if problem is not None:
        why = problem.strerror or type(problem).__name__
        raise CheckpointError(f"checkpoint folder {folder} cannot be written ({why}); pass "
                              f"--checkpoint-dir with a folder on a writable filesystem")
    return folder
