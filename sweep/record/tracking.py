"""MLflow tracking: one experiment per study, one parent run, one nested run per trial.

``Tracker`` is the facade the loop and the commands use; the work lives beside it, one seam per
module: the connection (``connection``: URI checks, the client), the study's runs
(``study_runs``), the process's writer and background thread (``process_writer``), the trial
runs (``trial_run``) and the names and tags contract (``names``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

import sweep.record.study_runs as runs
from sweep.record.connection import artifact_root, check_store_exists, connect
from sweep.record.metric_writer import MetricWriter
from sweep.record.process_writer import ProcessWriter
from sweep.record.spool import replay
from sweep.record.study_runs import StudySummary
from sweep.record.trial_run import TrialRun, start_trial


class Tracker:
    """An MLflow client bound to one tracking URI, and this process's writer for it; safe to
    share between threads. Raises TrackingError (one line) for a URI that cannot be used."""

    def __init__(self, uri: str):
        self.client = connect(uri)
        self.uri = uri
        self.process = ProcessWriter(uri, self.client)

    # -- the process's writer (process_writer) --
    @property
    def writer(self) -> MetricWriter:
        """The process's one metric writer for this store, started on first use."""
        return self.process.writer

    @writer.setter
    def writer(self, writer: MetricWriter) -> None:  # benchmarks hand in their own
        self.process.writer = writer

    def in_background(self, work) -> None:
        """Run ``work`` on the process's one background thread, in order (``ProcessWriter``)."""
        self.process.in_background(work)

    def wait(self, deadline: float | None = None) -> None:
        """Wait for the background work and for every queued point to be stored or spooled
        (call before the process exits), until ``deadline`` (``time.monotonic()``; None: no
        limit)."""
        self.process.wait(deadline)

    def settle_by(self, deadline: float) -> None:
        """A stop's way out: every queued point and run end stored by ``deadline`` or spooled."""
        self.process.settle_by(deadline)

    def spool_now(self) -> str:
        """The process's last words at a stop: spool what is queued, from this thread, at once;
        returns the line that says what is stored, spooled and lost (``ProcessWriter``)."""
        return self.process.spool_now()

    @property
    def refusing(self) -> bool:
        """Whether the store refused this process's last write (an outage under way)."""
        return self.process.refusing

    def lag_text(self) -> str:
        """The record's lag for a progress line (empty while the store keeps up)."""
        return self.process.lag_text()

    def close(self) -> None:
        """``wait``, then stop the writer and release this process's spool segment."""
        self.process.close()

    def replay_spool(self) -> tuple[int, list[str]]:
        """Send what earlier processes spooled for this store (``spool.replay``): (points
        sent, one line per segment that could not be replayed and stays)."""
        return replay(self.uri, self.client)

    # -- the study's runs (study_runs) --
    def experiment_id(self, name: str, create: bool = True) -> str | None:
        """The experiment named ``name``; created when absent (two creators may race: fine)."""
        return runs.experiment_id(self.client, name, artifact_root(self.uri), create)

    def study_run(self, experiment_id: str, study_name: str, params: Mapping[str, Any],
                  study_file: Path | None) -> str:
        """The study's parent run, created once. Concurrent creators converge on the oldest."""
        return runs.study_run(self.client, experiment_id, study_name, params, study_file)

    def update_study_run(self, run_id: str, summary: StudySummary) -> None:
        """Bring the study's parent run up to date (``study_runs.update_study_run``)."""
        runs.update_study_run(self.client, run_id, summary)

    def study_runs(self, experiment_id: str, study_name: str):
        """The study's parent runs, oldest first (one, unless a creation race is being settled)."""
        return runs.study_runs(self.client, experiment_id, study_name)

    def trial_runs(self, experiment_id: str, status: str | None = None):
        """All trial runs of an experiment (paged), optionally only those with this status."""
        return runs.trial_runs(self.client, experiment_id, status)

    def log_params(self, run_id: str, params: Mapping[str, Any]) -> None:
        runs.log_params(self.client, run_id, params)

    def log_metrics(self, run_id: str, metrics: Mapping[str, float], step: int = 0) -> None:
        """One synchronous batch of metrics on ``run_id`` (a study run's summary figures)."""
        runs.log_metrics(self.client, run_id, metrics, step)

    # -- trial runs (trial_run) --
    def start_trial(self, experiment_id: str, parent_run_id: str, study_name: str,
                    trial_number: int, params: Mapping[str, Any], tags: Mapping[str, str],
                    check=None) -> TrialRun:
        """Open a trial's run, waiting while the store is away (``trial_run.start_trial``);
        ``check`` raises to stop the waiting. A permanent refusal is raised."""
        return start_trial(self, experiment_id, parent_run_id, study_name, trial_number,
                           params, tags, check)


def open_existing_tracker(uri: str) -> Tracker:
    """A tracker for a store that must already exist (a missing SQLite file is a TrackingError
    rather than a fresh empty store)."""
    check_store_exists(uri)
    return Tracker(uri)
