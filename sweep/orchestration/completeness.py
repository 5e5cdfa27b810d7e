"""Does MLflow hold every point of every trial run? (``sweep status``, ``sweep report`` and the
launch's closing summary ask.)

Each trial run's end records what it should hold (``tracking.EXPECTED_POINTS``: points per
metric key, pruned, failed and interrupted trials too). The stored counts come from one GROUP BY
on the metrics table for a SQL store (SQLite, PostgreSQL: cheap at any size), else from each
run's metric histories (a tracking server). Points still waiting in a spool
(``sweep.orchestration.spool``) are counted apart: ``sweep status --repair`` replays them.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field

from sweep.orchestration.spool import Pending, pending
from sweep.orchestration.storage import mask_url
from sweep.orchestration.tracking import EXPECTED_POINTS, Tracker

REPLAY_HINT = "sweep status --repair"


def replay_spool(tracker: Tracker, log=None) -> None:
    """Send what earlier processes spooled for this MLflow store (``spool``), saying so on
    stderr; a segment that is still refused stays for the next try."""
    log = log or (lambda line: print(line, file=sys.stderr, flush=True))
    sent, problems = tracker.replay_spool()
    if sent:
        log(f"MLflow: replayed {sent} spooled point(s) into {mask_url(tracker.uri)}")
    for line in problems:
        log(f"MLflow: spool segment not replayed (kept for the next try): {line}")


def expected_points(tags: dict) -> dict[str, int] | None:
    """``lr=1200,train_loss=1200`` -> {"lr": 1200, ...}; None for a run that never ended
    through sweep (RUNNING, or ended by a repair after its worker died)."""
    text = tags.get(EXPECTED_POINTS)
    if text is None:
        return None
    out = {}
    for item in filter(None, text.split(",")):
        key, _, count = item.rpartition("=")
        out[key] = int(count)
    return out


def stored_points(tracker: Tracker, runs: dict[str, dict[str, int]]) -> dict[str, dict[str, int]]:
    """Points stored per run and key, for ``runs`` (run id -> the keys to count)."""
    store = getattr(getattr(tracker.client, "_tracking_client", None), "store", None)
    if is_sql_store(tracker) and runs:
        from mlflow.store.tracking.dbmodels.models import SqlMetric
        from sqlalchemy import func

        out: dict[str, dict[str, int]] = {run_id: {} for run_id in runs}
        ids = list(runs)
        with store.ManagedSessionMaker() as session:
            for start in range(0, len(ids), 500):  # bounded IN lists
                rows = (session.query(SqlMetric.run_uuid, SqlMetric.key, func.count())
                        .filter(SqlMetric.run_uuid.in_(ids[start:start + 500]))
                        .group_by(SqlMetric.run_uuid, SqlMetric.key).all())
                for run_id, key, count in rows:
                    out[run_id][key] = count
        return out
    return {run_id: {key: len(tracker.client.get_metric_history(run_id, key)) for key in keys}
            for run_id, keys in runs.items()}


@dataclass
class RunGap:
    run_id: str
    trial: str  # the trial number, as the run's tag holds it
    missing: dict[str, int]  # key -> points expected and not stored

    @property
    def total(self) -> int:
        return sum(self.missing.values())


@dataclass
class Completeness:
    runs: int = 0  # ended trial runs that say what they should hold
    expected: int = 0
    stored: int = 0
    gaps: list[RunGap] = field(default_factory=list)
    uncounted: list[str] = field(default_factory=list)  # ended without a count (worker died)
    spool: Pending | None = None

    @property
    def complete(self) -> bool:
        return not self.gaps and not (self.spool and (self.spool.total or self.spool.ends))

    def lines(self, study: str | None = None) -> list[str]:
        """What a person reads: one line when complete, else the runs that lack points, what
        waits in the spool and the command that replays it."""
        if self.complete:
            return [f"MLflow: all {self.stored} points of {self.runs} trial run(s) stored"]
        out = []
        if self.gaps:
            out.append(f"MLflow: {len(self.gaps)} of {self.runs} trial run(s) lack "
                       f"{sum(g.total for g in self.gaps)} of {self.expected} point(s):")
            for g in self.gaps[:20]:
                what = ", ".join(f"{k} {n}" for k, n in sorted(g.missing.items()))
                out.append(f"  trial #{g.trial} run {g.run_id}: missing {what}")
            if len(self.gaps) > 20:
                out.append(f"  ... and {len(self.gaps) - 20} more run(s)")
        if self.spool is not None and (self.spool.total or self.spool.ends):
            live = f" ({self.spool.live} segment(s) still being written)" if self.spool.live else ""
            target = f" --study {study}" if study else ""
            out.append(f"MLflow: {self.spool.describe()}{live}; replay: `{REPLAY_HINT}{target}` "
                       f"(or the next sweep launch)")
        return out


def is_sql_store(tracker: Tracker) -> bool:
    store = getattr(getattr(tracker.client, "_tracking_client", None), "store", None)
    return hasattr(store, "ManagedSessionMaker")


def launch_lines(tracker: Tracker, experiment_id: str | None, study: str) -> list[str]:
    """The closing summary's MLflow lines. A SQL store is checked whole (one query); over a
    tracking server, what this process's writer stored and the spool say (reading every
    history back over HTTP would cost more than the launch's last trial)."""
    if is_sql_store(tracker):
        return check(tracker, experiment_id).lines(study)
    writer = tracker._writer
    spool = pending(tracker.uri)
    if not (spool.total or spool.ends):
        stored = writer.stored if writer is not None else 0
        return [f"MLflow: all {stored} points of this launch stored"]
    return Completeness(spool=spool).lines(study)


def check(tracker: Tracker, experiment_id: str | None) -> Completeness:
    """Compare every ended trial run's expected points with the store, and read the spool."""
    out = Completeness(spool=pending(tracker.uri))
    if experiment_id is None:
        return out
    wanted, numbers = {}, {}
    for run in tracker.trial_runs(experiment_id):
        expected = expected_points(run.data.tags)
        if expected is None:
            if run.info.status != "RUNNING":
                out.uncounted.append(run.info.run_id)
            continue
        wanted[run.info.run_id] = expected
        numbers[run.info.run_id] = run.data.tags.get("sweep.trial_number", "?")
    stored = stored_points(tracker, {run_id: list(e) for run_id, e in wanted.items()})
    out.runs = len(wanted)
    for run_id, expected in wanted.items():
        have = stored.get(run_id, {})
        out.expected += sum(expected.values())
        out.stored += sum(min(have.get(k, 0), n) for k, n in expected.items())
        missing = {k: n - have.get(k, 0) for k, n in expected.items() if have.get(k, 0) < n}
        if missing:
            out.gaps.append(RunGap(run_id, numbers[run_id], missing))
    out.gaps.sort(key=lambda g: int(g.trial) if g.trial.isdigit() else -1)
    return out
