"""``sweep delete``: remove a study everywhere sweep put it, or say what that would remove.

What belongs to a study:

* the Optuna study (its trials, their attributes, the stored budget);
* its MLflow runs: the parent run and every trial run (``optuna.study_name`` = the study) of the
  experiment named after it, and the experiment itself once no run of any other study is left
  in it. On a SQL store (SQLite, PostgreSQL) the runs are removed for good, their artifacts too,
  as ``mlflow gc`` would; over a tracking server they are deleted the server's way (marked
  deleted; the server's ``mlflow gc`` frees the space);
* its checkpoints: the folder ``CHECKPOINT_DIR/NAME-HASH/`` (``checkpoints.folder_of``: NAME the
  study's name made safe for a file name, HASH its storage and identity);
* its spool: the records of its runs in the tracking store's spool (``spool``); a segment that
  holds other studies' runs too keeps theirs.

A study with RUNNING trials is refused: a live worker would go on writing into what is being
removed. The Optuna study goes last, so a delete that fails half way can be run again.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass, field
from pathlib import Path

import optuna
from optuna.trial import TrialState

from sweep.errors import SweepError
from sweep.stores import folder_of, resolve_dir, storage_key
from sweep.record import other_runs, remove_runs
from sweep.record import drop_runs, pending
from sweep.commands.status import open_for_status
from sweep.base.urls import mask_url


@dataclass
class DeletePlan:
    """Everything ``sweep delete`` removes, found before anything is removed."""

    study: optuna.Study
    storage_url: str
    tracking_uri: str
    tracker: object | None  # None: no MLflow store to look at
    experiment_id: str | None
    run_ids: list[str] = field(default_factory=list)  # parent run(s) first, then trial runs
    parents: int = 0
    other_runs: int = 0  # runs of other studies in the same experiment (it stays then)
    checkpoints: Path | None = None
    checkpoint_files: int = 0
    spool_points: int = 0
    spool_runs: int = 0
    trials: int = 0

    @property
    def name(self) -> str:
        return self.study.study_name

    def lines(self, done: bool) -> list[str]:
        verb = "removed" if done else "would remove"
        out = [f"{verb}: Optuna study {self.name!r} ({self.trials} trial(s)) from "
               f"{mask_url(self.storage_url)}"]
        if self.tracker is None:
            out.append(f"  MLflow: no store at {mask_url(self.tracking_uri)}; nothing there")
        elif self.experiment_id is None:
            out.append(f"  MLflow: no experiment {self.name!r}; nothing there")
        else:
            experiment = ("and the experiment" if not self.other_runs else
                          f"(experiment {self.experiment_id} stays: {self.other_runs} run(s) of "
                          f"other studies)")
            out.append(f"  MLflow: {self.parents} parent run(s) and "
                       f"{len(self.run_ids) - self.parents} trial run(s) of experiment "
                       f"{self.experiment_id} {experiment}")
        if self.checkpoint_files or (self.checkpoints and self.checkpoints.exists()):
            out.append(f"  checkpoints: {self.checkpoints} ({self.checkpoint_files} file(s))")
        else:
            out.append(f"  checkpoints: none in {self.checkpoints}")
        out.append(f"  spool: {self.spool_points} point(s) of {self.spool_runs} run(s)"
                   if self.spool_runs else "  spool: nothing of this study")
        if not done:
            out.append(f"nothing removed; to remove all of it: sweep delete --study {self.name} "
                       f"--yes")
        return out


def plan_delete(study_name: str, storage_url: str, tracking_uri: str,
                checkpoint_dir: str | None) -> DeletePlan:
    """Find what belongs to the study (see the module docstring); removes nothing. Raises
    SweepError for an unknown study or a study with RUNNING trials."""
    study, tracker, experiment_id = open_for_status(study_name, storage_url, tracking_uri)
    trials = study.get_trials(deepcopy=False)
    running = [t.number for t in trials if t.state == TrialState.RUNNING]
    if running:
        raise SweepError(f"study {study.study_name!r} has RUNNING trial(s) {running}: stop its "
                         f"workers first (or, if they are dead, `sweep status --repair --study "
                         f"{study.study_name}`), then delete")
    plan = DeletePlan(study, storage_url, tracking_uri, tracker, experiment_id,
                      trials=len(trials))
    if tracker is not None and experiment_id is not None:
        parents = [r.info.run_id for r in tracker.study_runs(experiment_id, plan.name)]
        trials = [r.info.run_id for r in tracker.trial_runs(experiment_id)
                  if r.data.tags.get("optuna.study_name") == plan.name]
        plan.run_ids, plan.parents = parents + trials, len(parents)
        mine = set(plan.run_ids)
        plan.other_runs = other_runs(tracker, experiment_id, mine)
        spooled = pending(tracking_uri)
        mine_spooled = (set(spooled.points) | spooled.ends) & mine
        plan.spool_runs = len(mine_spooled)
        plan.spool_points = sum(spooled.points.get(r, 0) for r in mine_spooled)
    plan.checkpoints = folder_of(resolve_dir(checkpoint_dir, storage_url), storage_key(storage_url),
                                 study)
    if plan.checkpoints.is_dir():
        plan.checkpoint_files = sum(1 for p in plan.checkpoints.rglob("*") if p.is_file())
    return plan


def delete_study(plan: DeletePlan) -> list[str]:
    """Remove what ``plan`` found: MLflow runs, spool records, checkpoints, then the Optuna
    study. Returns the lines to print."""
    if plan.tracker is not None and plan.run_ids:
        remove_runs(plan.tracker, plan.run_ids, plan.experiment_id,
                    with_experiment=not plan.other_runs)
    if plan.run_ids:
        drop_runs(plan.tracking_uri, set(plan.run_ids))
    if plan.checkpoints is not None and plan.checkpoints.is_dir():
        shutil.rmtree(plan.checkpoints)
    optuna.delete_study(study_name=plan.name, storage=plan.study._storage)
    return plan.lines(done=True)
