"""Secrets: a run against a real PostgreSQL with a known password, then every console line,
log file, error message, MLflow param and tag, Optuna attribute and report is grepped for it."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import optuna
import pytest
from mlflow.tracking import MlflowClient

from helpers import PG_PASSWORD

SMALL = ["--set", "data.train_size=150", "--set", "data.val_size=50", "--set", "data.test_size=40",
         "--set", "train.batch_size=15", "--set", "train.epochs=1"]


def sweep(*args: str, cwd: Path, env_extra: dict | None = None):
    env = {**os.environ, "PYTHONWARNINGS": "ignore", **(env_extra or {})}
    return subprocess.run([sys.executable, "-m", "sweep.cli", *args], cwd=cwd, capture_output=True,
                          text=True, timeout=600, env=env)


@pytest.mark.slow
def test_password_never_leaks(tmp_path, tiny_cifar, postgres_server):
    optuna_url, mlflow_url = postgres_server
    assert PG_PASSWORD in optuna_url
    outputs = []
    launched = sweep("launch", "--study", "smoke", "--trials", "2", "--data-dir", str(tiny_cifar),
                     "--storage", optuna_url, "--tracking-uri", mlflow_url, *SMALL, cwd=tmp_path)
    assert launched.returncode == 0, launched.stderr[-3000:]
    assert "postgresql://sweep:***@" in launched.stdout
    outputs += [launched.stdout, launched.stderr]

    # Errors that carry the URL: a wrong database, a wrong port, a wrong password.
    for bad in (optuna_url.rsplit("/", 1)[0] + "/nodb", optuna_url.replace("127.0.0.1:", "127.0.0.1:1"),
                optuna_url.replace(PG_PASSWORD, PG_PASSWORD + "x")):
        failed = sweep("launch", "--study", "smoke", "--data-dir", str(tiny_cifar), "--storage", bad,
                       "--tracking-uri", mlflow_url, *SMALL, cwd=tmp_path)
        assert failed.returncode == 2 and failed.stderr.startswith("error: storage 'postgresql://sweep:***@")
        outputs += [failed.stdout, failed.stderr]
    # Environment variables are read the same way.
    via_env = sweep("launch", "--study", "smoke", "--data-dir", str(tiny_cifar), *SMALL,
                    cwd=tmp_path, env_extra={"SWEEP_STORAGE": optuna_url, "MLFLOW_TRACKING_URI": mlflow_url})
    assert via_env.returncode == 0, via_env.stderr[-2000:]
    outputs += [via_env.stdout, via_env.stderr]
    for extra in (["status", "--study", "smoke"], ["report", "--study", "smoke", "-o", "report"],
                  ["list"]):
        result = sweep(*extra, "--storage", optuna_url,
                       *(["--tracking-uri", mlflow_url] if extra[0] != "list" else []), cwd=tmp_path)
        outputs += [result.stdout, result.stderr]
    for text in outputs:
        assert PG_PASSWORD not in text

    # Files written anywhere under the run folder (report, artifacts, logs).
    for path in tmp_path.rglob("*"):
        if path.is_file():
            assert PG_PASSWORD.encode() not in path.read_bytes(), path

    # Everything MLflow holds: params, tags, and the artifacts of every run.
    client = MlflowClient(tracking_uri=mlflow_url)
    experiment = client.get_experiment_by_name("smoke")
    runs = client.search_runs([experiment.experiment_id], max_results=100)
    assert len(runs) >= 3
    for run in runs:
        for mapping in (run.data.params, run.data.tags):
            for key, value in mapping.items():
                assert PG_PASSWORD not in key and PG_PASSWORD not in value, (key, value)
    parent = [r for r in runs if r.data.tags.get("sweep.role") == "study"][0]
    assert parent.data.params["storage"].startswith("postgresql://sweep:***@")

    # Everything Optuna holds.
    study = optuna.load_study(study_name="smoke", storage=optuna_url)
    for attrs in [study.user_attrs] + [
            a for t in study.get_trials() for a in (t.user_attrs, t.system_attrs)]:
        assert PG_PASSWORD not in repr(attrs)


@pytest.mark.parametrize("text, secret", [
    ("postgresql://sweep:pw@db:5432/optuna", "pw"),
    ("postgresql+psycopg://sweep:p%40ss:w@db/optuna", "p%40ss:w"),
    ("postgresql://db/optuna?user=sweep&password=hunter2&sslmode=require", "hunter2"),
    ("mysql://db/x?sslmode=require;PASSWORD=Hunter-3", "Hunter-3"),
    ("http://mlflow:5000/?token=abc.def&x=1", "abc.def"),
    ("error: could not connect to postgresql://u:s3cret@h/db and http://h/?pwd=s3cret2", "s3cret"),
])
def test_mask_url_hides_passwords_in_the_netloc_and_the_query(text, secret):
    from sweep.base.urls import mask_url

    masked = mask_url(text)
    assert secret not in masked and "***" in masked
    assert masked.split("***")[0] == text.split(secret)[0]  # the rest of the URL stays readable
