"""``sweep confirm`` end to end on the shared CIFAR-10 subset: a real tiny study is searched,
its confirmation is interrupted with SIGTERM and resumed, the search is resumed afterwards, and
everything is read back through Optuna's and MLflow's own APIs. Group means and intervals are
recomputed here from the MLflow runs with scipy and compared with what the report logged."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import optuna
import pytest
from mlflow.tracking import MlflowClient
from optuna.trial import TrialState
from scipy import stats as sp

from helpers import REPO

pytestmark = pytest.mark.slow

NAME = "confirm_e2e"
SEARCH_TRIALS, SEEDS = 4, 2
STUDY = f"""
name: {NAME}
description: Does cosine beat plateau on a tiny slice? (test study)
seed: 3
trials: {SEARCH_TRIALS}
sampler: {{type: random}}
pruner: {{type: median, n_startup_trials: 1, n_warmup_steps: 0, per: scheduler}}
data: {{train_size: 512, val_size: 256, test_size: 256}}
train: {{model: resnet8, epochs: 2, batch_size: 64}}
space:
  warmup_steps: {{type: int, low: 0, high: 2}}
  base_lr: {{type: float, low: 0.05, high: 0.5, log: true}}
  scheduler:
    cosine: {{}}
    plateau: {{gamma: 0.5, patience_epochs: 1}}
"""


def _env() -> dict:
    return {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO),
            "SWEEP_HEARTBEAT_INTERVAL": "1", "SWEEP_GRACE_PERIOD": "3"}


def _cli(folder: Path, data: Path, *args: str) -> list[str]:
    return [sys.executable, "-m", "sweep.cli", *args, "--study", str(folder / "study.yaml"),
            "--storage", f"sqlite:///{folder}/sweep.db", "--tracking-uri",
            f"sqlite:///{folder}/mlflow.db", "--data-dir", str(data), "--device", "cpu", "--quiet"]


def _run(args, folder) -> subprocess.CompletedProcess:
    done = subprocess.run(args, cwd=folder, capture_output=True, text=True, timeout=600, env=_env())
    assert done.returncode == 0, done.stdout + done.stderr
    return done


def _wait_for_running_replicate(folder: Path, proc: subprocess.Popen) -> None:
    """Until a confirmation trial is RUNNING (the SQLite file read-only, as test_interrupt)."""
    query = ("SELECT count(*) FROM trials t JOIN trial_user_attributes a ON a.trial_id = t.trial_id"
             " WHERE t.state = 'RUNNING' AND a.key = 'sweep.phase' AND a.value_json = '\"confirm\"'")
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.communicate()
        with sqlite3.connect(f"file:{folder / 'sweep.db'}?mode=ro", uri=True) as conn:
            if conn.execute(query).fetchone()[0]:
                return
        time.sleep(0.2)
    raise AssertionError("no confirmation trial started")


@pytest.fixture(scope="module")
def confirmed(tmp_path_factory, shared_cifar):
    folder = tmp_path_factory.mktemp("confirm")
    (folder / "study.yaml").write_text(STUDY)
    _run(_cli(folder, shared_cifar, "launch"), folder)
    # The confirmation, stopped by SIGTERM once a replicate is training ...
    proc = subprocess.Popen(_cli(folder, shared_cifar, "confirm", "--seeds", str(SEEDS),
                                 "--top", "1"), cwd=folder, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=_env())
    _wait_for_running_replicate(folder, proc)
    time.sleep(0.5)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=300)
    storage = f"sqlite:///{folder}/sweep.db"
    after_stop = optuna.load_study(study_name=NAME, storage=storage).get_trials()
    # ... and resumed: re-running sweep confirm runs only the missing replicates.
    resumed = _run(_cli(folder, shared_cifar, "confirm"), folder)
    # The search resumed after the confirmation: two more search trials.
    _run(_cli(folder, shared_cifar, "launch", "--trials", str(SEARCH_TRIALS + 2)), folder)
    return {"folder": folder, "storage": storage, "tracking": f"sqlite:///{folder}/mlflow.db",
            "stopped": proc.returncode, "stop_out": out + err, "after_stop": after_stop,
            "resumed": resumed.stdout}


def _study(c) -> optuna.Study:
    return optuna.load_study(study_name=NAME, storage=c["storage"])


def _confirm_trials(trials):
    return [t for t in trials if t.user_attrs.get("sweep.phase") == "confirm"]


def test_interrupted_confirmation_resumes_to_exactly_its_budget(confirmed):
    assert confirmed["stopped"] == 128 + signal.SIGTERM, confirmed["stop_out"]
    study = _study(confirmed)
    plan = json.loads(study.user_attrs["sweep.confirm_plan"])
    budget = study.user_attrs["sweep.confirm_budget"]
    assert budget == len(plan["groups"]) * SEEDS
    assert f"{budget} trials ({len(plan['groups'])} groups x {SEEDS} seeds" in confirmed["resumed"]
    replicates = _confirm_trials(study.get_trials())
    retried = {n for t in replicates for n in t.system_attrs.get("retry_history", [])}
    interrupted = [t for t in _confirm_trials(confirmed["after_stop"]) if t.state == TrialState.FAIL]
    assert {t.number for t in interrupted} <= retried  # a stopped replicate was re-enqueued
    counted = [t for t in replicates if t.number not in retried]
    assert len(counted) == budget
    assert all(t.state == TrialState.COMPLETE for t in counted)
    # one trial per (group, seed), with the plan's seed as the training seed
    keys = Counter(t.user_attrs["sweep.confirm_key"] for t in counted)
    assert set(keys.values()) == {1} and len(keys) == budget
    assert {t.user_attrs["seed"] for t in counted} == set(plan["seeds"])
    assert not [t for t in study.get_trials() if t.state == TrialState.RUNNING]
    runs = MlflowClient(confirmed["tracking"]).search_runs(
        [MlflowClient(confirmed["tracking"]).get_experiment_by_name(NAME).experiment_id])
    assert not [r for r in runs if r.info.status == "RUNNING"]


def test_replicates_are_fixed_configurations_tagged_in_mlflow(confirmed):
    study = _study(confirmed)
    plan = json.loads(study.user_attrs["sweep.confirm_plan"])
    by_number = {t.number: t for t in study.get_trials()}
    first = min(t.number for t in _confirm_trials(study.get_trials()))
    search = [t for t in study.get_trials() if "sweep.phase" not in t.user_attrs
              and t.state == TrialState.COMPLETE and t.number < first]  # before the confirmation
    for group in plan["groups"]:
        source = by_number[group["source"]]
        if group["name"].startswith("scheduler:"):
            mine = [t for t in search if t.params["scheduler"] == group["name"].split(":")[1]]
            assert source.value == max(t.value for t in mine)  # the type's best search trial
            assert group["params"] == source.params
        else:  # warmup ablation of the overall best
            assert source.value == max(t.value for t in search)
            assert group["params"] == {**source.params,
                                       "warmup_steps": int(group["name"].split(":")[1])}
    client = MlflowClient(confirmed["tracking"])
    exp = client.get_experiment_by_name(NAME).experiment_id
    parent = [r for r in client.search_runs([exp]) if r.data.tags.get("sweep.role") != "trial"]
    for t in _confirm_trials(study.get_trials()):
        run = client.get_run(t.user_attrs["mlflow_run_id"])
        assert run.data.tags["sweep.phase"] == "confirm"
        assert run.data.tags["sweep.group"] == t.user_attrs["sweep.group"]
        assert run.data.tags["mlflow.parentRunId"] == parent[0].info.run_id
        assert int(run.data.params["seed"]) == t.user_attrs["sweep.seed"]
        expected = next(g for g in plan["groups"] if g["name"] == t.user_attrs["sweep.group"])
        assert t.params == expected["params"]


def test_the_sampler_never_saw_a_replicate_and_the_search_budget_ignores_them(confirmed):
    study = _study(confirmed)
    trials = study.get_trials()
    replicates = {t.number for t in _confirm_trials(trials)}
    search = [t for t in trials if t.number not in replicates]
    shown = [set(t.system_attrs["sweep.sampler_saw"]) for t in search]
    assert all(not (s & replicates) for s in shown)
    # the two search trials asked after the confirmation saw every earlier search trial
    late = [t for t in search if t.number > max(replicates)]
    assert len([t for t in late if "sweep.over_budget" not in t.user_attrs]) == 2
    first_late = min(t.number for t in late)
    assert set(trials[first_late].system_attrs["sweep.sampler_saw"]) == \
        {t.number for t in search if t.number < first_late}
    assert study.user_attrs["sweep.budget"] == SEARCH_TRIALS + 2


def _recomputed(values):
    n = len(values)
    mean = sum(values) / n
    low, high = sp.t.interval(0.95, n - 1, loc=mean, scale=sp.sem(values))
    return mean, low, high


def test_group_intervals_match_a_recomputation_from_the_mlflow_runs(confirmed, tmp_path):
    from sweep.views.report import write_report

    result = write_report(NAME, confirmed["storage"], confirmed["tracking"], tmp_path / "report")
    client = MlflowClient(confirmed["tracking"])
    exp = client.get_experiment_by_name(NAME).experiment_id
    runs = [r for r in client.search_runs([exp], "tags.`sweep.phase` = 'confirm'")
            if r.info.status == "FINISHED"]
    groups: dict[str, dict[str, list[float]]] = {}
    for r in runs:
        g = groups.setdefault(r.data.tags["sweep.group"], {"val_acc": [], "test_acc": []})
        g["val_acc"].append(r.data.metrics["val_acc"])
        g["test_acc"].append(r.data.metrics["test_acc"])
    logged = client.get_run(result.logged_to).data.metrics
    md = (tmp_path / "report" / "summary.md").read_text()
    assert groups and all(len(v["val_acc"]) == SEEDS for v in groups.values())
    for name, values in groups.items():
        for metric in ("val_acc", "test_acc"):
            mean, low, high = _recomputed(values[metric])
            prefix = f"confirm.{name}.{metric}"
            assert logged[f"{prefix}_mean"] == pytest.approx(mean, abs=1e-12)
            if low == low:  # nan when all replicates agree exactly
                assert logged[f"{prefix}_ci_low"] == pytest.approx(low, abs=1e-9)
                assert logged[f"{prefix}_ci_high"] == pytest.approx(high, abs=1e-9)
        mean, low, high = _recomputed(groups[name]["val_acc"])
        if low == low:
            assert (f"`{name}`" in md and f"validation {100 * mean:.2f}% (95% CI {100 * low:.2f} "
                    f"to {100 * high:.2f}" in md)
    # the question's comparison, Welch, recomputed
    if "scheduler:cosine" in groups and "scheduler:plateau" in groups:
        a, b = groups["scheduler:cosine"]["val_acc"], groups["scheduler:plateau"]["val_acc"]
        ref = sp.ttest_ind(a, b, equal_var=False).confidence_interval(0.95)
        key = "confirm.scheduler:cosine_vs_scheduler:plateau.val_acc"
        if key + "_ci_low" in logged and ref.low == ref.low:
            assert logged[key + "_ci_low"] == pytest.approx(ref.low, abs=1e-9)
            assert logged[key + "_ci_high"] == pytest.approx(ref.high, abs=1e-9)


def test_the_report_answers_first_and_withholds_verdicts_the_data_cannot_support(confirmed, tmp_path):
    from sweep.views.report import write_report

    result = write_report(NAME, confirmed["storage"], confirmed["tracking"], tmp_path / "report")
    md = (tmp_path / "report" / "summary.md").read_text()
    html = (tmp_path / "report" / "index.html").read_text()
    assert md.index("## Answer (confirmed)") < md.index("## At a glance (search)")
    assert "Answer (confirmed)" in html and "At a glance (search)" in html
    assert "Welch t interval" in md and "Student t interval" in md
    assert "confirm_groups.png" in {p.name for p in result.files}
    logged = MlflowClient(confirmed["tracking"]).get_run(result.logged_to).data.metrics
    verdicts = [line for line in md.splitlines() if line.startswith("- **")]
    assert verdicts
    for line in verdicts:
        question = line.split("**")[1]
        a, b = (("scheduler:cosine", "scheduler:plateau") if "plateau" in question else
                tuple(f"warmup:{w}" for w in question.replace(" steps", "").split()[1::2]))
        low = logged.get(f"confirm.{a}_vs_{b}.val_acc_ci_low")
        high = logged.get(f"confirm.{a}_vs_{b}.val_acc_ci_high")
        if low is not None and low <= 0 <= high:
            assert f"no detectable difference with {SEEDS} seeds" in line and "is better" not in line
            assert "seeds per group" in line or "difference is zero" in line
        elif low is not None:
            assert "is better" in line


def test_two_confirms_at_once_share_the_replicates(tmp_path, shared_cifar):
    """`sweep confirm` started twice at once on one storage (two nodes, two GPUs): every
    replicate is trained exactly once, by one of them, and both end with the budget done."""
    study = (STUDY.replace(f"name: {NAME}", "name: twice").replace(f"trials: {SEARCH_TRIALS}", "trials: 3")
             .replace("warmup_steps: {type: int, low: 0, high: 2}", "warmup_steps: 0"))
    (tmp_path / "study.yaml").write_text(study)
    _run(_cli(tmp_path, shared_cifar, "launch"), tmp_path)
    procs = [subprocess.Popen(_cli(tmp_path, shared_cifar, "confirm", "--seeds", "3"),
                              cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True, env=_env()) for _ in range(2)]
    outs = [p.communicate(timeout=600) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    trials = optuna.load_study(study_name="twice", storage=f"sqlite:///{tmp_path}/sweep.db").get_trials()
    replicates = _confirm_trials(trials)
    types = {t.params["scheduler"] for t in trials if t.user_attrs.get("sweep.phase") != "confirm"
             and t.state == TrialState.COMPLETE}
    assert len(replicates) == 3 * len(types)  # no replicate enqueued twice
    assert all(t.state == TrialState.COMPLETE for t in replicates)
    assert set(Counter(t.user_attrs["sweep.confirm_key"] for t in replicates).values()) == {1}
    assert all(f"{3 * len(types)}/{3 * len(types)} trials done" in out for out, _ in outs), outs
    runs = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db").search_runs(
        [MlflowClient(f"sqlite:///{tmp_path}/mlflow.db").get_experiment_by_name("twice").experiment_id],
        filter_string="tags.`sweep.phase` = 'confirm'")
    assert len(runs) == len(replicates)  # a replicate trained twice has two runs
