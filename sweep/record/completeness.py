"""Does MLflow hold every point of every trial run? (``sweep status``, ``sweep report`` and the
launch's closing summary ask.)

Each trial run's end records what it should hold (``tracking.EXPECTED_POINTS``: points per
metric key, pruned, failed and interrupted trials too). The stored counts come from one GROUP BY
on the metrics table for a SQL store (SQLite, PostgreSQL: cheap at any size), else from each
run's metric histories (a tracking server). Points still waiting in a spool
(``sweep.record.spool``) are counted apart: ``sweep status --repair`` replays them.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field

from sweep.record.spool import Pending, pending
from sweep.base.urls import mask_url
from sweep.record.names import EXPECTED_POINTS, STATE
from sweep.record.tracking import Tracker

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
    state: str = ""  # the trial's state as its run's end recorded it (COMPLETE, PRUNED, ...)

    @property
    def total(self) -> int:
        return sum(self.missing.values())


@dataclass
class Completeness:
    runs: int = 0  # ended trial runs that say what they should hold
    expected: int = 0
    stored: int = 0
    gaps: list[RunGap] = field(default_factory=list)
    # ended without a count (a killed worker; ended by a repair): (trial, run id, points held)
    uncounted: list[tuple[str, str, int]] = field(default_factory=list)
    spool: Pending | None = None

    @property
    def complete(self) -> bool:
        """No point missing, none waiting in a spool, none set aside (``sweep status`` exits 3
        otherwise). Runs ended without a count are named, not counted: their trial was retried
        (its retry resumes the curve from step 0) or failed with its worker."""
        spool = self.spool
        return not self.gaps and not (spool and (spool.waiting or spool.set_aside))

    def lines(self, study: str | None = None) -> list[str]:
        """What a person reads: one line when complete, else the runs that lack points, what
        waits in the spool and the command that replays it, what was set aside; and the runs
        that ended without a count."""
        out = []
        if self.complete and self.runs:
            out.append(f"MLflow: all {self.stored} points of {self.runs} trial run(s) stored")
        elif self.complete and not self.uncounted:
            out.append("MLflow: no trial run has ended with a count yet")
        for label, gaps in (("COMPLETE trial(s) whose run lacks points",
                             [g for g in self.gaps if g.state == "COMPLETE"]),
                            ("other trial run(s) lack points",
                             [g for g in self.gaps if g.state != "COMPLETE"])):
            if not gaps:
                continue
            out.append(f"MLflow: {len(gaps)} {label} ({sum(g.total for g in gaps)} of "
                       f"{self.expected} expected point(s) of {self.runs} run(s) missing):")
            for g in gaps[:20]:
                what = ", ".join(f"{k} {n}" for k, n in sorted(g.missing.items()))
                out.append(f"  trial #{g.trial} ({g.state or '?'}) run {g.run_id}: missing {what}")
            if len(gaps) > 20:
                out.append(f"  ... and {len(gaps) - 20} more run(s)")
        spool = self.spool
        if spool is not None and spool.waiting:
            live = f" ({spool.live} segment(s) still being written)" if spool.live else ""
            target = f" --study {study}" if study else ""
            out.append(f"MLflow: {spool.describe()}{live}; replay: `{REPLAY_HINT}{target}` "
                       f"(or the next sweep launch)")
        if spool is not None and spool.set_aside:
            out.append(f"MLflow: {sum(n for n, _ in spool.set_aside.values())} point(s) of "
                       f"{len(spool.set_aside)} run(s) set aside in {spool.folder}/set-aside "
                       f"(refused for good; `{REPLAY_HINT}{f' --study {study}' if study else ''}` "
                       f"retries them once the cause is "
                       f"fixed, e.g. the run restored):")
            for run_id, (points, reason) in sorted(spool.set_aside.items())[:20]:
                out.append(f"  run {run_id}: {points} point(s): {reason}")
        for trial, run_id, held in self.uncounted[:20]:
            out.append(f"MLflow: trial #{trial} run {run_id} holds {held} point(s) and ended "
                       f"without a count: the worker was killed; its curve may be partial")
        if len(self.uncounted) > 20:
            out.append(f"  ... and {len(self.uncounted) - 20} more run(s) ended without a count")
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
    writer = tracker.process.started
    spool = pending(tracker.uri)
    if not (spool.waiting or spool.set_aside):
        stored = writer.stored if writer is not None else 0
        return [f"MLflow: all {stored} points of this launch stored"]
    return Completeness(spool=spool).lines(study)


def check(tracker: Tracker, experiment_id: str | None) -> Completeness:
    """Compare every ended trial run's expected points with the store, and read the spool."""
    out = Completeness(spool=pending(tracker.uri))
    if experiment_id is None:
        return out
    wanted, numbers, states, uncounted = {}, {}, {}, {}
    for run in tracker.trial_runs(experiment_id):
        run_id = run.info.run_id
        numbers[run_id] = run.data.tags.get("sweep.trial_number", "?")
        states[run_id] = run.data.tags.get(STATE, "")
        expected = expected_points(run.data.tags)
        if expected is None:
            if run.info.status != "RUNNING" and run_id not in out.spool.ends:
                uncounted[run_id] = list(run.data.metrics)  # the keys it holds
            continue
        wanted[run_id] = expected
    stored = stored_points(tracker, {**{run_id: list(e) for run_id, e in wanted.items()},
                                     **uncounted})
    out.uncounted = sorted(((numbers[r], r, sum(stored.get(r, {}).values())) for r in uncounted),
                           key=lambda u: int(u[0]) if u[0].isdigit() else -1)
    out.runs = len(wanted)
    for run_id, expected in wanted.items():
        have = stored.get(run_id, {})
        out.expected += sum(expected.values())
        out.stored += sum(min(have.get(k, 0), n) for k, n in expected.items())
        missing = {k: n - have.get(k, 0) for k, n in expected.items() if have.get(k, 0) < n}
        if missing:
            out.gaps.append(RunGap(run_id, numbers[run_id], missing, states[run_id]))
    out.gaps.sort(key=lambda g: int(g.trial) if g.trial.isdigit() else -1)
    return out
