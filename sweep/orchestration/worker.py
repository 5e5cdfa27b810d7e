"""The study loop of one worker process: create or resume the study, then ask -> run -> tell
until the study's budget is used (what counts towards it: ``bookkeeping``).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import threading
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import optuna
from optuna.storages._heartbeat import is_heartbeat_enabled
from optuna.trial import TrialState

from sweep import __version__
from sweep.errors import SpaceChangedError
from sweep.orchestration.bookkeeping import (budget_used, counted, end_stale_runs,
                                             fail_dead_trials, over_budget, retry_later)
from sweep.orchestration.objective import Outcome, WorkerContext, run_trial
from sweep.study.phases import SearchOnlySampler
from sweep.study.pruning import build_pruner
from sweep.study.spec import StudySpec


class Interrupted(BaseException):
    """SIGINT/SIGTERM arrived while a trial was training."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


class SignalGuard:
    """First SIGINT/SIGTERM: the running trial stops at its next check (a few optimizer steps)
    or the worker stops before the next trial. Second: exit at once (the storages are
    transactional, so nothing is corrupted; the next launch reconciles the abandoned trial).

    The handler itself never raises: an exception raised from a signal handler can land in a
    finalizer (``__del__``), where Python prints and ignores it and training goes on. The guard
    is also a training listener and raises ``Interrupted`` from the loop at a safe point.
    """

    def __init__(self):
        self.signum: int | None = None
        self._old = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)

    def _handle(self, signum, frame):
        if self.signum is not None:
            os._exit(128 + signum)
        self.signum = signum

    def check(self) -> None:
        if self.signum is not None:
            raise Interrupted(self.signum)

    def on_steps(self, first_step, lrs, losses) -> None:
        self.check()

    def on_epoch_end(self, epoch, metrics) -> None:
        self.check()


def code_version() -> str:
    """The package version and, when run from a git checkout, its commit."""
    try:
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                             text=True, timeout=5, cwd=Path(__file__).parent).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        sha = ""
    return f"{__version__}+{sha}" if sha else __version__


def space_fingerprint(spec: StudySpec) -> str:
    """The search space as canonical JSON (what a resumed study must still agree with)."""
    return json.dumps(spec.raw.get("space"), sort_keys=True, default=str)


def build_sampler(spec: StudySpec) -> optuna.samplers.BaseSampler:
    """The study file's sampler, blind to confirmation trials (``sweep.study.phases``)."""
    if spec.sampler.type == "random":
        return SearchOnlySampler(optuna.samplers.RandomSampler(seed=spec.seed))
    return SearchOnlySampler(optuna.samplers.TPESampler(seed=spec.seed, n_startup_trials=spec.sampler.n_startup_trials,
                                      multivariate=spec.sampler.multivariate,
                                      group=spec.sampler.multivariate))


def open_study(spec: StudySpec, storage, allow_space_change: bool = False,
               create: bool = True) -> optuna.Study:
    """Create the study or resume it; refuses a changed search space unless allowed."""
    sampler, pruner = build_sampler(spec), build_pruner(spec.pruner, spec.train.epochs)
    fingerprint = space_fingerprint(spec)
    try:
        study = optuna.load_study(study_name=spec.name, storage=storage, sampler=sampler,
                                  pruner=pruner)
    except KeyError:
        if not create:
            raise
        try:
            study = optuna.create_study(study_name=spec.name, storage=storage, sampler=sampler,
                                        pruner=pruner, direction=spec.objective.direction)
        except optuna.exceptions.DuplicatedStudyError:  # another worker created it just now
            return open_study(spec, storage, allow_space_change, create)
        study.set_user_attr("sweep.study.space", fingerprint)
        study.set_user_attr("sweep.description", spec.description)
        study.set_user_attr("sweep.study_file", str(spec.path))
        return study
    stored = study.user_attrs.get("sweep.study.space")
    if stored is not None and stored != fingerprint:
        if not allow_space_change:
            raise SpaceChangedError(
                f"study {spec.name!r} was created with another search space than {spec.path} now "
                f"declares; restore the file, use a new study name, or pass --allow-space-change")
        changes = list(study.user_attrs.get("sweep.space_changes", []))
        changes.append({"from": stored, "to": fingerprint})
        study.set_user_attr("sweep.space_changes", changes)
        study.set_user_attr("sweep.study.space", fingerprint)
    return study


class _Heartbeat:
    """Records the running trial's heartbeat so a dead worker's trial is failed after the grace
    period (RDB storages only; the journal storage has no heartbeat)."""

    def __init__(self, storage, trial_id: int):
        self._storage, self._trial_id = storage, trial_id
        self._stop = threading.Event()
        interval = storage.get_heartbeat_interval() if hasattr(storage, "get_heartbeat_interval") else None
        self._thread = None
        if interval:
            self._interval = interval
            self._thread = threading.Thread(target=self._beat, daemon=True, name="heartbeat")
            self._thread.start()

    def _beat(self):
        while True:
            try:
                self._storage.record_heartbeat(self._trial_id)
            except Exception:
                pass  # a missed beat is harmless; a dead storage shows up at tell()
            if self._stop.wait(self._interval):
                return

    def stop(self):
        self._stop.set()
        if self._thread is not None:
            self._thread.join()


@dataclass
class WorkerReport:
    ran: list[Outcome] = field(default_factory=list)
    interrupted_by: int | None = None


def run_worker(study: optuna.Study, ctx: WorkerContext, budget: int, on_trial=None) -> WorkerReport:
    """Run trials until the study's budget is used (or a signal arrives).

    The budget is met when ``budget`` trials have *finished*. While the remaining slots are held
    by RUNNING trials of other workers, this worker waits (polling every second) instead of
    leaving: if such a worker died, its trial is failed (heartbeat or dead local pid) and its
    re-enqueued retry must still be run by someone.
    """
    report = WorkerReport()
    storage = study._storage
    end_stale_runs(study, ctx.tracker, ctx.experiment_id)
    with SignalGuard() as guard:
        while guard.signum is None:
            if fail_dead_trials(study):
                end_stale_runs(study, ctx.tracker, ctx.experiment_id)
            trials = study.get_trials(deepcopy=False)
            if len(counted(trials)) >= budget:
                if budget_used(study) >= budget or not _can_wait(study, trials):
                    break
                time.sleep(_POLL_SECONDS)  # others' trials are running; one may be dead
                continue
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", UserWarning)  # the same heartbeat warning
                trial = study.ask()
            if over_budget(study, trial, budget):
                continue
            heartbeat = _Heartbeat(storage, trial._trial_id)
            try:
                outcome = run_trial(trial, ctx, guard)
            except Interrupted as sig:
                heartbeat.stop()
                _tell(study, trial, state=TrialState.FAIL)
                retry_later(study, study._storage.get_trial(trial._trial_id))
                report.interrupted_by = sig.signum
                break
            finally:
                heartbeat.stop()
            if outcome.state == TrialState.COMPLETE:
                _tell(study, trial, outcome.value)
            else:
                _tell(study, trial, state=outcome.state)
            report.ran.append(outcome)
            if on_trial is not None:
                on_trial(trial.number, outcome)
        if guard.signum is not None and report.interrupted_by is None:
            report.interrupted_by = guard.signum
    try:
        end_stale_runs(study, ctx.tracker, ctx.experiment_id)
    except Exception:
        pass  # best effort on the way out; `sweep status --repair` does it again
    ctx.tracker.wait()  # the last trials' LR-curve figures
    return report


_POLL_SECONDS = 1.0


def _can_wait(study: optuna.Study, trials) -> bool:
    """Whether a dead worker's RUNNING trial would ever be noticed: always with heartbeats;
    without them (journal storage) only when every running trial is on this host (pid check)."""
    if is_heartbeat_enabled(study._storage):
        return True
    host = socket.gethostname()
    return all(t.user_attrs.get("host") == host for t in trials if t.state == TrialState.RUNNING)


def _tell(study: optuna.Study, trial: optuna.Trial, value=None, state=None) -> None:
    """``study.tell`` that tolerates a trial already failed by another worker's stale check
    (a worker that stalled longer than the grace period): its retry is already queued."""
    try:
        if state is None:
            study.tell(trial, value)
        else:
            study.tell(trial, state=state)
    except optuna.exceptions.UpdateFinishedTrialError:
        pass
    except ValueError as err:
        if "finished" not in str(err).lower():
            raise
