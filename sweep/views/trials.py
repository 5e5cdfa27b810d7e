"""``sweep best`` and ``sweep export``: a study's trials as data for scripts, read from the two
stores (Optuna: states, values, parameters; MLflow: the run of each trial and its per-epoch
metrics). Writes nothing but the export file, and that only once everything has been read.

The keys are documented in docs/scripting.md; keep them stable.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import optuna

from sweep.errors import NoResultError, SweepError
from sweep.loop import best_trial, outcome
from sweep.stores import load_existing_study
from sweep.record import EPOCH_METRICS, EPOCHS_TRAINED, FINAL_METRICS, open_existing_tracker
from sweep.study.phases import phase_of
from sweep.views.report_model import run_of

FORMATS = ("csv", "json")


@dataclass
class StudyTrials:
    """A study and the MLflow run of each of its trials (None: no run, or no MLflow store)."""

    study: optuna.Study
    runs: dict  # trial number -> mlflow Run
    client: object | None  # MlflowClient, for metric histories


def load_trials(study_name: str, storage_url: str, tracking_uri: str | None) -> StudyTrials:
    """The study (which must exist) and its trials' runs; ``tracking_uri`` None: Optuna only."""
    study = load_existing_study(study_name, storage_url)
    if tracking_uri is None:
        return StudyTrials(study, {}, None)
    tracker = open_existing_tracker(tracking_uri)
    experiment_id = tracker.experiment_id(study_name, create=False)
    runs = {}
    if experiment_id is not None:
        found = {r.info.run_id: r for r in tracker.trial_runs(experiment_id)
                 if r.data.tags.get("optuna.study_name", study_name) == study_name}
        by_number = {r.data.tags.get("sweep.trial_number"): r for r in found.values()}
        for t in study.get_trials(deepcopy=False):
            run = run_of(t, found, by_number)
            if run is not None:
                runs[t.number] = run
    return StudyTrials(study, runs, tracker.client)


def _finite(value):
    """JSON has no NaN or infinity: such a value is written as null."""
    return value if not isinstance(value, float) or math.isfinite(value) else None


def _run_id(trials: StudyTrials, t) -> str | None:
    run = trials.runs.get(t.number)
    return run.info.run_id if run is not None else t.user_attrs.get("mlflow_run_id")


def _entry(trials: StudyTrials, t) -> dict:
    return {"number": t.number, "value": _finite(t.value), "params": dict(t.params),
            "run_id": _run_id(trials, t)}


# --- sweep best -----------------------------------------------------------------------------------

def categorical_choices(study: optuna.Study) -> dict[str, list]:
    """The study's categorical search parameters and their choices, from the trials'
    distributions (so any parameter a study file makes categorical qualifies)."""
    out: dict[str, list] = {}
    for t in study.get_trials(deepcopy=False):
        for name, dist in t.distributions.items():
            if isinstance(dist, optuna.distributions.CategoricalDistribution) and name not in out:
                out[name] = list(dist.choices)
    return out


def best(study_name: str, storage_url: str, tracking_uri: str, per: str | None = None) -> dict:
    """The best complete search trial (number, value, params, run_id), or with ``per`` the best
    of each choice of that categorical parameter. Raises SweepError for an unknown ``per``,
    NoResultError when no search trial has completed."""
    trials = load_trials(study_name, storage_url, tracking_uri)
    study = trials.study
    every = study.get_trials(deepcopy=False)
    head = {"study": study_name, "direction": study.direction.name.lower()}
    if per is None:
        top = best_trial(every, study.direction)
        if top is None:
            raise NoResultError(f"study {study_name!r} has no complete search trial yet; see "
                                f"`sweep status --study {study_name}`")
        return {**head, **_entry(trials, top)}
    choices = categorical_choices(study)
    if per not in choices:
        raise SweepError(f"--per {per}: not a categorical search parameter of study "
                         f"{study_name!r}; its categorical parameters: "
                         f"{', '.join(sorted(choices)) or 'none'}")
    groups = []
    for choice in choices[per]:
        top = best_trial([t for t in every if t.params.get(per) == choice], study.direction)
        entry = _entry(trials, top) if top is not None else \
            {"number": None, "value": None, "params": None, "run_id": None}
        groups.append({"group": choice, **entry})
    if all(g["number"] is None for g in groups):
        raise NoResultError(f"study {study_name!r} has no complete search trial yet; see "
                            f"`sweep status --study {study_name}`")
    return {**head, "per": per, "groups": groups}


def best_text(data: dict) -> str:
    def line(entry: dict) -> str:
        if entry["number"] is None:
            return "no complete trial"
        params = ", ".join(f"{k}={_fmt(v)}" for k, v in entry["params"].items())
        return (f"trial #{entry['number']} value {_fmt(entry['value'])} ({params}); "
                f"MLflow run {entry['run_id'] or '-'}")

    if "groups" not in data:
        return f"best of study {data['study']!r} ({data['direction']}): {line(data)}"
    lines = [f"best of study {data['study']!r} per {data['per']} ({data['direction']}):"]
    width = max(len(str(g["group"])) for g in data["groups"])
    lines += [f"  {str(g['group']):<{width}}  {line(g)}" for g in data["groups"]]
    return "\n".join(lines)


def _fmt(v) -> str:
    return f"{v:.6g}" if isinstance(v, float) else str(v)


# --- sweep export ---------------------------------------------------------------------------------

def check_output(fmt: str, output: str) -> Path:
    """The export's path, checked before anything is read. Raises SweepError."""
    if fmt not in FORMATS:
        raise SweepError(f"--format {fmt}: unknown; use csv or json")
    path = Path(output).expanduser()
    if path.is_dir():
        raise SweepError(f"--output {output}: is a folder; give a file name, e.g. "
                         f"{path / ('trials.' + fmt)}")
    parent = path.parent if str(path.parent) else Path(".")
    if not parent.is_dir():
        raise SweepError(f"--output {output}: folder {parent} does not exist; create it or "
                         f"choose another")
    if not os.access(parent, os.W_OK):
        raise SweepError(f"--output {output}: folder {parent} is not writable; choose another")
    return path


def _epochs_trained(t, run, metrics: dict) -> int:
    """What the trial's run says it trained (its end tag), else the epochs it logged, else the
    epochs Optuna heard of."""
    tagged = run.data.tags.get(EPOCHS_TRAINED) if run is not None else None
    if tagged is not None and tagged.isdigit():
        return int(tagged)
    logged = max((len(v) for v in metrics.values()), default=0)
    return logged or len(t.intermediate_values)


def trial_records(trials: StudyTrials) -> list[dict]:
    """One record per trial, by number: number, state (COMPLETE, PRUNED, DIVERGED, FAIL,
    RUNNING, WAITING), phase, value, params, epochs_trained, run_id, ``metrics`` (each per-epoch
    metric as a list indexed by epoch, None where a point is missing) and ``final`` (test_acc,
    epoch_seconds as MLflow holds them)."""
    out = []
    for t in sorted(trials.study.get_trials(deepcopy=False), key=lambda t: t.number):
        run = trials.runs.get(t.number)
        metrics = {}
        for key in EPOCH_METRICS:
            points = trials.client.get_metric_history(run.info.run_id, key) \
                if run is not None and trials.client is not None else []
            by_epoch = {m.step: m.value for m in points}
            metrics[key] = [_finite(by_epoch.get(e)) for e in range(max(by_epoch, default=-1) + 1)]
        final = {key: _finite(run.data.metrics.get(key)) if run is not None else None
                 for key in FINAL_METRICS}
        out.append({"number": t.number, "state": outcome(t), "phase": phase_of(t),
                    "value": _finite(t.value), "params": dict(t.params),
                    "epochs_trained": _epochs_trained(t, run, metrics),
                    "run_id": _run_id(trials, t), "metrics": metrics, "final": final})
    return out


def trials_frame(trials: StudyTrials):
    """``trial_records`` as a pandas DataFrame beside Optuna's own columns
    (``Study.trials_dataframe()``: number, value, datetimes, duration, params_*, user_attrs_*,
    state): ``outcome`` (COMPLETE, PRUNED, DIVERGED, FAIL, RUNNING, WAITING), ``phase``,
    ``epochs_trained``, ``run_id``, each final metric, and each per-epoch metric as a list by
    epoch (``val_acc_by_epoch``...). One row per trial, by number."""
    frame = trials.study.trials_dataframe(multi_index=False)
    records = {r["number"]: r for r in trial_records(trials)}
    numbers = list(frame["number"]) if len(frame) else []
    columns = {"outcome": lambda r: r["state"], "phase": lambda r: r["phase"],
               "epochs_trained": lambda r: r["epochs_trained"], "run_id": lambda r: r["run_id"],
               **{key: (lambda r, key=key: r["final"][key]) for key in FINAL_METRICS},
               **{f"{key}_by_epoch": (lambda r, key=key: r["metrics"][key])
                  for key in EPOCH_METRICS}}
    for name, read in columns.items():
        frame[name] = [read(records[n]) for n in numbers]
    return frame.sort_values("number").reset_index(drop=True) if numbers else frame


def _csv(records: list[dict]) -> str:
    """Flat columns: number, state, phase, value, every parameter of any trial (empty where a
    trial lacks it), epochs_trained, run_id, test_acc, epoch_seconds, then ``KEY_E`` for each
    per-epoch metric KEY and epoch E (0-based, MLflow's step)."""
    params = sorted({k for r in records for k in r["params"]})
    epochs = {key: max((len(r["metrics"][key]) for r in records), default=0)
              for key in EPOCH_METRICS}
    columns = ["number", "state", "phase", "value", *params, "epochs_trained", "run_id",
               *FINAL_METRICS, *(f"{key}_{e}" for key in EPOCH_METRICS for e in range(epochs[key]))]
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, columns, lineterminator="\n")
    writer.writeheader()
    for r in records:
        row = {"number": r["number"], "state": r["state"], "phase": r["phase"],
               "value": r["value"], **r["params"], "epochs_trained": r["epochs_trained"],
               "run_id": r["run_id"], **r["final"]}
        for key in EPOCH_METRICS:
            row.update({f"{key}_{e}": v for e, v in enumerate(r["metrics"][key])})
        writer.writerow({k: ("" if v is None else repr(v) if isinstance(v, float) else v)
                         for k, v in row.items()})
    return buffer.getvalue()


def export(study_name: str, storage_url: str, tracking_uri: str, fmt: str, output: str) -> str:
    """Write one record per trial to ``output`` as CSV or JSON; returns what was written.
    Bad input (format, folder, study, store) raises SweepError before anything is written; the
    file appears whole or not at all (written beside it, then renamed)."""
    path = check_output(fmt, output)
    records = trial_records(load_trials(study_name, storage_url, tracking_uri))
    text = _csv(records) if fmt == "csv" else json.dumps(
        {"study": study_name, "trials": records}, indent=1, allow_nan=False) + "\n"
    handle, tmp = tempfile.mkstemp(dir=path.parent if str(path.parent) else ".",
                                   prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(handle, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return f"wrote {len(records)} trial(s) of study {study_name!r} to {path} ({fmt})"
