"""``sweep status``: counts per state, running trials with their worker and heartbeat, stale
MLflow runs; ``--repair`` reconciles the stores (the rules live in ``sweep.loop.budget`` and
``sweep.loop.reconcile``).
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field

import optuna
from optuna.trial import TrialState

from sweep.loop import BUDGET, budget_used, state_counts, update_parent_run
from sweep.loop import Reconciled, reconcile_study, stale_runs, worker_gone
from sweep.stores import grace_period, heartbeat_ages
from sweep.stores import (checkpoint_root, orphans, remove_orphans, storage_key,
                          waiting_with_checkpoint)
from sweep.record import Completeness, check_completeness, replay_spool, restore_set_aside
from sweep.record import Tracker
from sweep.base.text import number_in


#: ``sweep status`` exit codes (docs/scripting.md). RECORD_INCOMPLETE is branch i23's: it owns
#: what "the record is incomplete" means; this module only reads ``Completeness.complete``.
ALL_WELL, RECORD_INCOMPLETE, STALE_TRIALS = 0, 3, 4


@dataclass
class StatusFacts:
    """What ``sweep status`` found, read once; rendered as text (``text``) or JSON (``as_json``)."""

    study: str
    budget: int | None
    used: int
    counts: dict  # complete, pruned, diverged, failed, running, waiting
    running: list[dict]  # number, host, pid, heartbeat_age_s, started_s_ago, stale
    resumable: list[tuple[int, int]]  # (waiting trial, epochs its checkpoint holds)
    stale_runs: list[dict]  # run_id, trial, trial_state: MLflow runs RUNNING for a finished trial
    completeness: Completeness | None  # None: no MLflow store to look at
    repaired: Reconciled | None = None
    checkpoint_root: str = ""
    orphans: list[str] = field(default_factory=list)  # checkpoint files of no live trial
    orphans_removed: int = 0  # by --repair

    @property
    def stale_trials(self) -> list[int]:
        return [r["number"] for r in self.running if r["stale"]]

    @property
    def exit_code(self) -> int:
        return status_exit_code(self)

    def as_json(self) -> dict:
        """The stable keys of ``sweep status --json`` (documented in docs/scripting.md)."""
        c = self.completeness
        mlflow = None
        if c is not None:
            spool = c.spool
            mlflow = {"complete": c.complete, "trial_runs": c.runs, "expected_points": c.expected,
                      "stored_points": c.stored,
                      "gaps": [{"run_id": g.run_id, "trial": number_in(g.trial),
                                "missing": g.missing} for g in c.gaps],
                      "ended_without_count": [{"trial": number_in(t), "run_id": r, "points": n}
                                              for t, r, n in c.uncounted],
                      "finished_without_count": [{"trial": number_in(t), "run_id": r,
                                                  "points": n, "state": state}
                                                 for t, r, n, state in c.unconfirmed],
                      "spool": {"folder": str(spool.folder), "points": spool.total,
                                "runs": len(set(spool.points) | spool.ends),
                                "segments": spool.segments, "live_segments": spool.live,
                                "unreadable": [{"path": path, "why": why} for path, why
                                               in sorted(spool.unreadable.items())],
                                "set_aside": [{"run_id": run, "points": points, "reason": why}
                                              for run, (points, why) in sorted(spool.set_aside.items())]}
                      if spool is not None else None}
        return {"study": self.study, "budget": self.budget, "used": self.used,
                "counts": dict(self.counts), "running": self.running,
                "stale_trials": self.stale_trials,
                "resumable": [{"number": n, "epochs": e} for n, e in self.resumable],
                "stale_runs": self.stale_runs, "mlflow": mlflow,
                "repaired": None if self.repaired is None else
                {"failed_trials": self.repaired.failed_trials,
                 "ended_runs": self.repaired.ended_runs,
                 "removed_checkpoint_files": self.orphans_removed},
                "orphan_checkpoint_files": self.orphans,
                "exit_code": self.exit_code}

    def text(self) -> str:
        c = self.counts
        lines = [f"study {self.study!r}: {self.used}/{self.budget if self.budget else '?'} trials "
                 f"used; complete {c['complete']}, pruned {c['pruned']}, diverged {c['diverged']}, "
                 f"failed {c['failed']}, running {c['running']}, waiting {c['waiting']}"]
        if self.resumable:
            lines.append(f"  {len(self.resumable)} waiting trial(s) resume from a checkpoint: "
                         + ", ".join(f"#{n} ({epochs} epochs done)" for n, epochs in self.resumable))
        for r in self.running:
            age, since = r["heartbeat_age_s"], r["started_s_ago"]
            lines.append(f"  running #{r['number']}: host {r['host'] or '?'} pid "
                         f"{r['pid'] if r['pid'] is not None else '?'}, heartbeat "
                         f"{f'{age:.0f} s ago' if age is not None else 'n/a'}"
                         + (f", started {since:.0f} s ago" if since is not None else "")
                         + (" -- STALE (no live worker)" if r["stale"] else ""))
        if self.stale_trials:
            lines.append(f"fix: sweep status --repair (fails the stale trial(s) "
                         f"{self.stale_trials} and re-enqueues those the retry rule allows)")
        if self.repaired is not None:
            lines.append(f"repaired: failed {len(self.repaired.failed_trials)} stale trial(s)"
                         + (f" {self.repaired.failed_trials}" if self.repaired.failed_trials else "")
                         + f", ended {len(self.repaired.ended_runs)} stale MLflow run(s)")
        for run in self.stale_runs:
            lines.append(f"  stale MLflow run {run['run_id']} (trial "
                         f"#{run['trial'] if run['trial'] is not None else '?'} is "
                         f"{run['trial_state'] or 'unknown'}) is still RUNNING")
        if self.stale_runs:
            lines.append("fix: sweep status --repair (ends those runs as FAILED)")
        if self.orphans_removed:
            lines.append(f"repaired: removed {self.orphans_removed} checkpoint file(s) of no live "
                         f"trial under {self.checkpoint_root}")
        if self.orphans:
            lines += [f"  {len(self.orphans)} checkpoint file(s) of no live trial under "
                      f"{self.checkpoint_root}:", *(f"    {path}" for path in self.orphans),
                      "fix: sweep status --repair (removes them)"]
        if self.completeness is not None:
            lines += self.completeness.lines(self.study)
        return "\n".join(lines)


def status_exit_code(facts: StatusFacts) -> int:
    """0 when all is well; 3 when the record is incomplete (MLflow lacks points, or points wait
    in a spool: ``Completeness.complete``, whose rules branch i23 owns); 4 when trials are
    stale (RUNNING with no live worker). Both: 3, the one that loses results if ignored."""
    if facts.completeness is not None and not facts.completeness.complete:
        return RECORD_INCOMPLETE
    return STALE_TRIALS if facts.stale_trials else ALL_WELL


def show_status(study: str, storage_url: str, tracking_uri: str, repair: bool = False,
                checkpoint_dir: str | None = None) -> tuple[str, StatusFacts]:
    """``sweep status``: (lines said while repairing, the facts of the stored study after
    reconciling it with ``repair``, which also removes checkpoint files of no live trial).
    Creates no store."""
    loaded, tracker, experiment_id = open_for_status(study, storage_url, tracking_uri)
    replayed: list[str] = []
    if repair and tracker is not None:  # first: a replayed run's end beats a repair's guess
        restore_set_aside(tracker, replayed.append)  # the replay retries what was set aside
        replay_spool(tracker, replayed.append)
    fixed = reconcile_study(loaded, tracker, experiment_id) if repair else None
    if repair and tracker is not None:
        update_parent_run(loaded, tracker, experiment_id)
    root = checkpoint_root(checkpoint_dir, storage_url)
    found = orphans(loaded, root, storage_key(storage_url))
    facts = status_facts(loaded, tracker, experiment_id, fixed)
    facts.checkpoint_root, facts.orphans = str(root), [str(p) for p in found]
    if repair and found:  # after the stale trials were failed, so their files count
        facts.orphans_removed, facts.orphans = remove_orphans(found), []
    return "\n".join(replayed), facts


def status_facts(study: optuna.Study, tracker: Tracker | None, experiment_id: str | None,
                 repaired: Reconciled | None = None) -> StatusFacts:
    """Counts per state, running trials (worker host/pid, heartbeat age, whether stale), stale
    MLflow runs and MLflow's completeness, read from the stores; writes nothing.

    A RUNNING trial is stale when its heartbeat is older than the storage's grace period, or
    its worker ran on this host and that process is gone (``reconcile.worker_gone``): the
    two signs ``reconcile`` acts on."""
    trials = study.get_trials(deepcopy=False)
    counts = {**state_counts(study),
              "waiting": sum(1 for t in trials if t.state == TrialState.WAITING)}
    ages, grace = heartbeat_ages(study), grace_period(study)
    running = []
    for t in trials:
        if t.state != TrialState.RUNNING:
            continue
        age = ages.get(t._trial_id)
        started = t.datetime_start
        pid = t.user_attrs.get("pid")
        running.append({
            "number": t.number, "host": t.user_attrs.get("host"),
            "pid": pid if isinstance(pid, int) else None,
            "heartbeat_age_s": round(age, 3) if age is not None else None,
            "started_s_ago": round((dt.datetime.now() - started).total_seconds(), 3)
            if started else None,
            "stale": bool((age is not None and grace is not None and age > grace)
                          or worker_gone(t))})
    stale, completeness = [], None
    if tracker is not None:
        stale = [{"run_id": run.info.run_id, "trial": trial.number if trial else None,
                  "trial_state": trial.state.name if trial else None}
                 for run, trial in stale_runs(study, tracker, experiment_id)]
        completeness = check_completeness(tracker, experiment_id)
    budget = study.user_attrs.get(BUDGET)
    return StatusFacts(study.study_name, int(budget) if budget else None, budget_used(study),
                       counts, running, waiting_with_checkpoint(trials), stale, completeness,
                       repaired)


def status_text(study: optuna.Study, tracker: Tracker | None, experiment_id: str | None,
                repaired: Reconciled | None = None) -> str:
    """Counts per state, running trials with worker host/pid and heartbeat age, stale runs."""
    return status_facts(study, tracker, experiment_id, repaired).text()


def open_for_status(study: str, storage_url: str, tracking_uri: str):
    """(study, tracker or None, experiment id or None) for ``sweep status``; creates no store.

    ``study`` is a study name, or a study file (its ``name`` is used)."""
    from sweep.stores import load_existing_study
    from sweep.base.urls import sqlite_path

    study = stored_name(study)
    loaded = load_existing_study(study, storage_url)
    tracker, experiment_id = None, None
    mlflow_path = sqlite_path(tracking_uri)
    if mlflow_path is None or mlflow_path.is_file():
        tracker = Tracker(tracking_uri)
        experiment_id = tracker.experiment_id(study, create=False)
    return loaded, tracker, experiment_id


def stored_name(study: str) -> str:
    """The stored study's name for ``--study``: a study file (a path, or a name ending in
    .yaml) gives its ``name``; anything else is the name itself."""
    if study.endswith((".yaml", ".yml")) or "/" in study:
        from sweep.study.spec import load_study

        return load_study(study).name
    return study
