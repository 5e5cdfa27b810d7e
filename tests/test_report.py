"""`sweep report`, `sweep list`, `sweep dashboard` and the error paths of `sweep ui`, against a
real SQLite Optuna storage and a real MLflow store filled through sweep's own Tracker (no
training: the trials' records are written directly, so the expected numbers are known)."""

from __future__ import annotations

import json
import math
import os
import socket
import statistics
import struct
import subprocess
import sys
import urllib.request
from pathlib import Path

import optuna
import pytest
from click.testing import CliRunner
from mlflow.tracking import MlflowClient
from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution
from optuna.trial import TrialState, create_trial

from helpers import free_port
from sweep.cli import main
from sweep.views.report import compute_importances, load_report_data, write_report
from sweep.stores.storage import open_storage
from sweep.record import Tracker

# One real MLflow store is created per module (its schema migration alone takes 5-25 s here).
pytestmark = pytest.mark.slow

STUDY = "fab"
DESCRIPTION = "Does warmup help a fabricated ResNet? (test study)"
EPOCHS, SPE = 3, 10
SCHEDULERS = {  # type -> its own conditional parameters (gamma has another range per type)
    "step": {"gamma": FloatDistribution(0.1, 0.5), "step_size_epochs": IntDistribution(1, 3)},
    "plateau": {"gamma": FloatDistribution(0.1, 0.5), "patience_epochs": IntDistribution(0, 2)},
    "exponential": {"gamma": FloatDistribution(0.85, 0.99)},
}
# searched training fields (docs/search-space.md): every trial draws them, as it draws base_lr
TRAIN_SEARCHED = {"weight_decay": FloatDistribution(5e-5, 5e-3, log=True),
                  "warmup_shape": CategoricalDistribution(("linear", "exponential"))}
COMMON = {"scheduler": CategoricalDistribution(tuple(SCHEDULERS)),
          "warmup_steps": IntDistribution(0, 12), "base_lr": FloatDistribution(0.02, 2.0, log=True),
          **TRAIN_SEARCHED}


def _lr_curve(params: dict, steps: int) -> list[float]:
    w, lr = params["warmup_steps"], params["base_lr"]
    return [lr * min(1.0, (t + 1) / (w + 1)) for t in range(steps)]


@pytest.fixture(scope="module")
def fab(tmp_path_factory):
    """A study of 25 finished trials (per type: 6 complete, 1 pruned, 1 diverged; plus one
    failed step trial) in ./sweep.db and ./mlflow.db of a fresh folder."""
    import random

    root = tmp_path_factory.mktemp("fab")
    storage_url = f"sqlite:///{root}/sweep.db"
    tracking_uri = f"sqlite:///{root}/mlflow.db"
    study = optuna.create_study(study_name=STUDY, storage=open_storage(storage_url),
                                direction="maximize")
    study.set_user_attr("sweep.description", DESCRIPTION)
    study.set_user_attr("sweep.budget", 25)
    tracker = Tracker(tracking_uri)
    exp = tracker.experiment_id(STUDY)
    parent = tracker.study_run(exp, STUDY, {"objective.metric": "val_acc",
                                            "train.epochs": EPOCHS}, None)
    rng, rng_train = random.Random(0), random.Random(1)
    plan = [(s, o) for s in SCHEDULERS for o in ["COMPLETE"] * 6 + ["PRUNED", "DIVERGED"]]
    plan.append(("step", "FAIL"))
    records = []
    for number, (sched, outcome) in enumerate(plan):
        dists = {**COMMON, **SCHEDULERS[sched]}
        params = {"scheduler": sched, "warmup_steps": rng.randint(0, 12),
                  "base_lr": math.exp(rng.uniform(math.log(0.02), math.log(2.0)))}
        for name, d in SCHEDULERS[sched].items():
            params[name] = (rng.randint(d.low, d.high) if isinstance(d, IntDistribution)
                            else rng.uniform(d.low, d.high))
        params.update(weight_decay=10 ** rng_train.uniform(math.log10(5e-5), math.log10(5e-3)),
                      warmup_shape=rng_train.choice(("linear", "exponential")))
        value = 0.4 + 0.01 * params["warmup_steps"] - 0.05 * abs(math.log10(params["base_lr"]) + 0.7) \
            + {"step": 0.02, "plateau": 0.0, "exponential": 0.01}[sched] + rng.uniform(0, 0.02) \
            - 0.02 * abs(math.log10(params["weight_decay"]) + 3.3)
        epochs_run = {"COMPLETE": EPOCHS, "PRUNED": 2, "DIVERGED": 1, "FAIL": 1}[outcome]
        steps_run = {"DIVERGED": 13}.get(outcome, epochs_run * SPE)
        vals = [value - 0.05 * (EPOCHS - 1 - e) for e in range(epochs_run)]
        run = tracker.start_trial(exp, parent, STUDY, number,
                                  {**params, "epochs": EPOCHS, "steps_per_epoch": SPE,
                                   "device": "cpu"}, {})
        lrs = _lr_curve(params, steps_run)
        run.on_steps(0, lrs, [2.0] * steps_run)
        for e, v in enumerate(vals[: (steps_run // SPE)]):
            run.on_epoch_end(e, {"val_loss": 2.0 - v, "val_acc": v})
        run.finish({"COMPLETE": "FINISHED", "FAIL": "FAILED"}.get(outcome, "KILLED"),
                   {"sweep.state": outcome}, curve_png=False)  # as a worker ends a run
        attrs = {"mlflow_run_id": run.run_id, "seed": number, "host": "testhost"}
        if outcome == "COMPLETE":
            attrs["test_acc"] = value - 0.01
        if outcome in ("PRUNED", "DIVERGED"):
            attrs.update(prune_reason="diverged" if outcome == "DIVERGED" else "pruner",
                         prune_step=steps_run - 1, prune_epoch=(steps_run - 1) // SPE)
        if outcome == "FAIL":
            attrs["error"] = "RuntimeError: boom"
        reported = vals[: (steps_run // SPE)] if outcome != "DIVERGED" else []
        study.add_trial(create_trial(
            state=TrialState[outcome if outcome != "DIVERGED" else "PRUNED"],
            value=value if outcome == "COMPLETE" else None, params=params, distributions=dists,
            user_attrs=attrs, intermediate_values=dict(enumerate(reported))))
        records.append({"number": number, "scheduler": sched, "outcome": outcome, "value": value,
                        "params": params, "run_id": run.run_id, "lrs": lrs,
                        "stopped": steps_run / SPE})
    return {"root": root, "storage": storage_url, "tracking": tracking_uri, "parent": parent,
            "records": records}


@pytest.fixture(scope="module")
def report(fab, tmp_path_factory):
    out = tmp_path_factory.mktemp("out") / "report"
    result = write_report(STUDY, fab["storage"], fab["tracking"], out, top_k=3)
    return {"out": out, "result": result, "md": (out / "summary.md").read_text(),
            "html": (out / "index.html").read_text()}


def _png_size(path: Path) -> tuple[int, int]:
    head = path.read_bytes()[:24]
    assert head[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"
    return struct.unpack(">II", head[16:24])


def test_report_counts_best_trial_and_question(fab, report):
    md = report["md"]
    complete = [r for r in fab["records"] if r["outcome"] == "COMPLETE"]
    best = max(complete, key=lambda r: r["value"])
    assert DESCRIPTION in md
    assert "| budget used | 25 of 25 trials |" in md
    assert "18 complete, 3 pruned by the pruner, 3 diverged, 1 failed" in md
    assert f"Trial #{best['number']}: val_acc {best['value']:.4g}" in md
    assert best["run_id"] in md
    assert "| device | cpu |" in md
    for sched in SCHEDULERS:
        values = [r["value"] for r in complete if r["scheduler"] == sched]
        failed = 1 if sched == "step" else 0
        assert (f"| {sched} | {8 + failed} | 6 | 1 | 1 | {failed} | {max(values):.4g} | "
                f"{statistics.median(values):.4g} |") in md


def test_report_timeline_rows_give_reason_and_stopping_epoch(fab, report):
    for r in fab["records"]:
        if r["outcome"] in ("PRUNED", "DIVERGED"):
            reason = "diverged" if r["outcome"] == "DIVERGED" else "pruner"
            assert (f"| {r['number']} | {r['outcome'].lower()} | {r['stopped']:.4g} | {reason} | "
                    f"{r['scheduler']} |") in report["md"]


def test_importance_is_grouped_by_scheduler_type(fab):
    study = optuna.load_study(study_name=STUDY, storage=fab["storage"])
    groups, notes = compute_importances(study, study.get_trials(), list(SCHEDULERS))
    by_title = {title.split(" (n=")[0]: set(values) for title, values in groups}
    # every trial has scheduler, warmup_steps, base_lr and the searched training fields; gamma
    # exists only in some trials
    every = {"warmup_steps", "base_lr", *TRAIN_SEARCHED}
    assert by_title["all trials"] == {"scheduler", *every}
    assert by_title["scheduler = step"] == {*every, "gamma", "step_size_epochs"}
    assert by_title["scheduler = plateau"] == {*every, "gamma", "patience_epochs"}
    assert by_title["scheduler = exponential"] == {*every, "gamma"}
    assert all(abs(sum(v.values()) - 1) < 1e-6 for _, v in groups)
    assert notes == []


def test_every_searched_parameter_is_ranked_and_plotted(fab, report):
    """The importance table names every searched parameter, and one figure plots the objective
    against each searched parameter besides warmup and base LR (weight decay on a log axis)."""
    md = report["md"]
    ranked = md.split("## Parameter importance")[1].split("\n## ")[0]
    for name in ("weight_decay", "warmup_shape", "base_lr", "warmup_steps", "scheduler"):
        assert f"{name} 0." in ranked or f"{name} 1." in ranked, ranked
    assert "## Effect of the other searched parameters" in md and "(searched.png)" in md
    assert (report["out"] / "searched.png").stat().st_size > 10_000
    data = load_report_data(STUDY, fab["storage"], fab["tracking"])
    assert data.searched == {"weight_decay": "log", "warmup_shape": "categorical", "gamma": "linear",
                             "step_size_epochs": "linear", "patience_epochs": "linear"}


def test_top_k_curves_are_the_lr_logged_in_mlflow(fab):
    data = load_report_data(STUDY, fab["storage"], fab["tracking"], top_k=3)
    ranked = sorted((r for r in fab["records"] if r["outcome"] == "COMPLETE"),
                    key=lambda r: -r["value"])[:3]
    assert [c.label.split()[0] for c in data.curves] == [f"#{r['number']}" for r in ranked]
    for curve, rec in zip(data.curves, ranked):
        assert curve.lr == pytest.approx(rec["lrs"])
        assert curve.lr_epoch[SPE] == pytest.approx(1.0)  # step S is the start of epoch 2
        assert curve.val_epoch == [1.0, 2.0, 3.0]


def test_report_is_self_contained_and_logged_to_the_parent_run(fab, report):
    out, html = report["out"], report["html"]
    pngs = sorted(p.name for p in out.glob("*.png"))
    assert pngs == sorted(["schedulers.png", "warmup.png", "searched.png", "top_curves.png",
                           "importance.png", "history.png", "timeline.png"])
    for name in pngs:
        width, height = _png_size(out / name)
        assert width >= 500 and height >= 200, name
        assert f"src='{name}'" in html
        assert f"]({name})" in report["md"]
    assert "<script" not in html.lower()
    assert "http://" not in html and "https://" not in html
    logged = {a.path for a in MlflowClient(fab["tracking"]).list_artifacts(fab["parent"], "report")}
    assert logged == {f"report/{n}" for n in pngs + ["index.html", "summary.md"]}
    assert report["result"].logged_to == fab["parent"]


def test_report_unknown_study_or_missing_store_creates_nothing(fab, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    runner = CliRunner()
    res = runner.invoke(main, ["report", "--study", "nope", "--storage", fab["storage"],
                               "--tracking-uri", fab["tracking"]])
    assert res.exit_code == 2
    assert res.output.strip().splitlines() == [
        f"error: no study 'nope' in storage {fab['storage']}; studies there: {STUDY} (see `sweep list`)"]
    res = runner.invoke(main, ["report", "--study", STUDY])  # ./sweep.db does not exist here
    assert res.exit_code == 2 and "no Optuna storage at sweep.db" in res.output
    res = runner.invoke(main, ["report", "--study", STUDY, "--storage", fab["storage"]])
    assert res.exit_code == 2 and "no MLflow store at mlflow.db" in res.output
    assert sorted(os.listdir(tmp_path)) == []


def test_report_cli_writes_the_folder(fab, tmp_path):
    res = CliRunner().invoke(main, ["report", "--study", STUDY, "--storage", fab["storage"],
                                    "--tracking-uri", fab["tracking"], "-o", str(tmp_path / "r")])
    assert res.exit_code == 0, res.output
    assert f"report: {tmp_path / 'r' / 'index.html'}" in res.output
    assert (tmp_path / "r" / "summary.md").is_file()


def test_list_shows_files_and_stored_studies(fab, tmp_path, monkeypatch):
    res = CliRunner().invoke(main, ["list", "--storage", fab["storage"]])
    assert res.exit_code == 0, res.output
    best = max(r["value"] for r in fab["records"] if r["outcome"] == "COMPLETE")
    assert "  smoke " in res.output and "  warmup_vs_plateau " in res.output
    line = next(ln for ln in res.output.splitlines() if ln.strip().startswith(STUDY + " "))
    assert "25 trials" in line and f"best {best:.4g}" in line
    monkeypatch.chdir(tmp_path)
    res = CliRunner().invoke(main, ["list"])
    assert res.exit_code == 0 and "no such file yet" in res.output
    assert not (tmp_path / "sweep.db").exists()


def test_ui_refuses_unknown_study_missing_store_and_busy_port(fab, tmp_path, monkeypatch):
    runner = CliRunner()
    res = runner.invoke(main, ["ui", "--tracking-uri", fab["tracking"], "--study", "nope"])
    assert res.exit_code == 2
    assert res.output.strip() == (f"error: no MLflow experiment 'nope' in {fab['tracking']}; "
                                  f"experiments there: {STUDY}")
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        res = runner.invoke(main, ["ui", "--tracking-uri", fab["tracking"], "--port", str(port)])
        assert res.exit_code == 2 and f"cannot listen on 127.0.0.1:{port}" in res.output
    monkeypatch.chdir(tmp_path)
    res = runner.invoke(main, ["ui"])
    assert res.exit_code == 2 and "no MLflow store at mlflow.db" in res.output
    assert not (tmp_path / "mlflow.db").exists()


def test_dashboard_serves_the_storage_on_localhost(fab, tmp_path):
    pytest.importorskip("optuna_dashboard", reason="optuna-dashboard not installed (extra 'dashboard')")
    port = free_port()
    # stderr to a file: an undrained pipe fills up with Optuna's log lines and blocks the server
    log = open(tmp_path / "dashboard.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "sweep.cli", "dashboard", "--storage",
                             fab["storage"], "--port", str(port), "--study", STUDY],
                            stdout=subprocess.PIPE, stderr=log, text=True)
    try:
        line = proc.stdout.readline()
        assert line.startswith(f"optuna-dashboard for {fab['storage']} at "
                               f"http://127.0.0.1:{port}/dashboard/studies/"), line
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/studies", timeout=30) as resp:
            studies = json.load(resp)["study_summaries"]
        assert [s["study_name"] for s in studies] == [STUDY]
        study_id = line.strip().rsplit("/", 1)[-1].split()[0]
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/studies/{study_id}",
                                    timeout=60) as resp:
            assert len(json.load(resp)["trials"]) == 25
        # bound to loopback only: the machine's other addresses refuse the connection
        with socket.socket() as s:
            s.settimeout(2)
            assert s.connect_ex(("127.0.0.2", port)) != 0
    finally:
        proc.terminate()
        proc.wait(60)
        log.close()
    assert proc.returncode == 0, (tmp_path / "dashboard.log").read_text()[-2000:]


def test_dashboard_missing_package_says_how_to_install(monkeypatch):
    # Hide the package from this interpreter: importing a None entry raises ImportError.
    monkeypatch.setitem(sys.modules, "optuna_dashboard", None)
    res = CliRunner().invoke(main, ["dashboard"])
    assert res.exit_code == 2
    assert res.output.strip() == (
        "error: optuna-dashboard is not installed; install it with: pip install -e "
        "'.[dashboard]' in the sweep checkout (or pip install optuna-dashboard)")


def test_points_missing_from_mlflow_are_named_never_an_empty_figure(fab, tmp_path):
    """The issue-17 record: MLflow lost every point of the best trial's run (its rows deleted
    here with sqlite3 itself) while Optuna kept the trial. The report names that run and how
    many points it lacks, says its curve is missing, and `sweep status` says the same."""
    import sqlite3

    for name in ("sweep.db", "mlflow.db"):  # SQLite's own copy: sweep.db keeps a WAL beside it
        with sqlite3.connect(fab["root"] / name) as src, sqlite3.connect(tmp_path / name) as dst:
            src.backup(dst)
    best = max((r for r in fab["records"] if r["outcome"] == "COMPLETE"), key=lambda r: r["value"])
    with sqlite3.connect(tmp_path / "mlflow.db") as conn:
        lost = conn.execute("DELETE FROM metrics WHERE run_uuid = ? AND key IN ('lr', 'train_loss')",
                            (best["run_id"],)).rowcount
    assert lost == 2 * len(best["lrs"])
    storage, tracking = f"sqlite:///{tmp_path}/sweep.db", f"sqlite:///{tmp_path}/mlflow.db"
    write_report(STUDY, storage, tracking, tmp_path / "report", top_k=3)
    md = (tmp_path / "report" / "summary.md").read_text()
    n = len(best["lrs"])
    assert f"trial #{best['number']} (COMPLETE) run {best['run_id']}: missing lr {n}, train_loss {n}" in md
    assert f"MLflow holds no `lr` point of #{best['number']} " in md
    assert "MLflow lacks points of some trial runs" in md
    res = CliRunner().invoke(main, ["status", "--study", STUDY, "--storage", storage,
                                    "--tracking-uri", tracking])
    assert res.exit_code == 3, res.output  # the record is incomplete (docs/scripting.md)
    assert f"trial #{best['number']} (COMPLETE) run {best['run_id']}: missing lr {n}, train_loss {n}" in res.output
    assert "MLflow: 1 COMPLETE trial(s) whose run lacks points (" in res.output  # its own line


def test_a_complete_store_says_so_in_status(fab):
    res = CliRunner().invoke(main, ["status", "--study", STUDY, "--storage", fab["storage"],
                                    "--tracking-uri", fab["tracking"]])
    assert res.exit_code == 0, res.output
    # lr + train_loss per step, val_loss + val_acc per whole epoch, as the fixture fed them
    total = sum(2 * len(r["lrs"]) + 2 * (len(r["lrs"]) // SPE) for r in fab["records"])
    assert f"MLflow: all {total} points of 25 trial run(s) stored" in res.output, res.output
