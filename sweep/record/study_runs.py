"""A study's runs in MLflow: its experiment, its parent run (a finished container kept up to
date with how the study stands) and the listing of its trial runs. Every function takes an
``MlflowClient``; ``tracking.Tracker`` is the facade the loop calls them through."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from sweep.base.urls import mask_url
from sweep.record.batch import log_batch
from sweep.record.names import ROLE


@dataclass(frozen=True)
class StudySummary:
    """How a study stands, for its parent run (built from Optuna by
    ``bookkeeping.study_summary``, where the counting rules live)."""

    budget: int
    used: int  # finished trials that count towards the budget
    counts: Mapping[str, int]  # complete, pruned, diverged, failed, running
    best_value: float | None = None
    best_trial: int | None = None
    last_end_ms: int | None = None  # when the last finished trial ended (ms since the epoch)


def experiment_id(client, name: str, artifact_root: str | None, create: bool = True) -> str | None:
    """The experiment named ``name`` (restored if deleted); created when absent, with its
    artifacts under ``artifact_root`` (two creators may race: fine). None when absent and not
    ``create``."""
    found = client.get_experiment_by_name(name)
    if found is not None:
        if found.lifecycle_stage == "deleted":
            client.restore_experiment(found.experiment_id)
        return found.experiment_id
    if not create:
        return None
    try:
        return client.create_experiment(name, artifact_location=artifact_root)
    except Exception:
        found = client.get_experiment_by_name(name)
        if found is None:
            raise
        return found.experiment_id


def study_runs(client, experiment_id: str, study_name: str):
    """The study's parent runs, oldest first (one, unless a creation race is being settled)."""
    runs = client.search_runs(
        [experiment_id], filter_string=f"tags.`{ROLE}` = 'study' and "
                                       f"tags.`optuna.study_name` = '{study_name}'",
        max_results=50)
    return sorted(runs, key=lambda r: (r.info.start_time, r.info.run_id))


def log_params(client, run_id: str, params: Mapping[str, Any]) -> None:
    """``params`` on ``run_id``, values masked and cut to MLflow's 6,000 characters, in batches
    of 100 (MLflow's cap)."""
    from mlflow.entities import Param

    items = [Param(k, mask_url(str(v))[:6000]) for k, v in params.items()]
    for start in range(0, len(items), 100):
        log_batch(client, run_id, params=items[start: start + 100])


def study_run(client, experiment_id: str, study_name: str, params: Mapping[str, Any],
              study_file: Path | None) -> str:
    """The study's parent run, created once. Concurrent creators converge on the oldest."""
    existing = study_runs(client, experiment_id, study_name)
    if existing:
        return existing[0].info.run_id
    run = client.create_run(experiment_id, run_name=study_name,
                            tags={ROLE: "study", "optuna.study_name": study_name})
    run_id = run.info.run_id
    winners = study_runs(client, experiment_id, study_name)
    if winners and winners[0].info.run_id != run_id:
        client.delete_run(run_id)  # another worker won the race
        return winners[0].info.run_id
    log_params(client, run_id, params)
    if study_file is not None:
        client.log_artifact(run_id, str(study_file))
    # The parent is a container; ended at once so no crash can leave it RUNNING. Its start
    # (now, before the first trial) stays; update_study_run moves its end along the study.
    client.set_terminated(run_id, "FINISHED")
    return run_id


def update_study_run(client, run_id: str, summary: StudySummary) -> None:
    """Bring the study's parent run up to date, so the MLflow runs table answers "how did
    this study go" without opening trials: metrics ``best_value``, ``budget``,
    ``trials_used`` and ``trials_<outcome>`` (step = trials used, so their history follows
    the study across launches), the same as ``sweep.*`` tags, and an end time spanning the
    study so far. The run stays FINISHED (a container never left RUNNING by a crash); its
    start time was set when it was created, before the first trial."""
    from mlflow.entities import Metric, RunTag

    now = int(time.time() * 1000)
    values = {"budget": summary.budget, "trials_used": summary.used,
              **{f"trials_{k}": v for k, v in summary.counts.items()}}
    if summary.best_value is not None and math.isfinite(summary.best_value):
        values["best_value"] = summary.best_value
    tags = {"sweep.budget": summary.budget, "sweep.trials_used": summary.used,
            **{f"sweep.trials_{k}": v for k, v in summary.counts.items()}}
    if summary.best_trial is not None:
        tags["sweep.best_trial"] = summary.best_trial
        tags["sweep.best_value"] = f"{summary.best_value:.6g}"
    log_batch(client, run_id, metrics=[Metric(k, float(v), now, summary.used)
                                       for k, v in values.items()],
              tags=[RunTag(k, str(v)) for k, v in tags.items()])
    start = client.get_run(run_id).info.start_time or now
    # Trials still running: the study goes on now; otherwise it ended with its last trial.
    end = now if summary.last_end_ms is None or summary.counts.get("running") else summary.last_end_ms
    client.set_terminated(run_id, "FINISHED", end_time=max(end, start + 1))


def trial_runs(client, experiment_id: str, status: str | None = None):
    """All trial runs of an experiment (paged), optionally only those with this status."""
    filt = f"tags.`{ROLE}` = 'trial'"
    if status:
        filt += f" and attributes.status = '{status}'"
    runs, token = [], None
    while True:
        page = client.search_runs([experiment_id], filter_string=filt, max_results=1000,
                                  page_token=token)
        runs.extend(page)
        token = page.token
        if not token:
            return runs


def log_metrics(client, run_id: str, metrics: Mapping[str, float], step: int = 0) -> None:
    """One synchronous batch of metrics on ``run_id`` (a study run's summary figures)."""
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    log_batch(client, run_id, metrics=[Metric(k, v, now, step) for k, v in metrics.items()])
