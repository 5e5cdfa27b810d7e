"""sweep from Python (``sweep/api.py``), in-process on real SQLite stores.

The study is made by running docs/python.md's example as it stands (the smoke study shrunk to
100 training images, under the name ``first_look``), in an empty folder whose ``SWEEP_DATA_DIR``
is a small CIFAR-10 folder. What the example's objects hold is then checked against Optuna's
and MLflow's own APIs, and the CLI's JSON against the API's (the commands call it).
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import optuna
import pytest
from click.testing import CliRunner
from mlflow.tracking import MlflowClient
from optuna.trial import TrialState

import sweep
from helpers import REPO, TINY, plain_storage
from sweep.cli import main
from sweep.errors import (ConfigChangedError, NoResultError, OverrideError, StorageError,
                          StudyFileError, SweepError)

PAGE = REPO / "docs" / "python.md"
NAME = "first_look"


def test_import_sweep_loads_neither_torch_nor_optuna_nor_mlflow():
    """``import sweep`` and reaching its public names (not calling them) stay light."""
    code = ("import sys, sweep; sweep.launch, sweep.load, sweep.plan, sweep.Study, "
            "sweep.Launched, sweep.SweepError, sweep.__version__; "
            "print(sorted(m for m in ('torch', 'optuna', 'mlflow', 'pandas') "
            "if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120, cwd=REPO)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        sweep.nope  # noqa: B018
    assert sweep.SweepError is SweepError


def _example() -> str:
    """The first python block of docs/python.md."""
    return re.search(r"^```python\n(.*?)^```", PAGE.read_text(), re.M | re.S).group(1)


@pytest.fixture(scope="module")
def example(tmp_path_factory, tiny_cifar):
    """(folder, the example's variables) after docs/python.md's example ran in ``folder``."""
    folder = tmp_path_factory.mktemp("python_api")
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(folder)
        mp.setenv("SWEEP_DATA_DIR", str(tiny_cifar))
        for name in ("SWEEP_STORAGE", "MLFLOW_TRACKING_URI", "SWEEP_CHECKPOINT_DIR"):
            mp.delenv(name, raising=False)
        namespace: dict = {}
        exec(compile(_example(), str(PAGE), "exec"), namespace)
    return folder, namespace


def _stores(folder: Path) -> dict:
    return {"storage": f"sqlite:///{folder}/sweep.db", "tracking_uri": f"sqlite:///{folder}/mlflow.db"}


def _independent(folder: Path):
    """Optuna's trials and MLflow's trial runs by trial number, read without sweep."""
    stores = _stores(folder)
    study = optuna.load_study(study_name=NAME, storage=plain_storage(stores["storage"]))
    client = MlflowClient(stores["tracking_uri"])
    experiment = client.get_experiment_by_name(NAME)
    runs = client.search_runs([experiment.experiment_id], "tags.`sweep.role` = 'trial'")
    return study, {int(r.data.tags["sweep.trial_number"]): r for r in runs}, client


@pytest.mark.slow
def test_the_example_launches_and_reads_what_the_stores_hold(example):
    folder, ns = example
    study, runs, client = _independent(folder)
    trials = study.trials
    assert len(trials) == 4 and set(runs) == {t.number for t in trials}
    done = ns["done"]
    assert done.exit_code == 0 and done.study.name == NAME and "4/4 trials used" in done.text
    # the cost line: 4 trials, one at a time, T = 100 // 100 x 3 epochs, from the first trial
    cost = done.cost
    assert (cost.trials_left, cost.pack, cost.total_steps) == (4, 1, 3)
    assert cost.estimate_s == 4 * 3 * cost.seconds_per_step / 1
    wall = (trials[0].datetime_complete - trials[0].datetime_start).total_seconds()
    assert 0 < cost.seconds_per_step * cost.timed_steps <= wall  # timed in the first trial
    assert cost.line().startswith("cost: 4 trial(s) left, one at a time, T = 3 steps each; ")

    counts = ns["status"].counts
    assert counts["complete"] == sum(t.state == TrialState.COMPLETE for t in trials)
    assert counts["pruned"] + counts["diverged"] == sum(t.state == TrialState.PRUNED
                                                       for t in trials)
    assert ns["status"].exit_code == 0 and ns["status"].as_json()["used"] == 4

    top = max((t for t in trials if t.state == TrialState.COMPLETE), key=lambda t: t.value)
    best = ns["best"]
    assert (best["number"], best["value"], best["params"]) == (top.number, top.value, top.params)
    assert best["run_id"] == runs[top.number].info.run_id
    for group in ns["per"]["groups"]:
        mine = [t for t in trials if t.state == TrialState.COMPLETE
                and t.params["scheduler"] == group["group"]]
        assert group["number"] == (max(mine, key=lambda t: t.value).number if mine else None)

    df = ns["df"]
    assert list(df["number"]) == [t.number for t in trials]
    for row, t in zip(df.itertuples(), trials):
        run = runs[t.number]
        assert row.state == t.state.name and row.run_id == run.info.run_id
        assert (row.value == t.value) or (row.value != row.value and t.value is None)  # NaN
        assert row.params_base_lr == t.params["base_lr"]
        expected = "DIVERGED" if t.user_attrs.get("prune_reason") == "diverged" else t.state.name
        assert row.outcome == expected and row.phase == "search"
        history = sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id,
                                                                               "val_acc"))
        assert row.val_acc_by_epoch == [v for _, v in history]
        assert row.epochs_trained == len(history) == int(run.data.tags["sweep.epochs_trained"])
        assert (row.test_acc == run.data.metrics.get("test_acc")) or t.state != TrialState.COMPLETE
    assert ns["curves"].to_dict() == dict(zip(df["number"], df["val_acc_by_epoch"]))

    report = ns["report"]
    assert report.folder == Path("reports/first_look")
    assert (folder / report.folder / "index.html").is_file()
    assert (folder / report.folder / "summary.md").is_file()
    parent, = client.search_runs([client.get_experiment_by_name(NAME).experiment_id],
                                 "tags.`sweep.role` = 'study'")
    logged = {a.path for a in client.list_artifacts(parent.info.run_id, "report")}
    assert "report/index.html" in logged and "report/summary.md" in logged

    cosine = {t.number for t in trials if t.params["scheduler"] == "cosine"}
    assert {int(r.data.tags["sweep.trial_number"]) for r in ns["runs"]} == cosine


@pytest.mark.slow
def test_the_cli_prints_what_the_api_returns(example):
    folder, ns = example
    stores = _stores(folder)
    flags = ["--study", NAME, "--storage", stores["storage"], "--tracking-uri",
             stores["tracking_uri"]]
    study = sweep.load(NAME, **stores)
    res = CliRunner().invoke(main, ["best", *flags, "--json", "--per", "scheduler"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.output) == study.best(per="scheduler") == ns["per"]
    res = CliRunner().invoke(main, ["status", *flags, "--json"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.output) == study.status().as_json()
    out = folder / "trials.json"
    said = study.export(out)
    res = CliRunner().invoke(main, ["export", *flags, "--format", "json", "-o",
                                    str(folder / "cli.json")])
    assert res.exit_code == 0 and said.startswith("wrote 4 trial(s)")
    assert json.loads(out.read_text()) == json.loads((folder / "cli.json").read_text())


@pytest.mark.slow
def test_errors_are_raised_and_write_nothing(example, tmp_path, monkeypatch):
    folder, _ = example
    stores = _stores(folder)
    with pytest.raises(StorageError, match=f"no study 'nope' in storage .*{NAME}"):
        sweep.load("nope", **stores)
    study = sweep.load(NAME, **stores)
    with pytest.raises(SweepError, match="--per base_lr: not a categorical search parameter"):
        study.best(per="base_lr")
    with pytest.raises(SweepError, match="top=11"):
        study.report(tmp_path / "r", top=11)

    monkeypatch.chdir(tmp_path)  # an empty folder: a refused launch leaves it empty
    fresh = {"storage": f"sqlite:///{tmp_path}/sweep.db",
             "tracking_uri": f"sqlite:///{tmp_path}/mlflow.db"}
    for call, error in [
            (lambda: sweep.launch(TINY, overrides={"train.nope": 1}, **fresh), OverrideError),
            (lambda: sweep.launch(TINY, overrides={"train.epochs": 0}, **fresh), StudyFileError),
            (lambda: sweep.launch(TINY, trials=0, **fresh), SweepError),
            (lambda: sweep.launch(TINY, overrides="train.epochs=3", **fresh), OverrideError),
            (lambda: sweep.load(NAME, **fresh), StorageError)]:
        with pytest.raises(error):
            call()
    assert list(tmp_path.iterdir()) == []
    # an empty study has no best trial yet: an error with exit status 1 on the command line
    optuna.create_study(study_name="empty", storage=plain_storage(fresh["storage"]))
    with pytest.raises(NoResultError):
        sweep.load("empty", storage=fresh["storage"], tracking_uri=stores["tracking_uri"]).best()
    assert len(sweep.load("empty", storage=fresh["storage"],
                          tracking_uri=stores["tracking_uri"]).trials()) == 0


@pytest.mark.slow
def test_a_relaunch_with_other_settings_is_refused_with_the_projects_error(example, tiny_cifar,
                                                                          monkeypatch):
    """The example's study relaunched with 4 epochs: ConfigChangedError, not an exit, and the
    study is unchanged."""
    folder, _ = example
    monkeypatch.chdir(folder)
    monkeypatch.setenv("SWEEP_DATA_DIR", str(tiny_cifar))
    before = len(sweep.load(NAME).optuna.trials)
    with pytest.raises(ConfigChangedError, match="train.epochs"):
        sweep.launch("smoke", trials=5, overrides={
            "name": NAME, "data.train_size": 100, "data.val_size": 40, "data.test_size": 40,
            "train.epochs": 4})
    assert len(sweep.load(NAME).optuna.trials) == before


@pytest.mark.slow
def test_a_relative_mlflow_uri_names_the_current_folder_after_a_chdir(tmp_path, monkeypatch):
    """MLflow keeps one store per URI string for the process's life: ``sqlite:///mlflow.db``
    opened in folder A and again after a chdir to B must reach B's file (a notebook that moves
    on, or a second in-process launch), not A's. Read back with SQL on each file."""
    import sqlite3

    from sweep.base.urls import pinned_sqlite
    from sweep.record import Tracker

    assert pinned_sqlite("sqlite:////abs/m.db") == "sqlite:////abs/m.db"
    assert pinned_sqlite("postgresql://u:p@h/db") == "postgresql://u:p@h/db"
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        monkeypatch.chdir(tmp_path / name)
        assert pinned_sqlite("sqlite:///mlflow.db") == f"sqlite:///{tmp_path / name}/mlflow.db"
        Tracker("sqlite:///mlflow.db").experiment_id(f"study_{name}")
    for name in ("a", "b"):
        with sqlite3.connect(tmp_path / name / "mlflow.db") as conn:
            found = {row[0] for row in conn.execute("SELECT name FROM experiments")}
        assert found - {"Default"} == {f"study_{name}"}
