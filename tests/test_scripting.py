"""The CLI for scripts (`sweep status/list --json`, `best`, `export`, `delete`, `launch
--dry-run`, completion of --study) on real stores: SQLite and the real PostgreSQL.

The studies are built without training, through sweep's own code: the stores are opened as a
launch opens them (``open_study_stores``), each trial is asked from Optuna and started by
``objective.start_trial`` (the real config draw and MLflow run), its listeners hear made-up
steps and epochs, and ``objective.end_trial`` ends it complete, pruned, diverged or failed.
Every expected value is read back independently (Optuna's API, ``MlflowClient``).
"""

from __future__ import annotations

import csv
import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import optuna
import pytest
from click.testing import CliRunner
from mlflow.tracking import MlflowClient
from optuna.trial import TrialState

from helpers import PG_PASSWORD, TINY, plain_storage
from sweep.cli import main
from sweep.loop.budget import update_parent_run
from sweep.stores.checkpoints import CheckpointDir, default_dir, storage_key
from sweep.commands.launch import LaunchOptions, open_study_stores
from sweep.loop.objective import end_trial, start_trial
from sweep.record import SpoolWriter, spool_dir
from sweep.study.spec import load_study
from sweep.training.train import StopTraining, TrainResult

pytestmark = pytest.mark.slow  # a real MLflow store per module (its migrations take seconds)

EPOCHS = 3
# The outcomes each fabricated study holds, in trial order.
PLAN = ("COMPLETE", "PRUNED", "COMPLETE", "DIVERGED", "FAIL", "COMPLETE")


def fabricate(name: str, storage: str, tracking: str, data_dir: Path, plan=PLAN) -> None:
    """A study ``name`` of tests/studies/tiny.yaml (3 epochs) holding ``plan``'s outcomes."""
    spec = dataclasses.replace(load_study(TINY, [f"train.epochs={EPOCHS}"]), name=name)
    stores = open_study_stores(spec, LaunchOptions(storage, tracking, str(data_dir), "cpu"),
                               load_data=False)
    ctx = stores.worker_context(spec)
    S = spec.steps_per_epoch
    for i, outcome in enumerate(plan):
        trial = stores.study.ask()
        started = start_trial(trial, ctx)
        epochs = {"COMPLETE": EPOCHS, "PRUNED": 2, "DIVERGED": 1, "FAIL": 1}[outcome]
        history = []
        for e in range(epochs):
            for listener in started.listeners:
                listener.on_steps(e * S, [0.1 / (1 + e)] * S, [2.0 - 0.1 * e] * S)
            metrics = {"val_loss": 2.0 - 0.1 * e - 0.01 * i, "val_acc": 0.2 + 0.1 * e + 0.01 * i,
                       "lr_reduced": False, "epoch_seconds": 0.5}
            for listener in started.listeners:
                listener.on_epoch_end(e, metrics)
            history.append(metrics)
        if outcome == "COMPLETE":
            done = end_trial(started, result=TrainResult(history, test_acc=0.15 + 0.01 * i,
                                                         steps=epochs * S))
            stores.study.tell(trial, done.value)
        elif outcome == "FAIL":
            end_trial(started, error=RuntimeError("boom"))
            stores.study.tell(trial, state=TrialState.FAIL)
        else:
            reason = "pruner" if outcome == "PRUNED" else "diverged"
            end_trial(started, stop=StopTraining(reason, epochs * S - 1, epochs - 1))
            stores.study.tell(trial, state=TrialState.PRUNED)
    stores.tracker.close()
    update_parent_run(stores.study, stores.tracker, stores.experiment_id, stores.parent_run_id)


def invoke(*args: str):
    return CliRunner().invoke(main, list(args))


def stores_of(where: dict) -> list[str]:
    return ["--storage", where["storage"], "--tracking-uri", where["tracking"]]


def snapshot(folder: Path) -> dict:
    """Every file under ``folder`` with its size and modification time."""
    return {str(p): (p.stat().st_size, p.stat().st_mtime_ns) for p in folder.rglob("*")
            if p.is_file()}


@pytest.fixture(scope="module")
def sqlite_stores(tmp_path_factory, tiny_cifar):
    """Studies ``alpha`` (PLAN), ``beta`` (to be deleted) and ``gamma`` (for status) in one
    folder's sweep.db and mlflow.db."""
    root = tmp_path_factory.mktemp("scripting")
    where = {"root": root, "storage": f"sqlite:///{root}/sweep.db",
             "tracking": f"sqlite:///{root}/mlflow.db"}
    for name in ("alpha", "beta", "gamma"):
        fabricate(name, where["storage"], where["tracking"], tiny_cifar,
                  PLAN if name != "gamma" else ("COMPLETE", "PRUNED"))
    return where


# --- reading back independently ------------------------------------------------------------------

def independent_trials(where: dict, name: str) -> dict:
    """{number: (trial, run)}: Optuna's trials and the run tagged with each trial's number."""
    study = optuna.load_study(study_name=name, storage=plain_storage(where["storage"]))
    client = MlflowClient(where["tracking"])
    experiment = client.get_experiment_by_name(name)
    runs = client.search_runs([experiment.experiment_id], "tags.`sweep.role` = 'trial'")
    by_number = {int(r.data.tags["sweep.trial_number"]): r for r in runs}
    return {t.number: (t, by_number.get(t.number)) for t in study.trials}


def check_best(where: dict, name: str) -> None:
    trials = independent_trials(where, name)
    complete = [(t, r) for t, r in trials.values() if t.state == TrialState.COMPLETE]
    top, run = max(complete, key=lambda pair: pair[0].value)
    res = invoke("best", "--study", name, *stores_of(where), "--json")
    assert res.exit_code == 0, res.output
    got = json.loads(res.output)
    assert got["number"] == top.number and got["value"] == top.value
    assert got["params"] == top.params and got["run_id"] == run.info.run_id
    assert got["direction"] == "maximize"

    res = invoke("best", "--study", name, *stores_of(where), "--per", "scheduler", "--json")
    assert res.exit_code == 0, res.output
    groups = {g["group"]: g for g in json.loads(res.output)["groups"]}
    assert set(groups) == {"cosine", "step"}
    for choice, g in groups.items():
        mine = [t for t, _ in complete if t.params["scheduler"] == choice]
        if not mine:
            assert g["number"] is None
            continue
        want = max(mine, key=lambda t: t.value)
        assert (g["number"], g["value"], g["run_id"]) == (want.number, want.value,
                                                        trials[want.number][1].info.run_id)
    text = invoke("best", "--study", name, *stores_of(where))
    assert text.exit_code == 0 and f"trial #{top.number} value" in text.output


def check_export(where: dict, name: str, folder: Path) -> None:
    """Both formats, every trial, against Optuna and MlflowClient."""
    client = MlflowClient(where["tracking"])
    trials = independent_trials(where, name)
    for fmt in ("json", "csv"):
        out = folder / f"{name}.{fmt}"
        res = invoke("export", "--study", name, *stores_of(where), "--format", fmt, "-o", str(out))
        assert res.exit_code == 0, res.output
        if fmt == "json":
            rows = {r["number"]: r for r in json.loads(out.read_text())["trials"]}
        else:
            with open(out, newline="") as f:
                rows = {int(r["number"]): r for r in csv.DictReader(f)}
        assert set(rows) == set(trials)
        states = set()
        for number, (t, run) in trials.items():
            row = rows[number]
            history = {key: sorted((m.step, m.value) for m in
                                   client.get_metric_history(run.info.run_id, key))
                       for key in ("val_acc", "val_loss")}
            epochs = int(run.data.tags["sweep.epochs_trained"])
            assert epochs == len(history["val_acc"]) > 0
            if fmt == "json":
                state, value, params = row["state"], row["value"], row["params"]
                assert row["metrics"] == {k: [v for _, v in h] for k, h in history.items()}
                assert row["epochs_trained"] == epochs and row["run_id"] == run.info.run_id
                assert row["final"]["test_acc"] == run.data.metrics.get("test_acc")
            else:
                state, value = row["state"], float(row["value"]) if row["value"] else None
                params = {k: type(v)(row[k]) for k, v in t.params.items()}
                for key, points in history.items():
                    assert [float(row[f"{key}_{e}"]) for e, _ in points] == [v for _, v in points]
                    assert row.get(f"{key}_{len(points)}", "") == ""  # nothing past its epochs
                assert int(row["epochs_trained"]) == epochs and row["run_id"] == run.info.run_id
            assert params == t.params and value == t.value
            expected = "DIVERGED" if t.user_attrs.get("prune_reason") == "diverged" else t.state.name
            assert state == expected
            states.add(state)
        assert states == {"COMPLETE", "PRUNED", "DIVERGED", "FAIL"}


# --- SQLite ----------------------------------------------------------------------------------------

def test_best_and_export_read_what_the_stores_hold(sqlite_stores, tmp_path):
    check_best(sqlite_stores, "alpha")
    check_export(sqlite_stores, "alpha", tmp_path)


def test_list_json(sqlite_stores):
    res = invoke("list", "--storage", sqlite_stores["storage"], "--json")
    assert res.exit_code == 0, res.output
    data = json.loads(res.output)
    studies = {s["name"]: s for s in data["studies"]}
    assert {"alpha", "beta", "gamma"} <= set(studies)
    alpha = optuna.load_study(study_name="alpha", storage=plain_storage(sqlite_stores["storage"]))
    assert studies["alpha"]["trials"] == len(alpha.trials)
    assert (studies["alpha"]["best_value"], studies["alpha"]["best_trial"]) == \
        (alpha.best_value, alpha.best_trial.number)
    assert "smoke" in {f["name"] for f in data["study_files"]}


def test_status_json_and_exit_codes(sqlite_stores):
    """0 all well; 4 with a stale trial (RUNNING, its worker's process gone); 3 when points
    wait in the spool, also with the stale trial; --repair brings it back to 0."""
    where, name = sqlite_stores, "gamma"
    res = invoke("status", "--study", name, *stores_of(where), "--json")
    assert res.exit_code == 0, res.output
    data = json.loads(res.output)
    assert data["counts"] == {"complete": 1, "pruned": 1, "diverged": 0, "failed": 0,
                              "running": 0, "waiting": 0}
    assert data["mlflow"]["complete"] and data["stale_trials"] == [] and data["exit_code"] == 0

    # A trial RUNNING on this host whose worker is gone (a finished process's pid).
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    study = optuna.load_study(study_name=name, storage=plain_storage(where["storage"]))
    trial = study.ask()
    trial.set_user_attr("host", os.uname().nodename)
    trial.set_user_attr("pid", gone.pid)
    res = invoke("status", "--study", name, *stores_of(where), "--json")
    assert res.exit_code == 4, res.output
    data = json.loads(res.output)
    assert data["stale_trials"] == [trial.number] and data["running"][0]["stale"]
    assert "STALE" in invoke("status", "--study", name, *stores_of(where)).output
    refused = invoke("delete", "--study", name, *stores_of(where), "--yes")
    assert refused.exit_code == 2 and f"RUNNING trial(s) [{trial.number}]" in refused.output

    # Points of one of its runs waiting in the spool: the record is incomplete -> 3 (both: 3).
    run_id = independent_trials(where, name)[0][1].info.run_id
    spool = SpoolWriter(spool_dir(where["tracking"]), where["tracking"])
    spool.append([{"run": run_id, "metrics": [["spooled", 1.0, 1_700_000_000_000, 0]]}])
    spool.close()
    res = invoke("status", "--study", name, *stores_of(where), "--json")
    assert res.exit_code == 3, res.output
    assert json.loads(res.output)["mlflow"]["spool"]["points"] == 1

    res = invoke("status", "--study", name, *stores_of(where), "--repair", "--json")
    assert res.exit_code == 0, res.output
    data = json.loads(res.stdout)  # the replay's line went to stderr
    assert data["repaired"]["failed_trials"] == [trial.number] and data["stale_trials"] == []
    assert [m.value for m in MlflowClient(where["tracking"]).get_metric_history(run_id, "spooled")] == [1.0]


def test_delete_removes_the_study_everywhere_and_nothing_else(sqlite_stores):
    where, client = sqlite_stores, MlflowClient(sqlite_stores["tracking"])
    beta = independent_trials(where, "beta")
    alpha = independent_trials(where, "alpha")
    beta_runs = [r.info.run_id for _, r in beta.values()]
    alpha_run = alpha[0][1].info.run_id
    # A checkpoint of beta's, and spool records of both studies' runs in one segment.
    stored = optuna.load_study(study_name="beta", storage=where["storage"])
    folder = CheckpointDir(default_dir(where["storage"]), "", "",
                           storage_key(where["storage"])).folder(stored)  # where a worker writes
    folder.mkdir(parents=True)
    (folder / "trial-0.pt").write_bytes(b"state")
    spool = SpoolWriter(spool_dir(where["tracking"]), where["tracking"])
    spool.append([{"run": beta_runs[0], "metrics": [["x", 1.0, 1, 0]]},
                  {"run": alpha_run, "metrics": [["x", 2.0, 1, 0]]}])
    spool.close()

    beta_artifacts = [Path(client.get_run(r).info.artifact_uri.removeprefix("file://"))
                      for r in beta_runs]
    assert (beta_artifacts[0] / "lr_curve.png").is_file()  # what an ended trial run holds
    before = snapshot(where["root"])
    res = invoke("delete", "--study", "beta", *stores_of(where))
    assert res.exit_code == 0, res.output
    assert "would remove: Optuna study 'beta' (6 trial(s))" in res.output
    assert "1 parent run(s) and 6 trial run(s)" in res.output and "1 file(s)" in res.output
    assert "spool: 1 point(s) of 1 run(s)" in res.output
    assert snapshot(where["root"]) == before  # nothing removed, nothing written

    res = invoke("delete", "--study", "beta", *stores_of(where), "--yes")
    assert res.exit_code == 0, res.output
    names = [s.study_name for s in optuna.get_all_study_summaries(plain_storage(where["storage"]))]
    assert "beta" not in names and "alpha" in names
    from mlflow.entities import ViewType

    assert client.get_experiment_by_name("beta") is None  # gone, not only marked deleted
    for run_id in beta_runs:
        with pytest.raises(Exception):
            client.get_run(run_id)
    assert not folder.exists() and default_dir(where["storage"]).exists()
    assert not any(art.exists() for art in beta_artifacts)
    assert "lr_curve.png" in [a.path for a in client.list_artifacts(alpha_run)]  # alpha's stay
    from sweep.record import pending

    left = pending(where["tracking"])
    assert left.points == {alpha_run: 1}  # alpha's record stays
    assert len(client.search_runs([client.get_experiment_by_name("alpha").experiment_id],
                                  run_view_type=ViewType.ALL)) == len(alpha) + 1
    # the next status replays alpha's point into alpha's run
    res = invoke("status", "--study", "alpha", *stores_of(where), "--repair")
    assert res.exit_code == 0, res.output


def test_bad_input_is_one_line_exit_2_and_writes_nothing(sqlite_stores, tmp_path):
    where = sqlite_stores
    before = snapshot(where["root"])
    cases = [
        (["best", "--study", "nope", *stores_of(where)], "no study 'nope'"),
        (["best", "--study", "alpha", *stores_of(where), "--per", "base_lr"],
         "--per base_lr: not a categorical search parameter"),
        (["export", "--study", "alpha", *stores_of(where), "--format", "xlsx", "-o",
          str(tmp_path / "t.x")], "--format xlsx: unknown; use csv or json"),
        (["export", "--study", "alpha", *stores_of(where), "--format", "csv", "-o",
          str(tmp_path / "missing" / "t.csv")], "does not exist"),
        (["export", "--study", "nope", *stores_of(where), "--format", "csv", "-o",
          str(tmp_path / "t.csv")], "no study 'nope'"),
        (["delete", "--study", "nope", *stores_of(where), "--yes"], "no study 'nope'"),
        (["status", "--study", "nope", *stores_of(where), "--json"], "no study 'nope'"),
        (["status", "--study", "alpha", "--storage", f"sqlite:///{tmp_path}/none.db"],
         "no Optuna storage"),
        (["list", "--json", "--storage", "redis://x"], "unsupported URL"),
        (["launch", "--study", "smoke", "--dry-run", "--device", "tpu"], "--device tpu"),
        (["launch", "--study", "smoke", "--dry-run", "--storage", "redis://x"], "unsupported URL"),
    ]
    for args, message in cases:
        res = CliRunner().invoke(main, args)
        assert res.exit_code == 2, (args, res.output)
        lines = res.output.strip().splitlines()
        assert len(lines) == 1 and message in lines[0], (args, res.output)
    assert snapshot(where["root"]) == before and list(tmp_path.iterdir()) == []
    # no complete trial is no bad input: exit 1
    empty = fabricate_nothing(where)
    res = invoke("best", "--study", empty, *stores_of(where))
    assert res.exit_code == 1 and "no complete search trial yet" in res.output


def fabricate_nothing(where: dict) -> str:
    optuna.create_study(study_name="empty", storage=plain_storage(where["storage"]),
                        load_if_exists=True)
    return "empty"


def test_launch_dry_run_creates_nothing(sqlite_stores, in_tmp):
    """In an empty folder: no file appears. Against alpha's stores: the budget left comes from
    the stored study, and the stores are untouched."""
    import yaml

    res = invoke("launch", "--study", "smoke", "--dry-run")
    assert res.exit_code == 0, res.output
    assert list(in_tmp.iterdir()) == []
    smoke = yaml.safe_load((Path(__file__).parent.parent / "studies" / "smoke.yaml").read_text())
    T = smoke["data"]["train_size"] // smoke["train"]["batch_size"] * smoke["train"]["epochs"]
    per_trial = 2 * T + 2 * smoke["train"]["epochs"] + 2  # lr, train_loss; val_*; test_acc, epoch_s
    assert f"T = {T} optimizer steps per trial" in res.output
    assert f"budget: {smoke['trials']} trials, 0 used, {smoke['trials']} left" in res.output
    assert "fused pack size 1" in res.output
    assert f"add at most {per_trial * smoke['trials']:,} points" in res.output
    # every default filled in: a key the file does not set
    assert "label_smoothing: 0.0" in res.output and "patience_steps: 20" in res.output

    where = sqlite_stores
    study_file = in_tmp / "alpha.yaml"
    doc = yaml.safe_load(TINY.read_text())
    doc["name"], doc["train"]["epochs"] = "alpha", EPOCHS
    study_file.write_text(yaml.safe_dump(doc))
    before = snapshot(where["root"])
    res = invoke("launch", "--study", str(study_file), *stores_of(where), "--dry-run",
                 "--trials", "10")
    assert res.exit_code == 0, res.output
    assert snapshot(where["root"]) == before
    used = sum(1 for t, _ in independent_trials(where, "alpha").values()
               if t.state in (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL))
    assert f"budget: 10 trials, {used} used, {10 - used} left" in res.output
    assert "resumes the stored study" in res.output


def test_study_names_complete_from_the_storage(sqlite_stores, monkeypatch):
    def complete(storage: str) -> list[str]:
        env = {"_SWEEP_COMPLETE": "bash_complete", "COMP_WORDS": f"sweep best --storage "
               f"{storage} --study ", "COMP_CWORD": "5"}
        res = CliRunner().invoke(main, [], env=env, prog_name="sweep")
        return [line.split(",", 1)[1] for line in res.output.splitlines()]

    names = complete(sqlite_stores["storage"])
    assert {"alpha", "gamma", "smoke"} <= set(names)
    # unreachable (nothing listens): no stored names, no credentials, no error
    down = f"postgresql://sweep:{PG_PASSWORD}@127.0.0.1:9/none"
    env = {"_SWEEP_COMPLETE": "bash_complete", "COMP_WORDS": f"sweep best --storage {down} "
           f"--study al", "COMP_CWORD": "5"}
    res = CliRunner().invoke(main, [], env=env, prog_name="sweep")
    assert res.exit_code == 0 and PG_PASSWORD not in res.output and "alpha" not in res.output


def test_report_top_k_is_a_deprecated_alias_of_top(sqlite_stores):
    res = invoke("report", "--study", "nope", *stores_of(sqlite_stores), "--top-k", "3")
    assert res.exit_code == 2 and "no study 'nope'" in res.output
    assert "--top-k" not in invoke("report", "--help").output


# --- PostgreSQL ------------------------------------------------------------------------------------

def test_on_postgresql(postgres_server, tiny_cifar, tmp_path):
    optuna_url, mlflow_url = postgres_server
    where = {"root": tmp_path, "storage": optuna_url, "tracking": mlflow_url}
    fabricate("pg", optuna_url, mlflow_url, tiny_cifar)
    check_best(where, "pg")
    check_export(where, "pg", tmp_path)
    res = invoke("status", "--study", "pg", *stores_of(where), "--json")
    assert res.exit_code == 0 and PG_PASSWORD not in res.output, res.output
    assert json.loads(res.output)["counts"]["diverged"] == 1
    res = invoke("list", "--storage", optuna_url, "--json")
    assert res.exit_code == 0 and PG_PASSWORD not in res.output
    assert [s["name"] for s in json.loads(res.output)["studies"]] == ["pg"]
    res = invoke("delete", "--study", "pg", *stores_of(where), "--yes")
    assert res.exit_code == 0 and PG_PASSWORD not in res.output, res.output
    assert optuna.get_all_study_summaries(plain_storage(optuna_url)) == []
    client = MlflowClient(mlflow_url)
    assert client.get_experiment_by_name("pg") is None
