"""``sweep report``: answer the study's question in one self-contained folder.

Reads the Optuna study (outcomes, parameters, prune reasons) and the MLflow runs (the real LR
curve of every optimizer step, validation accuracy per epoch, device), then writes
``index.html`` and ``summary.md`` with PNG figures beside them (no server, no network, no
scripts) and logs the same files as artifacts of the study's parent MLflow run under
``report/``. Every read happens before the first write, so an unknown study or an unreachable
store creates nothing.

Parameter importance and conditional parameters: ``gamma`` of a step schedule and ``gamma`` of
ReduceLROnPlateau are different parameters that only exist for their scheduler type, so one
importance over all trials would be wrong. The report computes fANOVA (Optuna's default
evaluator, fixed seed) over complete trials in separate groups: all trials over the parameters
every trial has (scheduler, warmup_steps, base_lr), and for each scheduler type over only that
type's trials, including its own parameters.
"""

from __future__ import annotations

import html
import math
import statistics
import warnings
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import optuna
from optuna.trial import TrialState

from sweep.orchestration.bookkeeping import FINISHED, budget_used, counted, state_counts
from sweep.errors import SweepError, TrackingError
from sweep.orchestration.storage import load_existing_study, mask_url
from sweep.orchestration.tracking import open_existing_tracker

DEFAULT_TOP_K = 5
MIN_IMPORTANCE_TRIALS = 5  # fANOVA on fewer complete trials than this is noise
REPORT_ARTIFACT_PATH = "report"
METRIC_LABELS = {"val_acc": "validation accuracy", "val_loss": "validation loss"}


# --- the data ---------------------------------------------------------------------------------

@dataclass
class TrialRow:
    """One finished trial as the report sees it. ``outcome``: COMPLETE, PRUNED, DIVERGED, FAIL.
    ``value``: the objective (complete trials); ``last_value``: the last value reported per
    epoch; ``stopped_epoch``: epochs trained (fractional for a mid-epoch divergence)."""

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
class Curve:
    label: str
    lr_epoch: list[float]
    lr: list[float]
    val_epoch: list[float]
    val: list[float]


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
    training: dict  # model, batch_size, train_size, val_size as the trials logged them
    rows: list[TrialRow]
    best: TrialRow | None
    curves: list[Curve]
    importances: list[tuple[str, dict]]
    importance_notes: list[str]
    experiment_id: str
    parent_run_id: str | None
    tracking_uri: str
    storage_url: str
    made_at: str = field(default_factory=lambda: datetime.now().strftime("%Y-%m-%d %H:%M"))

    @property
    def metric_label(self) -> str:
        return METRIC_LABELS.get(self.metric, self.metric)


def _outcome(t: optuna.trial.FrozenTrial) -> str:
    if t.state == TrialState.PRUNED:
        return "DIVERGED" if t.user_attrs.get("prune_reason") == "diverged" else "PRUNED"
    return t.state.name


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

    trials = [t for t in counted(study.get_trials(deepcopy=False)) if t.state in FINISHED]
    rows = []
    for t in sorted(trials, key=lambda t: t.number):
        outcome = _outcome(t)
        run_id = t.user_attrs.get("mlflow_run_id")
        if run_id not in runs and str(t.number) in by_number:
            run_id = by_number[str(t.number)].info.run_id
        inter = [t.intermediate_values[k] for k in sorted(t.intermediate_values)]
        finite = [v for v in inter if v is not None and math.isfinite(v)]
        reason = str(t.user_attrs.get("prune_reason", "")) if outcome in ("PRUNED", "DIVERGED") \
            else str(t.user_attrs.get("error", ""))[:120] if outcome == "FAIL" else ""
        rows.append(TrialRow(
            number=t.number, outcome=outcome, params=dict(t.params),
            value=t.value if outcome == "COMPLETE" else None,
            last_value=finite[-1] if finite else None, test_acc=t.user_attrs.get("test_acc"),
            run_id=run_id, stopped_epoch=_stopped_epoch(t, outcome, epochs, spe), reason=reason,
            seconds=_seconds(t)))
    # Studies with a single scheduler type have no "scheduler" parameter: take it from MLflow.
    for row in rows:
        if "scheduler" not in row.params and row.run_id in runs:
            row.params["scheduler"] = runs[row.run_id].data.params.get("scheduler", "?")

    maximize = study.direction == optuna.study.StudyDirection.MAXIMIZE
    complete = [r for r in rows if r.outcome == "COMPLETE" and r.value is not None]
    ranked = sorted(complete, key=lambda r: r.value, reverse=maximize)
    schedulers = _scheduler_order(study, rows)
    imp, notes = compute_importances(study, trials, schedulers)

    starts = [t.datetime_start for t in trials if t.datetime_start]
    ends = [t.datetime_complete for t in trials if t.datetime_complete]
    devices = sorted({r.data.params.get("device") for r in runs.values() if r.data.params.get("device")})
    hosts = sorted({str(t.user_attrs["host"]) for t in trials if t.user_attrs.get("host")})
    budget = study.user_attrs.get("sweep.budget")
    return ReportData(
        study=study_name, description=str(study.user_attrs.get("sweep.description", "")).strip(),
        metric=metric, maximize=maximize, budget=_int(budget), used=budget_used(study),
        counts=state_counts(study),
        wall_seconds=(max(ends) - min(starts)).total_seconds() if starts and ends else None,
        trial_seconds=sum(r.seconds or 0.0 for r in rows), devices=devices, hosts=hosts,
        schedulers=schedulers, epochs=epochs, steps_per_epoch=spe,
        training={k: (first.data.params if first else {}).get(k)
                  for k in ("model", "batch_size", "train_size", "val_size")}, rows=rows,
        best=ranked[0] if ranked else None,
        curves=[_curve(client, r, spe) for r in ranked[:top_k] if r.run_id],
        importances=imp, importance_notes=notes, experiment_id=experiment_id,
        parent_run_id=parent.info.run_id if parent else None, tracking_uri=tracking_uri,
        storage_url=storage_url)


def _scheduler_order(study: optuna.Study, rows: list[TrialRow]) -> list[str]:
    """Scheduler types in the study's declared order (the categorical's choices)."""
    for t in study.get_trials(deepcopy=False):
        dist = t.distributions.get("scheduler")
        if isinstance(dist, optuna.distributions.CategoricalDistribution):
            return [str(c) for c in dist.choices]
    return sorted({r.scheduler for r in rows})


def _curve(client, row: TrialRow, spe: int | None) -> Curve:
    """A trial's LR per optimizer step and validation accuracy per epoch, both in epochs."""
    lr = sorted((m.step, m.value) for m in client.get_metric_history(row.run_id, "lr"))
    val = sorted((m.step, m.value) for m in client.get_metric_history(row.run_id, "val_acc"))
    scale = 1.0 / spe if spe else 1.0
    p = row.params
    label = (f"#{row.number} {row.scheduler}, warmup {p.get('warmup_steps', '?')} steps, "
             f"base LR {_fmt(p.get('base_lr'))}: {_fmt(row.value)}")
    return Curve(label=label, lr_epoch=[s * scale for s, _ in lr], lr=[v for _, v in lr],
                 # val_acc of epoch e is measured after e + 1 epochs of training
                 val_epoch=[s + 1.0 for s, _ in val], val=[v for _, v in val])


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


# --- rendering --------------------------------------------------------------------------------

def _fmt(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    seconds = int(round(seconds))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h} h {m:02d} min" if h else f"{m} min {s:02d} s" if m else f"{s} s"


def scheduler_table(data: ReportData) -> list[dict]:
    """Per scheduler type: trials, outcomes, best and median objective over complete trials."""
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


def _spearman(xs: list[float], ys: list[float]) -> float | None:
    import numpy as np

    if len(xs) < 3 or len(set(xs)) < 2 or len(set(ys)) < 2:
        return None
    rx = np.argsort(np.argsort(xs)).astype(float)
    ry = np.argsort(np.argsort(ys)).astype(float)
    return float(np.corrcoef(rx, ry)[0, 1])


def at_a_glance(data: ReportData) -> list[str]:
    """Plain sentences answering 'which schedule, how much warmup', computed from the data."""
    lines = []
    table = [r for r in scheduler_table(data) if r["best"] is not None]
    if table:
        table.sort(key=lambda r: r["best"], reverse=data.maximize)
        ranking = "; ".join(f"{r['scheduler']} best {_fmt(r['best'])}, median {_fmt(r['median'])} "
                            f"({r['complete']} complete of {r['trials']})" for r in table)
        lines.append(f"Scheduler types ranked by best {data.metric_label}: {ranking}.")
        plateau = [r for r in table if r["scheduler"] == "plateau"]
        fixed = [r for r in table if r["scheduler"] not in ("plateau", "constant")]
        if plateau and fixed:  # the warmup_vs_plateau question: a fixed decay vs plateau
            winner = fixed[0]  # table is sorted best first
            better = (winner["best"] > plateau[0]["best"]) == data.maximize
            lines.append(f"Fixed decay vs ReduceLROnPlateau: the best fixed decay ({winner['scheduler']}, "
                         f"{_fmt(winner['best'])}) {'beats' if better else 'does not beat'} plateau "
                         f"({_fmt(plateau[0]['best'])}) on best {data.metric}.")
    else:
        lines.append("No trial has completed yet, so no scheduler type can be ranked.")
    if data.best is not None:
        b = data.best
        lines.append(f"Best trial #{b.number}: {b.scheduler}, warmup_steps={_fmt(b.params.get('warmup_steps'))}, "
                     f"base_lr={_fmt(b.params.get('base_lr'))} -> {data.metric} {_fmt(b.value)}"
                     + (f", test accuracy {_fmt(b.test_acc)}" if b.test_acc is not None else "") + ".")
    complete = [r for r in data.rows if r.outcome == "COMPLETE" and r.value is not None
                and r.params.get("warmup_steps") is not None]
    top = sorted(complete, key=lambda r: r.value, reverse=data.maximize)[:DEFAULT_TOP_K]
    if top:
        w = [float(r.params["warmup_steps"]) for r in top]
        rho = _spearman([float(r.params["warmup_steps"]) for r in complete],
                        [r.value for r in complete])
        lines.append(f"Warmup of the top {len(top)} complete trials: {min(w):g} to {max(w):g} "
                     f"optimizer steps (median {statistics.median(w):g})"
                     + (f"; rank correlation of warmup_steps with {data.metric} over "
                        f"{len(complete)} complete trials: {rho:+.2f}." if rho is not None else "."))
    stopped = [r for r in data.rows if r.outcome == "DIVERGED"]
    if stopped:
        lrs = [float(r.params["base_lr"]) for r in stopped if r.params.get("base_lr") is not None]
        lines.append(f"{len(stopped)} trial(s) diverged" + (f" (base_lr {min(lrs):.3g} to "
                                                            f"{max(lrs):.3g})" if lrs else "") + ".")
    return lines


@dataclass
class Figures:
    """File names (relative to the report folder) of the figures that were drawn."""

    files: dict = field(default_factory=dict)  # key -> file name


def draw_figures(data: ReportData, out_dir: Path) -> Figures:
    from sweep.views import plots

    colours = plots.scheduler_colours(data.schedulers)
    made = Figures()

    def save(key: str, fig) -> None:
        name = f"{key}.png"
        fig.savefig(out_dir / name, dpi=100)
        made.files[key] = name

    label = data.metric_label
    groups = {s: [r.value for r in data.rows if r.scheduler == s and r.outcome == "COMPLETE"
                  and r.value is not None] for s in data.schedulers}
    pruned = {s: [r.last_value for r in data.rows if r.scheduler == s
                  and r.outcome in ("PRUNED", "DIVERGED") and r.last_value is not None]
              for s in data.schedulers}
    if data.rows:
        save("schedulers", plots.scheduler_strip(groups, pruned, colours, label))
        points = [{"warmup_steps": r.params.get("warmup_steps"), "base_lr": r.params.get("base_lr"),
                   "scheduler": r.scheduler, "complete": r.outcome == "COMPLETE",
                   "value": r.value if r.outcome == "COMPLETE" else r.last_value} for r in data.rows]
        save("warmup", plots.warmup_effect(points, colours, label))
    if data.curves:
        save("top_curves", plots.top_k_curves(
            [vars(c) for c in data.curves], label, data.epochs))
    if data.importances:
        save("importance", plots.importances(data.importances))
    if data.rows:
        save("history", plots.history(
            [{"number": r.number, "outcome": r.outcome,
              "value": r.value if r.outcome == "COMPLETE" else r.last_value} for r in data.rows],
            label, data.maximize))
        save("timeline", plots.timeline(
            [{"number": r.number, "outcome": r.outcome, "stopped_epoch": r.stopped_epoch,
              "reason": r.reason}
             for r in data.rows], data.epochs))
    return made


def _facts(data: ReportData) -> list[tuple[str, str]]:
    c = data.counts
    return [
        ("budget used", f"{data.used} of {data.budget if data.budget is not None else '?'} trials"),
        ("outcomes", f"{c['complete']} complete, {c['pruned']} pruned by the pruner, "
                     f"{c['diverged']} diverged, {c['failed']} failed"
                     + (f", {c['running']} running" if c.get("running") else "")),
        ("wall time", f"{_duration(data.wall_seconds)} (first trial start to last trial end); "
                      f"{_duration(data.trial_seconds)} of trial time in total"),
        ("device", ", ".join(data.devices) or "-"),
        ("hosts", ", ".join(data.hosts) or "-"),
        ("objective", f"{data.metric} of the last epoch, {'maximized' if data.maximize else 'minimized'}"),
        ("training", f"{data.training.get('model') or '?'}, {data.epochs or '?'} epochs x "
                     f"{data.steps_per_epoch or '?'} optimizer steps (batch "
                     f"{data.training.get('batch_size') or '?'}; {data.training.get('train_size') or '?'} "
                     f"training / {data.training.get('val_size') or '?'} validation images)"),
        ("Optuna storage", mask_url(data.storage_url)),
        ("MLflow", f"{mask_url(data.tracking_uri)}, experiment {data.experiment_id}, parent run "
                   f"{data.parent_run_id or '-'}"),
    ]


SECTIONS = (  # (figure key, heading, caption)
    ("schedulers", "Scheduler types",
     "Final {metric} of every complete trial per scheduler type (box: quartiles of complete "
     "trials; hollow grey: last value of pruned trials)."),
    ("warmup", "Effect of warmup and base LR",
     "Each point is a trial; filled = complete (final value), hollow = pruned (last value)."),
    ("top_curves", "Learning-rate curves of the top trials",
     "The LR actually used at every optimizer step (from MLflow metric `lr`), with the "
     "validation accuracy after each epoch, for the best complete trials only."),
    ("importance", "Parameter importance",
     "fANOVA (Optuna, seed 0) over complete trials. Conditional parameters are handled by "
     "grouping: 'all trials' ranks only the parameters every trial has; each 'scheduler = X' "
     "panel uses only the trials of that type, with that type's own parameters."),
    ("history", "Optimization history", "Objective per trial and the best value so far."),
    ("timeline", "Pruning and divergence timeline",
     "How many epochs each trial trained before it completed or was stopped, and why."),
)


def render_markdown(data: ReportData, figures: Figures) -> str:
    lines = [f"# Study `{data.study}`", "", f"**Question:** {data.description or '(no description)'}", "",
             "## At a glance", ""]
    lines += [f"- {s}" for s in at_a_glance(data)] + ["", "## Run", "", "| | |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in _facts(data)]
    lines += ["", "## Best trial", ""]
    if data.best is None:
        lines.append("No complete trial yet.")
    else:
        b = data.best
        lines += [f"Trial #{b.number}: {data.metric} {_fmt(b.value)}, test accuracy "
                  f"{_fmt(b.test_acc)}, MLflow run `{b.run_id}`.", "", "| parameter | value |",
                  "|---|---|"] + [f"| {k} | {_fmt(v)} |" for k, v in b.params.items()]
    lines += ["", "## Per scheduler type", "",
              f"| scheduler | trials | complete | pruned | diverged | failed | best {data.metric} "
              f"| median {data.metric} |", "|---|---|---|---|---|---|---|---|"]
    lines += [f"| {r['scheduler']} | {r['trials']} | {r['complete']} | {r['pruned']} | "
              f"{r['diverged']} | {r['failed']} | {_fmt(r['best'])} | {_fmt(r['median'])} |"
              for r in scheduler_table(data)]
    for key, heading, caption in SECTIONS:
        lines += ["", f"## {heading}", "", caption.format(metric=data.metric)]
        if key == "importance":
            for title, values in data.importances:
                lines.append(f"- {title}: " + ", ".join(
                    f"{k} {v:.2f}" for k, v in sorted(values.items(), key=lambda kv: -kv[1])))
            lines += [f"- {n}" for n in data.importance_notes]
        if key in figures.files:
            lines += ["", f"![{heading}]({figures.files[key]})"]
    lines += ["", "### Stopped trials", "", "| trial | outcome | stopped after (epochs) | reason | "
              "scheduler | warmup_steps | base_lr |", "|---|---|---|---|---|---|---|"]
    lines += [f"| {r.number} | {r.outcome.lower()} | {_fmt(r.stopped_epoch)} | {r.reason or '-'} | "
              f"{r.scheduler} | {_fmt(r.params.get('warmup_steps'))} | {_fmt(r.params.get('base_lr'))} |"
              for r in data.rows if r.outcome != "COMPLETE"]
    lines += ["", f"_Made by `sweep report` at {data.made_at}._", ""]
    return "\n".join(lines)


_CSS = """body{font-family:system-ui,-apple-system,'Segoe UI',sans-serif;max-width:1150px;margin:2em auto;
padding:0 1em;color:#222;line-height:1.45}h1{margin-bottom:.2em}h2{border-bottom:1px solid #ddd;
padding-bottom:.2em;margin-top:1.6em}table{border-collapse:collapse;margin:.6em 0}td,th{border:1px solid
#ddd;padding:.25em .6em;text-align:left}th{background:#f4f4f4}img{max-width:100%;height:auto;
border:1px solid #eee}.q{font-size:1.15em;background:#f6f8fa;padding:.6em 1em;border-left:4px solid
#4c72b0}.glance li{margin:.3em 0}code{background:#f4f4f4;padding:0 .2em}.cap{color:#555}"""


def render_html(data: ReportData, figures: Figures) -> str:
    e = html.escape
    out = [f"<!doctype html><html lang='en'><head><meta charset='utf-8'>"
           f"<title>sweep report: {e(data.study)}</title><style>{_CSS}</style></head><body>",
           f"<h1>Study <code>{e(data.study)}</code></h1>",
           f"<p class='q'><b>Question:</b> {e(data.description or '(no description)')}</p>",
           "<h2>At a glance</h2><ul class='glance'>"]
    out += [f"<li>{e(s)}</li>" for s in at_a_glance(data)] + ["</ul><h2>Run</h2><table>"]
    out += [f"<tr><th>{e(k)}</th><td>{e(v)}</td></tr>" for k, v in _facts(data)] + ["</table>"]
    out.append("<h2>Best trial</h2>")
    if data.best is None:
        out.append("<p>No complete trial yet.</p>")
    else:
        b = data.best
        out.append(f"<p>Trial #{b.number}: {e(data.metric)} <b>{_fmt(b.value)}</b>, test accuracy "
                   f"<b>{_fmt(b.test_acc)}</b>, MLflow run <code>{e(str(b.run_id))}</code> "
                   f"(open it with <code>sweep ui --study {e(data.study)}</code>).</p><table>"
                   "<tr><th>parameter</th><th>value</th></tr>")
        out += [f"<tr><td>{e(k)}</td><td>{e(_fmt(v))}</td></tr>" for k, v in b.params.items()]
        out.append("</table>")
    out.append("<h2>Per scheduler type</h2><table><tr><th>scheduler</th><th>trials</th>"
               "<th>complete</th><th>pruned</th><th>diverged</th><th>failed</th>"
               f"<th>best {e(data.metric)}</th><th>median {e(data.metric)}</th></tr>")
    out += [f"<tr><td>{e(r['scheduler'])}</td><td>{r['trials']}</td><td>{r['complete']}</td>"
            f"<td>{r['pruned']}</td><td>{r['diverged']}</td><td>{r['failed']}</td>"
            f"<td>{_fmt(r['best'])}</td><td>{_fmt(r['median'])}</td></tr>" for r in scheduler_table(data)]
    out.append("</table>")
    for key, heading, caption in SECTIONS:
        if key != "schedulers":
            out.append(f"<h2>{e(heading)}</h2>")
        out.append(f"<p class='cap'>{e(caption.format(metric=data.metric))}</p>")
        if key == "importance":
            items = [f"{title}: " + ", ".join(f"{k} {v:.2f}" for k, v in
                                              sorted(values.items(), key=lambda kv: -kv[1]))
                     for title, values in data.importances] + data.importance_notes
            out.append("<ul>" + "".join(f"<li>{e(n)}</li>" for n in items) + "</ul>")
        if key in figures.files:
            out.append(f"<img src='{e(figures.files[key])}' alt='{e(heading)}'>")
    out.append("<h3>Stopped trials</h3><table><tr><th>trial</th><th>outcome</th>"
               "<th>stopped after (epochs)</th><th>reason</th><th>scheduler</th>"
               "<th>warmup_steps</th><th>base_lr</th></tr>")
    out += [f"<tr><td>{r.number}</td><td>{r.outcome.lower()}</td><td>{_fmt(r.stopped_epoch)}</td>"
            f"<td>{e(r.reason or '-')}</td><td>{e(r.scheduler)}</td>"
            f"<td>{e(_fmt(r.params.get('warmup_steps')))}</td><td>{e(_fmt(r.params.get('base_lr')))}</td></tr>"
            for r in data.rows if r.outcome != "COMPLETE"]
    out.append(f"</table><p class='cap'>Made by <code>sweep report</code> at {e(data.made_at)}.</p>"
               "</body></html>")
    return "\n".join(out)


# --- the command ------------------------------------------------------------------------------

@dataclass
class ReportResult:
    folder: Path
    files: list[Path]
    logged_to: str | None

    @property
    def text(self) -> str:
        logged = (f"; logged to MLflow run {self.logged_to} under {REPORT_ARTIFACT_PATH}/"
                  if self.logged_to else "; no parent MLflow run to log to")
        return f"report: {self.folder / 'index.html'} and summary.md ({len(self.files) - 2} plots){logged}"


def write_report(study_name: str, storage_url: str, tracking_uri: str, out_dir: str | Path | None = None,
                 top_k: int = DEFAULT_TOP_K) -> ReportResult:
    """Read both stores, then write the report folder and log it to the parent MLflow run."""
    folder = Path(out_dir) if out_dir else Path("reports") / study_name
    if folder.exists() and not folder.is_dir():
        raise SweepError(f"report folder {folder} is a file; choose another with -o DIR")
    data = load_report_data(study_name, storage_url, tracking_uri, top_k)
    folder.mkdir(parents=True, exist_ok=True)
    figures = draw_figures(data, folder)
    (folder / "summary.md").write_text(render_markdown(data, figures), encoding="utf-8")
    (folder / "index.html").write_text(render_html(data, figures), encoding="utf-8")
    files = [folder / n for n in figures.files.values()] + [folder / "summary.md", folder / "index.html"]
    if data.parent_run_id:
        from mlflow.tracking import MlflowClient

        client = MlflowClient(tracking_uri=tracking_uri)
        for path in files:
            client.log_artifact(data.parent_run_id, str(path), REPORT_ARTIFACT_PATH)
    return ReportResult(folder, files, data.parent_run_id)
