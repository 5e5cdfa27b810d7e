"""Repairs and writes the loop and the commands make to MLflow outside a trial's own run: ending
a run its dead worker left RUNNING, tagging the parent run, listing and removing a study's
runs. The loop and the commands never call the MLflow client themselves; they call these."""

from __future__ import annotations

import shutil
from pathlib import Path

from sweep.base.text import first_line
from sweep.record.set_aside import SET_ASIDE, restore
from sweep.record.completeness import is_sql_store
from sweep.record.names import CODE_VERSION, STATE
from sweep.record.spool import spool_dir
from sweep.record.tracking import Tracker

_RUN_STATUS = {"COMPLETE": "FINISHED"}  # any other finished trial state -> FAILED


def end_stale_run(tracker: Tracker, run_id: str, state: str, error: str | None) -> bool:
    """End trial run ``run_id`` whose trial finished as ``state`` (an Optuna state name) without
    its worker ending the run: tag ``sweep.state`` (and ``sweep.error`` when ``error``), status
    FINISHED for COMPLETE, else FAILED. Returns False, writing nothing, when the run is no longer
    RUNNING (its worker ended it meanwhile: it ends the run before telling Optuna)."""
    client = tracker.client
    if client.get_run(run_id).info.status != "RUNNING":
        return False
    client.set_tag(run_id, STATE, state)
    if error is not None:
        client.set_tag(run_id, "sweep.error", error)
    client.set_terminated(run_id, _RUN_STATUS.get(state, "FAILED"))
    return True


def restore_set_aside(tracker: Tracker, log) -> int:
    """Put the records this store set aside (runs it refused for good) back into its spool
    (``set_aside.restore``), so that the replay that follows stores those it takes now (a run
    restored in the UI) and sets the others aside again with today's reason. ``log`` hears one
    line; returns the set-aside files put back (``sweep status --repair``)."""
    folder = spool_dir(tracker.uri)
    try:
        count = restore(folder)
    except OSError as err:
        log(f"MLflow: set-aside records in {folder / SET_ASIDE} not put back "
            f"({first_line(err, strerror=True)}); they stay set aside")
        return 0
    if count:
        log(f"MLflow: {count} set-aside file(s) put back into the spool {folder} for the replay")
    return count


def tag_code_version(tracker: Tracker, run_id: str, version: str) -> None:
    """Tag the study's parent run with the code version of the last launch."""
    tracker.client.set_tag(run_id, CODE_VERSION, version)


def other_runs(tracker: Tracker, experiment_id: str, mine: set[str]) -> int:
    """Runs of experiment ``experiment_id`` (deleted ones included) that are not in ``mine``."""
    from mlflow.entities import ViewType

    everything = tracker.client.search_runs([experiment_id], run_view_type=ViewType.ALL,
                                            max_results=50_000)
    return sum(1 for r in everything if r.info.run_id not in mine)


def remove_runs(tracker: Tracker, run_ids: list[str], experiment_id: str,
                with_experiment: bool) -> None:
    """Delete the runs ``run_ids``, then experiment ``experiment_id`` when ``with_experiment``
    (no other study's run is in it); for good (artifacts included) on a SQL store, as
    ``mlflow gc`` does; the server's way (marked deleted) over a tracking server."""
    client = tracker.client
    hard = is_sql_store(tracker)
    store = client._tracking_client.store if hard else None
    for run_id in run_ids:
        run = client.get_run(run_id)
        if hard:
            _delete_artifacts(run.info.artifact_uri)
        if run.info.lifecycle_stage != "deleted":
            client.delete_run(run_id)
        if hard:
            store._hard_delete_run(run_id)
    if not with_experiment:
        return
    experiment = client.get_experiment(experiment_id)
    if experiment.lifecycle_stage != "deleted":
        client.delete_experiment(experiment_id)
    if hard:
        store._hard_delete_experiment(experiment_id)
        location = experiment.artifact_location or ""
        if location.startswith("file:"):
            from urllib.parse import unquote, urlsplit

            folder = Path(unquote(urlsplit(location).path))
            # sweep's artifact root may be shared by every experiment of the store: it goes
            # only when not one file is left in it (the runs' emptied folders)
            if folder.is_dir() and not any(p.is_file() for p in folder.rglob("*")):
                shutil.rmtree(folder, ignore_errors=True)


def _delete_artifacts(artifact_uri: str | None) -> None:
    if not artifact_uri:
        return
    from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository

    try:
        get_artifact_repository(artifact_uri).delete_artifacts()
    except FileNotFoundError:
        pass  # a run that never logged an artifact has no folder
