"""What a study records to be reproduced: `sweep launch --seed` gives the same trials and the same
curves again (and another seed other trials), and the parent run keeps the study file and the
code version. Real `sweep launch` processes on tiny data, read back through Optuna and MLflow."""

from __future__ import annotations

import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import optuna
import pytest
from mlflow.tracking import MlflowClient

import sweep
from sweep.study.spec import find_study

pytestmark = pytest.mark.slow

SMALL = ["--set", "data.train_size=150", "--set", "data.val_size=50", "--set", "data.test_size=40",
         "--set", "train.batch_size=15", "--set", "train.epochs=1"]


def launch(folder: Path, data: Path, seed: int) -> None:
    folder.mkdir()
    done = subprocess.run([sys.executable, "-m", "sweep.cli", "launch", "--study", "smoke",
                           "--trials", "2", "--seed", str(seed), "--quiet", "--data-dir", str(data),
                           *SMALL], cwd=folder, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stdout + done.stderr[-3000:]


def trials_and_curves(folder: Path) -> list[tuple]:
    """(params, state, value, lr curve, train_loss curve) of each trial, by trial number."""
    study = optuna.load_study(study_name="smoke", storage=f"sqlite:///{folder}/sweep.db")
    client = MlflowClient(f"sqlite:///{folder}/mlflow.db")
    out = []
    for t in study.get_trials():
        run_id = t.user_attrs["mlflow_run_id"]
        curves = [[m.value for m in sorted(client.get_metric_history(run_id, key),
                                           key=lambda m: m.step)] for key in ("lr", "train_loss")]
        out.append((t.params, t.state, t.value, *curves))
    return out


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_cifar):
    root = tmp_path_factory.mktemp("seeds")
    # at once, in separate folders: one thread each, so running side by side changes no result
    with ThreadPoolExecutor(3) as pool:  # result(): a failed launch's assertion is raised here
        for done in [pool.submit(launch, root / name, tiny_cifar, seed)
                     for name, seed in (("a", 3), ("b", 3), ("c", 4))]:
            done.result()
    return root


def test_same_seed_same_trials_and_curves(runs):
    a, b = trials_and_curves(runs / "a"), trials_and_curves(runs / "b")
    assert len(a) == 2 and all(curve for trial in a for curve in trial[3:])
    assert a == b  # parameters, outcomes, values and every step's LR and loss, exactly


def test_another_seed_draws_other_trials(runs):
    a, c = trials_and_curves(runs / "a"), trials_and_curves(runs / "c")
    assert [t[0] for t in a] != [t[0] for t in c]
    for folder, seed in (("a", "3"), ("c", "4")):  # the parent run records the study's seed
        client = MlflowClient(f"sqlite:///{runs}/{folder}/mlflow.db")
        experiment = client.get_experiment_by_name("smoke").experiment_id
        parent, = client.search_runs([experiment], "tags.`sweep.role` = 'study'")
        assert parent.data.params["seed"] == seed


def test_parent_run_keeps_the_study_file_and_the_code_version(runs):
    client = MlflowClient(f"sqlite:///{runs}/a/mlflow.db")
    experiment = client.get_experiment_by_name("smoke").experiment_id
    parent, = client.search_runs([experiment], "tags.`sweep.role` = 'study'")
    study_file = find_study("smoke")
    artifacts = [a.path for a in client.list_artifacts(parent.info.run_id)]
    assert study_file.name in artifacts
    copy = client.download_artifacts(parent.info.run_id, study_file.name, str(runs / "dl"))
    assert Path(copy).read_text() == study_file.read_text()

    version = parent.data.tags["sweep.code_version"]
    package, _, commit = version.partition("+")
    assert package == sweep.__version__
    if commit:  # run from a git checkout: the commit is one of this repository's
        known = subprocess.run(["git", "cat-file", "-e", f"{commit}^{{commit}}"],
                               cwd=Path(sweep.__file__).parent, capture_output=True)
        assert known.returncode == 0, version
    trials = client.search_runs([experiment], "tags.`sweep.role` = 'trial'")
    assert trials and {r.data.tags["sweep.code_version"] for r in trials} == {version}
