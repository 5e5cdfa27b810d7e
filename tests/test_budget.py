"""One budget rule on every path (`sweep launch`, `launch --workers`, `sweep worker`, `sweep submit`):
``--trials`` when given, else the stored budget, else the study file's ``trials``; what is chosen is
stored. Each path runs twice on one study, as a user would: with ``--trials`` above the file's
budget, then plain (the stored budget must stand, not fall back to the file's). A plain first
launch taking the file's budget is what every other end-to-end test does.

Real processes, real SQLite files, real MLflow stores, real (tiny) training; SLURM through the
test cluster the fixtures start.
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
import yaml
from optuna.trial import TrialState

from helpers import TINY, sweep_cmd, sweep_env, wait_array_ended
from sweep.loop.budget import BUDGET, budget_used

pytestmark = pytest.mark.slow

FILE_TRIALS = 2  # the study file's budget here; --trials raises it by one


def study_file(folder: Path) -> Path:
    """tests/studies/tiny.yaml with a budget of FILE_TRIALS (tiny trials: bookkeeping, not training)."""
    raw = yaml.safe_load(TINY.read_text())
    raw["trials"] = FILE_TRIALS
    path = folder / "budget.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def stored_and_run(folder: Path) -> tuple[int, int, int]:
    """(stored budget, trials that count towards it, trials in the study) after a path ran."""
    study = optuna.load_study(study_name="tiny", storage=f"sqlite:///{folder}/optuna.db")
    finished = [t for t in study.get_trials(deepcopy=False) if t.state != TrialState.RUNNING]
    return study.user_attrs[BUDGET], budget_used(study), len(finished)


def run_path(path: str, folder: Path, study: Path, env: dict, trials: int | None) -> None:
    stores = ["--storage", f"sqlite:///{folder}/optuna.db",
              "--tracking-uri", f"sqlite:///{folder}/mlflow.db"]
    flag = ["--trials", str(trials)] if trials else []
    command = {"launch": ["launch", "--quiet"], "workers": ["launch", "--quiet", "--workers", "2"],
               "worker": ["worker"],
               "submit": ["submit", "--array", "1", "--cpus-per-task", "1", "--time", "00:05:00",
                          "--python", sys.executable]}
    done = subprocess.run(sweep_cmd(*command[path], "--study", str(study), *stores, *flag),
                          env=env, cwd=folder, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    if path == "submit":
        wait_array_ended(done.stdout.split("submitted job ", 1)[1].split(":")[0], env,
                         time.time() + 240)
        outputs = "".join(p.read_text() for p in (folder / "sweep-jobs").glob("*.out"))
        assert "done, ran" in outputs, outputs[-2000:]


@pytest.mark.parametrize("path", ["launch", "workers", "worker", "submit"])
def test_one_budget_rule_on_every_path(path, tiny_cifar, tmp_path, request):
    env = sweep_env(tiny_cifar)
    if path == "submit":
        env["SLURM_CONF"] = request.getfixturevalue("slurm")
    study = study_file(tmp_path)

    run_path(path, tmp_path, study, env, trials=FILE_TRIALS + 1)  # --trials beats the file
    assert stored_and_run(tmp_path) == (FILE_TRIALS + 1,) * 3

    run_path(path, tmp_path, study, env, trials=None)  # plain again: the stored budget stands
    assert stored_and_run(tmp_path) == (FILE_TRIALS + 1,) * 3
