"""What ``sweep report`` shows, read from the two stores and computed once: plain dataclasses,
no rendering (``report_render`` turns them into one document, written as Markdown and HTML).

Reads the Optuna study (outcomes, parameters, prune reasons, the confirmation plan) and the
MLflow runs (the real LR curve of every optimizer step, validation accuracy per epoch, the
replicates' final accuracies, device). Writes nothing.

Parameter importance and conditional parameters: ``gamma`` of a step schedule and ``gamma`` of
ReduceLROnPlateau are different parameters that only exist for their scheduler type, so one
importance over all trials would be wrong. The report computes fANOVA (Optuna's default
evaluator, fixed seed) over complete trials in separate groups: all trials over the parameters
every trial has (scheduler, warmup_steps, base_lr), and for each scheduler type over only that
type's trials, including its own parameters.

Search trials and confirmation replicates are kept apart (``sweep.study.phases``): the search
part shows best-of-search values, labelled as such; only replicates give intervals.
"""

from __future__ import annotations

import math
import statistics
import warnings
from dataclasses import dataclass, field
from datetime import datetime

import optuna
from optuna.trial import TrialState

from sweep.errors import TrackingError
from sweep.loop import FINISHED, budget_used, counted, state_counts
from sweep.loop import outcome as trial_outcome
from sweep.record import check_completeness, open_existing_tracker
from sweep.loop import stored_plan
from sweep.stores import load_existing_study
from sweep.base.urls import mask_url
from sweep.study.phases import CONFIRM, GROUP, SEARCH
from sweep.views.stats import Difference, Interval, t_interval, welch

DEFAULT_TOP_K = 5
MIN_IMPORTANCE_TRIALS = 5  # fANOVA on fewer complete trials than this is noise
# A scheduler type with fewer complete search trials than this is listed, not ranked: its best
# of one or two is not comparable with another type's best of ten.
MIN_COMPARE_TRIALS = 3
METRIC_LABELS = {"val_acc": "validation accuracy", "val_loss": "validation loss"}
NO_DECAY = ("plateau", "constant")  # not a fixed decay, for the warmup_vs_plateau question


@dataclass
class TrialRow:
    """One finished search trial. ``outcome``: COMPLETE, PRUNED, DIVERGED, FAIL. ``value``: the
    objective (complete trials); ``last_value``: the last value reported per epoch;
    ``stopped_epoch``: epochs trained (fractional for a mid-epoch divergence)."""

    number: int
    outcome: str
    params: dict
    value: float | None
    last_value: float | None
    test_acc: float | None
    run_id: str | None
    stopped_epoch: float | None
    reason: str
    seconds: float | None

    @property
    def scheduler(self) -> str:
        return str(self.params.get("scheduler", "?"))


@dataclass
class TrialCurve:
    """A trial's LR per optimizer step and validation accuracy per epoch, both in epochs."""

    label: str
    lr_epoch: list[float]
    lr: list[float]
    val_epoch: list[float]
    val: list[float]


@dataclass
class GroupStats:
    """One confirmation group: its replicates' final accuracies and their t intervals.
    Replicates that diverged or failed are counted, not averaged."""

    name: str  # "scheduler:cosine", "warmup:80"
    params: dict
    source: int  # the search trial whose configuration it replicates
    planned: int
    complete: int
    diverged: int
    failed: int
    pending: int  # waiting or running
    val_values: list[float]
    test_values: list[float]
    val: Interval
    test: Interval

    @property
    def kind(self) -> str:
        return self.name.split(":", 1)[0]

    @property
    def label(self) -> str:
        return self.name.split(":", 1)[1]


@dataclass
class Comparison:
    """``a`` minus ``b`` in validation accuracy (decides) and test accuracy (reported)."""

    question: str
    val: Difference
    test: Difference
    note: str = ""


@dataclass
class Confirmation:
    seeds: list[int]
    top: int
    budget: int
    used: int
    groups: list[GroupStats]
    comparisons: list[Comparison]


@dataclass
class ReportData:
    study: str
    description: str
    metric: str
    maximize: bool
    budget: int | None
    used: int
    counts: dict
    wall_seconds: float | None
    trial_seconds: float
    devices: list[str]
    hosts: list[str]
    schedulers: list[str]
    epochs: int | None
    steps_per_epoch: int | None
    training: dict  # model (+ args, parameters), dataset, batch and split sizes as logged
    rows: list[TrialRow]
    best: TrialRow | None
    curves: list[TrialCurve]
    importances: list[tuple[str, dict]]
    importance_notes: list[str]
    experiment_id: str
    parent_run_id: str | None
    tracking_uri: str
    storage_url: str
    confirmation: Confirmation | None = None
    # every searched parameter but scheduler, warmup_steps and base_lr (the warmup figure has
    # those) -> how its axis reads: "log", "linear" or "categorical" (searched_scales)
    searched: dict = field(default_factory=dict)
    # MLflow's completeness (``sweep.record.completeness``): empty when every point is stored
    tracking_notes: list[str] = field(default_factory=list)
    made_at: str = field(default_factory=lambda: datetime.now().strftime("%Y-%m-%d %H:%M"))

    @property
    def metric_label(self) -> str:
        return METRIC_LABELS.get(self.metric, self.metric)


def _int(value) -> int | None:
    try:
        return int(value)
    except (TypeError, ValueError):
        return None


def _stopped_epoch(t, outcome: str, epochs: int | None, spe: int | None) -> float | None:
    if outcome == "COMPLETE":
        return float(epochs) if epochs else float(len(t.intermediate_values))
    step = _int(t.user_attrs.get("prune_step"))
    if step is not None and spe:
        return (step + 1) / spe  # prune_step is the last optimizer step that ran
    epoch = _int(t.user_attrs.get("prune_epoch"))
    return float(epoch + 1) if epoch is not None else float(len(t.intermediate_values))


def _seconds(t) -> float | None:
    if t.datetime_start and t.datetime_complete:
        return (t.datetime_complete - t.datetime_start).total_seconds()
    return None


def run_of(t, runs: dict, by_number: dict):
    run_id = t.user_attrs.get("mlflow_run_id")
    if run_id in runs:
        return runs[run_id]
    return by_number.get(str(t.number))


def load_report_data(study_name: str, storage_url: str, tracking_uri: str,
                     top_k: int = DEFAULT_TOP_K) -> ReportData:
    """Everything the report shows, read from the two stores; writes nothing."""
    study = load_existing_study(study_name, storage_url)
    tracker = open_existing_tracker(tracking_uri)
    experiment_id = tracker.experiment_id(study_name, create=False)
    if experiment_id is None:
        raise TrackingError(f"no MLflow experiment {study_name!r} in {mask_url(tracking_uri)}; "
                            f"pass --tracking-uri URI of the store the study logged to")
    client = tracker.client
    parents = tracker.study_runs(experiment_id, study_name)
    parent = parents[0] if parents else None
    runs = {r.info.run_id: r for r in tracker.trial_runs(experiment_id)}
    by_number = {r.data.tags.get("sweep.trial_number"): r for r in runs.values()}

    pparams = parent.data.params if parent else {}
    metric = pparams.get("objective.metric", "val_acc")
    first = next(iter(runs.values()), None)
    epochs = _int((first.data.params if first else {}).get("epochs")) or _int(pparams.get("train.epochs"))
    spe = _int((first.data.params if first else {}).get("steps_per_epoch"))

    every = study.get_trials(deepcopy=False)
    trials = [t for t in counted(every, SEARCH) if t.state in FINISHED]
    rows = []
    for t in sorted(trials, key=lambda t: t.number):
        outcome = trial_outcome(t)
        run = run_of(t, runs, by_number)
        inter = [t.intermediate_values[k] for k in sorted(t.intermediate_values)]
        finite = [v for v in inter if v is not None and math.isfinite(v)]
        reason = str(t.user_attrs.get("prune_reason", "")) if outcome in ("PRUNED", "DIVERGED") \
            else str(t.user_attrs.get("error", ""))[:120] if outcome == "FAIL" else ""
        rows.append(TrialRow(
            number=t.number, outcome=outcome, params=dict(t.params),
            value=t.value if outcome == "COMPLETE" else None,
            last_value=finite[-1] if finite else None, test_acc=t.user_attrs.get("test_acc"),
            run_id=run.info.run_id if run else t.user_attrs.get("mlflow_run_id"),
            stopped_epoch=_stopped_epoch(t, outcome, epochs, spe), reason=reason,
            seconds=_seconds(t)))
    # Studies with a single scheduler type have no "scheduler" parameter: take it from MLflow.
    for row in rows:
        if "scheduler" not in row.params and row.run_id in runs:
            row.params["scheduler"] = runs[row.run_id].data.params.get("scheduler", "?")

    maximize = study.direction == optuna.study.StudyDirection.MAXIMIZE
    complete = [r for r in rows if r.outcome == "COMPLETE" and r.value is not None]
    ranked = sorted(complete, key=lambda r: r.value, reverse=maximize)
    schedulers = _scheduler_order(study, rows)
    imp, imp_notes = compute_importances(study, trials, schedulers)

    starts = [t.datetime_start for t in trials if t.datetime_start]
    ends = [t.datetime_complete for t in trials if t.datetime_complete]
    devices = sorted({r.data.params.get("device") for r in runs.values() if r.data.params.get("device")})
    hosts = sorted({str(t.user_attrs["host"]) for t in trials if t.user_attrs.get("host")})
    budget = study.user_attrs.get("sweep.budget")
    curves = [_curve(client, r, spe) for r in ranked[:top_k] if r.run_id]
    notes = check_completeness(tracker, experiment_id).lines(study_name)
    notes = [] if len(notes) == 1 and notes[0].startswith("MLflow: all ") else notes
    notes += [f"MLflow holds no `lr` point of {c.label.split(':')[0]}: its curve is missing "
              f"from the figure" for c in curves if not c.lr]
    return ReportData(
        study=study_name, description=str(study.user_attrs.get("sweep.description", "")).strip(),
        metric=metric, maximize=maximize, budget=_int(budget), used=budget_used(study),
        counts=state_counts(study, SEARCH),
        wall_seconds=(max(ends) - min(starts)).total_seconds() if starts and ends else None,
        trial_seconds=sum(r.seconds or 0.0 for r in rows), devices=devices, hosts=hosts,
        schedulers=schedulers, epochs=epochs, steps_per_epoch=spe,
        training={k: (first.data.params if first else {}).get(k)
                  for k in ("model", "model_args", "model_parameters", "dataset", "batch_size",
                            "train_size", "val_size")}, rows=rows,
        best=ranked[0] if ranked else None,
        curves=curves, tracking_notes=notes,
        importances=imp, importance_notes=imp_notes, searched=searched_scales(trials),
        experiment_id=experiment_id,
        parent_run_id=parent.info.run_id if parent else None, tracking_uri=tracking_uri,
        storage_url=storage_url, confirmation=load_confirmation(study, every, runs, by_number))


def _scheduler_order(study: optuna.Study, rows: list[TrialRow]) -> list[str]:
    """Scheduler types in the study's declared order (the categorical's choices)."""
    for t in study.get_trials(deepcopy=False):
        dist = t.distributions.get("scheduler")
        if isinstance(dist, optuna.distributions.CategoricalDistribution):
            return [str(c) for c in dist.choices]
    return sorted({r.scheduler for r in rows})


def _curve(client, row: TrialRow, spe: int | None) -> TrialCurve:
    lr = sorted((m.step, m.value) for m in client.get_metric_history(row.run_id, "lr"))
    val = sorted((m.step, m.value) for m in client.get_metric_history(row.run_id, "val_acc"))
    scale = 1.0 / spe if spe else 1.0
    p = row.params
    label = (f"#{row.number} {row.scheduler}, warmup {p.get('warmup_steps', '?')} steps, "
             f"base LR {fmt(p.get('base_lr'))}: {fmt(row.value)}")
    return TrialCurve(label=label, lr_epoch=[s * scale for s, _ in lr], lr=[v for _, v in lr],
                      # val_acc of epoch e is measured after e + 1 epochs of training
                      val_epoch=[s + 1.0 for s, _ in val], val=[v for _, v in val])


def searched_scales(trials) -> dict[str, str]:
    """Each searched parameter besides scheduler, warmup_steps and base_lr (weight_decay,
    warmup_shape, a schedule's gamma ...), in first-seen order, with its axis: "categorical",
    "log" (a log range) or "linear"."""
    scales: dict[str, str] = {}
    for t in trials:
        for name, dist in t.distributions.items():
            if name in ("scheduler", "warmup_steps", "base_lr") or name in scales:
                continue
            scales[name] = ("categorical" if isinstance(
                dist, optuna.distributions.CategoricalDistribution)
                else "log" if getattr(dist, "log", False) else "linear")
    return scales


def compute_importances(study: optuna.Study, trials, schedulers: list[str]):
    """fANOVA importances per group (see the module docstring). Returns ([(title, {param:
    importance})], notes); a group with too few complete trials gets a note instead."""
    from optuna.importance import FanovaImportanceEvaluator, get_param_importances

    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    groups = [("all trials", complete, lambda name: name != "")]
    if len(schedulers) > 1:
        for name in schedulers:
            groups.append((f"scheduler = {name}", [t for t in complete
                                                   if t.params.get("scheduler") == name],
                           lambda p: p != "scheduler"))
    out, notes = [], []
    for title, members, keep in groups:
        common = set.intersection(*(set(t.distributions) for t in members)) if members else set()
        # a parameter with the same name but another range in some trials is not comparable
        params = sorted(p for p in common if keep(p)
                        and len({repr(t.distributions[p]) for t in members}) == 1)
        if len(members) < MIN_IMPORTANCE_TRIALS:
            notes.append(f"{title}: {len(members)} complete trial(s), too few for fANOVA "
                         f"(needs {MIN_IMPORTANCE_TRIALS})")
            continue
        if not params:
            notes.append(f"{title}: no sampled parameter to rank")
            continue
        verbosity = optuna.logging.get_verbosity()
        optuna.logging.set_verbosity(optuna.logging.WARNING)  # no "study created" line per group
        try:
            sub = optuna.create_study(direction=study.direction)
        finally:
            optuna.logging.set_verbosity(verbosity)
        sub.add_trials(members)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            values = get_param_importances(sub, evaluator=FanovaImportanceEvaluator(seed=0),
                                           params=params)
        out.append((f"{title} (n={len(members)})", dict(values)))
    return out, notes


# --- the confirmation ---------------------------------------------------------------------------

def _accuracies(t, run) -> tuple[float | None, float | None]:
    """A replicate's final validation and test accuracy, as MLflow holds them (the last
    ``val_acc`` logged, at the last epoch), else as Optuna does."""
    metrics = run.data.metrics if run is not None else {}
    val = metrics.get("val_acc")
    test = metrics.get("test_acc", t.user_attrs.get("test_acc"))
    return val, test


def load_confirmation(study: optuna.Study, every, runs: dict, by_number: dict) -> Confirmation | None:
    """The replicates' statistics per group and the question's comparisons (None before
    ``sweep confirm`` has planned anything)."""
    plan = stored_plan(study)
    if plan is None:
        return None
    mine = counted(every, CONFIRM)
    groups = []
    for g in plan.groups:
        members = [t for t in mine if t.user_attrs.get(GROUP) == g.name]
        val, test = [], []
        for t in members:
            if t.state == TrialState.COMPLETE:
                v, te = _accuracies(t, run_of(t, runs, by_number))
                if v is not None:
                    val.append(v)
                if te is not None:
                    test.append(te)
        finished = [t for t in members if t.state in FINISHED]
        groups.append(GroupStats(
            name=g.name, params=dict(g.params), source=g.source, planned=len(plan.seeds),
            complete=sum(t.state == TrialState.COMPLETE for t in members),
            diverged=sum(t.state == TrialState.PRUNED for t in members),
            failed=sum(t.state == TrialState.FAIL for t in members),
            pending=len(plan.seeds) - len(finished), val_values=val, test_values=test,
            val=t_interval(val), test=t_interval(test)))
    return Confirmation(list(plan.seeds), plan.top, plan.budget,
                        sum(1 for t in mine if t.state in FINISHED), groups, comparisons(groups))


def comparisons(groups: list[GroupStats]) -> list[Comparison]:
    """The question's comparisons: the best fixed decay vs plateau (the fixed decay chosen by
    its replicates' mean validation accuracy, never the test set), and each warmup length vs
    none (or vs the shortest the space allows)."""
    out = []
    first = {g.label: g for g in groups if g.kind == "scheduler" and "#" not in g.label}
    plateau = first.get("plateau")
    fixed = [g for name, g in first.items() if name not in NO_DECAY and g.val.n >= 2]
    if plateau is not None and fixed:
        best = max(fixed, key=lambda g: g.val.mean)
        note = (f"{best.label} is the fixed decay with the highest mean validation accuracy "
                f"of the {len(fixed)} confirmed" if len(fixed) > 1 else "")
        out.append(Comparison("best fixed decay vs ReduceLROnPlateau",
                              welch(best.val_values, plateau.val_values, best.name, plateau.name),
                              welch(best.test_values, plateau.test_values, best.name, plateau.name),
                              note))
    levels = sorted((g for g in groups if g.kind == "warmup"), key=lambda g: int(g.label))
    if len(levels) > 1:
        base = levels[0]
        for g in levels[1:]:
            out.append(Comparison(f"warmup {g.label} vs {base.label} steps",
                                  welch(g.val_values, base.val_values, g.name, base.name),
                                  welch(g.test_values, base.test_values, g.name, base.name)))
    return out


# --- search-phase summaries -----------------------------------------------------------------------

def fmt(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def scheduler_table(data: ReportData) -> list[dict]:
    """Per scheduler type: trials, outcomes, best and median objective over complete trials
    (pruned trials' last values never enter a ranking)."""
    out = []
    for name in data.schedulers:
        mine = [r for r in data.rows if r.scheduler == name]
        values = [r.value for r in mine if r.outcome == "COMPLETE" and r.value is not None]
        best = (max(values) if data.maximize else min(values)) if values else None
        out.append({"scheduler": name, "trials": len(mine), "complete": len(values),
                    "pruned": sum(r.outcome == "PRUNED" for r in mine),
                    "diverged": sum(r.outcome == "DIVERGED" for r in mine),
                    "failed": sum(r.outcome == "FAIL" for r in mine),
                    "best": best, "median": statistics.median(values) if values else None})
    return out


def spearman(xs: list[float], ys: list[float]) -> float | None:
    import numpy as np

    if len(xs) < 3 or len(set(xs)) < 2 or len(set(ys)) < 2:
        return None
    rx = np.argsort(np.argsort(xs)).astype(float)
    ry = np.argsort(np.argsort(ys)).astype(float)
    return float(np.corrcoef(rx, ry)[0, 1])
