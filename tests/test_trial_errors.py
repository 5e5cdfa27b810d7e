"""A trial that raises (a bug in code that runs inside the loop) is FAIL with the error in
Optuna and in MLflow, and the study goes on to its next trial."""

from __future__ import annotations

import pytest
from mlflow.tracking import MlflowClient
from optuna.trial import TrialState

from sweep.commands.launch import LaunchOptions, open_study_stores
from sweep.study.spec import load_study
from sweep.loop.worker import run_worker

pytestmark = pytest.mark.slow

SMALL = ["data.train_size=150", "data.val_size=50", "data.test_size=40", "train.batch_size=15",
         "train.epochs=2"]


class Buggy:
    """A listener with a bug: it raises at the end of the first epoch."""

    def __init__(self, trial_number: int, epochs: int, row: int):
        pass

    def on_steps(self, first_step, lrs, losses):
        pass

    def on_epoch_end(self, epoch, metrics):
        raise RuntimeError("boom in user code")

    def close(self):
        pass


def test_a_raising_trial_fails_and_the_study_goes_on(in_tmp, tiny_cifar):
    spec = load_study("smoke", SMALL)
    opts = LaunchOptions(f"sqlite:///{in_tmp}/s.db", f"sqlite:///{in_tmp}/m.db", str(tiny_cifar),
                         "cpu", 2)
    stores = open_study_stores(spec, opts)
    study, ctx = stores.study, stores.worker_context(spec)
    ctx.progress = Buggy
    report = run_worker(study, ctx, budget=2)
    assert [o.state for o in report.ran] == [TrialState.FAIL, TrialState.FAIL]
    trials = study.get_trials()
    assert [t.state for t in trials] == [TrialState.FAIL, TrialState.FAIL]
    client = MlflowClient(tracking_uri=opts.tracking_uri)
    for trial in trials:
        assert trial.user_attrs["error"] == "RuntimeError: boom in user code"
        run = client.get_run(trial.user_attrs["mlflow_run_id"])
        assert run.info.status == "FAILED"
        assert run.data.tags["sweep.state"] == "FAIL"
        assert run.data.tags["sweep.error"] == "RuntimeError: boom in user code"
        assert "boom in user code" in run.data.tags["sweep.traceback"]
        assert len(client.get_metric_history(run.info.run_id, "lr")) == 10  # epoch 0's steps kept
