"""Divergence detection: the monitor's rules on loss sequences, and real resnet8 training on tiny
data that explodes (LR 50), gets a NaN in its loss, or a non-finite gradient."""

from __future__ import annotations

import dataclasses
import math
import os
import subprocess
import sys
from pathlib import Path

import optuna
import pytest
import torch
from mlflow.tracking import MlflowClient

import sweep.training.train
from sweep.training.data import load_splits
from sweep.training.divergence import DivergenceMonitor
from sweep.study.specs import DivergenceSpec
from sweep.study.spec import parse_study
from sweep.study.space import trial_config
from sweep.training.train import StopTraining, train

SPEC = DivergenceSpec(loss_factor=4.0, patience_steps=5, reference_steps=3)


def feed(monitor: DivergenceMonitor, losses, chunk: int = 4, first: int = 0):
    """Give the monitor ``losses`` in chunks, as the training loop does."""
    for start in range(0, len(losses), chunk):
        part = losses[start: start + chunk]
        monitor.on_steps(first + start, [0.1] * len(part), part)


def test_a_non_finite_loss_stops_at_its_step_even_when_disabled():
    for spec in (SPEC, DivergenceSpec(enabled=False)):
        monitor = DivergenceMonitor(spec, warmup_steps=100, steps_per_epoch=10)
        with pytest.raises(StopTraining) as stop:
            feed(monitor, [2.3, 2.2, 2.1, 2.0, 1.9, 1.8, 1.9, math.inf, 2.0])
        assert (stop.value.reason, stop.value.step, stop.value.epoch) == ("diverged", 7, 0)
        assert stop.value.detail == {"loss": "inf", "cause": "non-finite loss"}  # no float NaN/inf


def test_a_loss_above_the_factor_stops_after_patience_steps():
    monitor = DivergenceMonitor(SPEC, warmup_steps=0, steps_per_epoch=100)
    losses = [2.3, 2.2, 2.4] + [2.0] * 4 + [9.0] * 10  # reference 2.2, bar 8.8
    with pytest.raises(StopTraining) as stop:
        feed(monitor, losses)
    assert stop.value.step == 7 + SPEC.patience_steps - 1
    assert stop.value.detail["loss"] == 9.0 and "4 x early reference 2.2" in stop.value.detail["cause"]


def test_an_explosion_inside_the_reference_window_is_still_caught():
    """LR 50 explodes at step 1: above 100 x the lowest loss so far, it stops at once, inside
    the reference window and without patience."""
    monitor = DivergenceMonitor(SPEC, warmup_steps=0, steps_per_epoch=100)
    with pytest.raises(StopTraining) as stop:
        feed(monitor, [2.3, 300.0, 5e4] + [1e4] * 10)
    assert monitor.reference == 2.3 and stop.value.step == 1
    assert stop.value.detail["loss"] == 300.0
    assert "100 x reference 2.3 (ceiling)" in stop.value.detail["cause"]


def test_an_explosion_in_a_trial_shorter_than_patience_is_caught():
    """The issue's trial: 20 steps in all, patience 20, LR 50 -> 2.37, 129, 2776, ..."""
    spec = DivergenceSpec()  # defaults: patience 20, reference 10 steps, ceiling 100
    monitor = DivergenceMonitor(spec, warmup_steps=0, steps_per_epoch=10)
    with pytest.raises(StopTraining) as stop:
        feed(monitor, [2.37, 129.0, 2776.0, 976.0, 34320.0] + [1e4] * 15, chunk=5)
    assert (stop.value.reason, stop.value.step, stop.value.epoch) == ("diverged", 2, 0)


def test_the_ceiling_acts_during_warmup():
    monitor = DivergenceMonitor(SPEC, warmup_steps=100, steps_per_epoch=100)
    with pytest.raises(StopTraining) as stop:
        feed(monitor, [2.3] * 5 + [20.0] * 5 + [1000.0])  # 20 (8.7x) waits; 1000 (435x) does not
    assert stop.value.step == 10


def test_a_first_loss_far_above_chance_level_is_divergence():
    """Step 0 is its own reference; the absolute rule (100 x ln 10 = 230) still applies."""
    monitor = DivergenceMonitor(SPEC, warmup_steps=0, steps_per_epoch=100)
    with pytest.raises(StopTraining) as stop:
        feed(monitor, [500.0, 400.0])
    assert stop.value.step == 0 and "chance-level loss 2.303" in stop.value.detail["cause"]


def test_a_moderate_excess_still_needs_patience():
    """10x the reference is moderate (below the ceiling): only patience_steps in a row stop it."""
    monitor = DivergenceMonitor(SPEC, warmup_steps=0, steps_per_epoch=100)
    feed(monitor, [2.3] * 3 + [23.0] * (SPEC.patience_steps - 1) + [2.0])
    assert monitor.bad_steps == 0
    with pytest.raises(StopTraining) as stop:
        feed(monitor, [23.0] * SPEC.patience_steps, first=3 + SPEC.patience_steps)
    assert stop.value.step == 3 + 2 * SPEC.patience_steps - 1
    assert f"for {SPEC.patience_steps} steps" in stop.value.detail["cause"]


def test_a_validation_loss_far_above_chance_level_ends_the_epoch_as_diverged():
    monitor = DivergenceMonitor(SPEC, warmup_steps=0, steps_per_epoch=10)
    feed(monitor, [2.3] * 10)
    monitor.on_epoch_end(0, {"val_loss": 601.0, "val_acc": 0.08})  # measured, not diverged
    with pytest.raises(StopTraining) as stop:
        monitor.on_epoch_end(1, {"val_loss": 4.7e7, "val_acc": 0.1})  # the explosion
    assert (stop.value.step, stop.value.epoch, stop.value.detail["loss"]) == (19, 1, 4.7e7)
    assert "validation loss 4.7e+07 above 10000 x chance-level loss 2.303" in stop.value.detail["cause"]
    # disabled: only a non-finite validation loss ends the trial
    off = DivergenceMonitor(DivergenceSpec(enabled=False), warmup_steps=0, steps_per_epoch=10)
    off.on_epoch_end(0, {"val_loss": 4.7e7, "val_acc": 0.1})


def test_a_spike_that_recovers_during_warmup_is_not_divergence():
    monitor = DivergenceMonitor(SPEC, warmup_steps=30, steps_per_epoch=100)
    feed(monitor, [2.3] * 3 + [20.0] * 12 + [2.0] * 40)  # 12 bad steps inside warmup, recovered
    assert monitor.bad_steps == 0


def test_a_spike_lasting_past_warmup_stops_at_the_first_step_after_warmup():
    monitor = DivergenceMonitor(SPEC, warmup_steps=30, steps_per_epoch=100)
    with pytest.raises(StopTraining) as stop:
        feed(monitor, [2.3] * 3 + [20.0] * 40)
    assert stop.value.step == 30


def test_a_plateau_reduction_resets_the_count():
    monitor = DivergenceMonitor(SPEC, warmup_steps=0, steps_per_epoch=10)
    feed(monitor, [2.3] * 3 + [2.0] * 3 + [20.0] * 4)  # 4 bad steps: one short of patience
    monitor.on_epoch_end(0, {"val_loss": 2.0, "val_acc": 0.2, "lr_reduced": True})
    feed(monitor, [20.0] * 4, first=10)  # 4 more after the reset: still alive
    assert monitor.bad_steps == 4
    with pytest.raises(StopTraining):
        monitor.on_epoch_end(1, {"val_loss": math.nan, "val_acc": 0.1, "lr_reduced": False})


# --- real training -----------------------------------------------------------------------------

STUDY = """
name: div
trials: 1
divergence: {loss_factor: 4.0, patience_steps: 5, reference_steps: 3}
data: {train_size: 160, val_size: 40, test_size: 40}
train: {model: resnet8, width: 1, epochs: 2, batch_size: 8, sync_every_steps: 4}
space: {warmup_steps: 0, base_lr: 0.1, scheduler: {constant: {}}}
"""


@pytest.fixture(scope="module")
def setup(tiny_cifar, tmp_path_factory):
    path = tmp_path_factory.mktemp("div") / "div.yaml"
    spec = parse_study(STUDY, str(path), path)
    splits = load_splits(tiny_cifar, spec.data, torch.device("cpu"), download=False)
    return spec, splits


def run(setup, lr: float, listeners=()):
    spec, splits = setup
    cfg = trial_config(optuna.trial.FixedTrial({}), spec)
    cfg = dataclasses.replace(cfg, base_lr=lr)
    monitor = DivergenceMonitor(spec.divergence, cfg.schedule.warmup_steps, spec.steps_per_epoch)
    seen = Recorder()
    with pytest.raises(StopTraining) as stop:
        train(cfg, splits, torch.device("cpu"), [seen, monitor, *listeners])
    return stop.value, seen


class Recorder:
    """A listener that keeps what the loop reported."""

    def __init__(self):
        self.losses: list[float] = []

    def on_steps(self, first_step, lrs, losses):
        assert first_step == len(self.losses)
        self.losses.extend(losses)

    def on_epoch_end(self, epoch, metrics):
        pass


@pytest.mark.slow
def test_an_absurd_lr_is_pruned_as_diverged_inside_its_first_epoch(setup):
    stop, seen = run(setup, lr=50.0)
    spec = setup[0]
    assert stop.reason == "diverged" and stop.epoch == 0
    assert stop.step < spec.steps_per_epoch  # 20 steps per epoch
    assert len(seen.losses) <= stop.step + spec.train.sync_every_steps


def _nan_at_forward(k: int, what: str):
    """A ``build_model`` that returns the real model with a hook making the k-th training
    forward's output NaN (``what="loss"``) or the k-th backward's gradient inf (``"grad"``)."""
    real = sweep.training.train.build_model

    def build(name, width=1, *rest):
        model = real(name, width, *rest)
        calls = {"forward": 0, "backward": 0}

        def forward_hook(module, args, output):
            if module.training:
                calls["forward"] += 1
                if what == "loss" and calls["forward"] == k + 1:
                    return output * math.nan
            return output

        def grad_hook(grad):
            calls["backward"] += 1
            return grad * math.inf if what == "grad" and calls["backward"] == k + 1 else grad

        model.register_forward_hook(forward_hook)
        model.head.weight.register_hook(grad_hook)
        return model

    return build


@pytest.mark.slow
def test_a_nan_in_the_loss_stops_training_at_that_step(setup, monkeypatch):
    monkeypatch.setattr(sweep.training.train, "build_model", _nan_at_forward(6, "loss"))
    stop, seen = run(setup, lr=0.1)
    assert (stop.reason, stop.step, stop.epoch) == ("diverged", 6, 0)
    assert stop.detail == {"loss": "nan", "cause": "non-finite loss"}
    assert all(math.isfinite(x) for x in seen.losses[:6]) and math.isnan(seen.losses[6])


@pytest.mark.slow
def test_a_non_finite_gradient_is_caught_by_the_next_steps_loss(setup, monkeypatch):
    monkeypatch.setattr(sweep.training.train, "build_model", _nan_at_forward(9, "grad"))
    stop, seen = run(setup, lr=0.1)
    assert (stop.reason, stop.step, stop.detail["cause"]) == ("diverged", 10, "non-finite loss")
    assert all(math.isfinite(x) for x in seen.losses[:10])


# --- through `sweep launch`, read back from Optuna and MLflow ------------------------------------

EXPLODE = Path(__file__).parent / "studies" / "explode.yaml"


def launch_explode(folder: Path, data_dir: Path, *overrides: str):
    """`sweep launch` of the exploding study in a subprocess; returns its Optuna trials and an
    MLflow client with the trial runs by id."""
    cmd = [sys.executable, "-m", "sweep.cli", "launch", "--study", str(EXPLODE), "--quiet",
           "--data-dir", str(data_dir), *[x for o in overrides for x in ("--set", o)]]
    proc = subprocess.run(cmd, cwd=folder, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "PYTHONWARNINGS": "ignore"})
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    study = optuna.load_study(study_name="explode", storage=f"sqlite:///{folder}/sweep.db")
    client = MlflowClient(f"sqlite:///{folder}/mlflow.db")
    experiment = client.get_experiment_by_name("explode")
    runs = {r.info.run_id: r for r in client.search_runs([experiment.experiment_id],
                                                         "tags.`sweep.role` = 'trial'")}
    return study.get_trials(), client, runs


def assert_diverged_in_epoch_0(trials, client, runs, cause: str):
    assert len(trials) == 2 and len(runs) == 2
    for t in trials:
        assert t.state == optuna.trial.TrialState.PRUNED, (t.number, t.state, t.user_attrs)
        attrs = t.user_attrs
        assert (attrs["prune_reason"], attrs["prune_epoch"]) == ("diverged", 0), attrs
        assert 0 <= attrs["prune_step"] < 10 and cause in attrs["prune_cause"], attrs
        assert math.isfinite(attrs["prune_loss"]) and not t.intermediate_values
        run = runs[attrs["mlflow_run_id"]]
        assert run.info.status == "KILLED"
        assert run.data.tags["sweep.prune_reason"] == "diverged"
        assert run.data.tags["sweep.prune_epoch"] == "0"
        for key in run.data.metrics:  # every value of every series: no NaN/inf stored
            history = client.get_metric_history(run.info.run_id, key)
            assert history and all(math.isfinite(m.value) for m in history), key
    return trials


@pytest.mark.slow
def test_an_exploding_trial_through_sweep_launch_is_pruned_as_diverged(tmp_path, shared_cifar):
    """The issue's case: smoke-sized trials (20 steps, shorter than patience_steps 20 with its
    reference window), LR 50 -> stopped by the loss ceiling within the first steps."""
    trials, client, runs = launch_explode(tmp_path, shared_cifar)
    assert_diverged_in_epoch_0(trials, client, runs, "(ceiling)")
    for t in trials:
        losses = client.get_metric_history(t.user_attrs["mlflow_run_id"], "train_loss")
        assert max(m.step for m in losses) < 10  # never reached the end of epoch 0


@pytest.mark.slow
def test_a_validation_loss_far_above_chance_level_through_sweep_launch(tmp_path, shared_cifar):
    """With the training-loss ceiling out of reach, the validation loss after epoch 0 (millions,
    against ln 10 = 2.3) ends the trial at that epoch's last step."""
    trials, client, runs = launch_explode(tmp_path, shared_cifar, "divergence.ceiling_factor=1000000000",
                                          "divergence.patience_steps=100")
    assert_diverged_in_epoch_0(trials, client, runs, "validation loss")
    assert all(t.user_attrs["prune_step"] == 9 for t in trials)


@pytest.mark.parametrize("override,words", [
    ("divergence.ceiling_factor=3", "divergence.ceiling_factor (--set): must be above loss_factor (4), got 3"),
    ("divergence.ceiling_factor=1", "divergence.ceiling_factor (--set): must be in (1, "),
    ("divergence.val_loss_factor=0.5", "divergence.val_loss_factor (--set): must be in (1, "),
    ("divergence.val_loss_factor=high", "divergence.val_loss_factor (--set): must be a number"),
])
def test_bad_divergence_factors_are_one_line_errors(override, words):
    from sweep.errors import StudyFileError
    from sweep.study.spec import load_study

    with pytest.raises(StudyFileError) as info:
        load_study("smoke", [override])
    assert words in str(info.value) and "\n" not in str(info.value)
