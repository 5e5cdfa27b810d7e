"""trial_config: the one function that turns an Optuna trial into a TrialConfig."""

from __future__ import annotations

import math

import optuna
import pytest

from sweep.study.space import trial_config
from sweep.study.spec import load_study


def test_fixed_trial_gives_complete_config():
    spec = load_study("warmup_vs_plateau")
    trial = optuna.trial.FixedTrial({"scheduler": "step", "warmup_steps": 300, "base_lr": 0.4,
                                     "gamma": 0.2, "step_size_epochs": 10})
    cfg = trial_config(trial, spec)
    assert cfg.base_lr == 0.4 and cfg.schedule.name == "step"
    assert cfg.schedule.warmup_steps == 300 and cfg.schedule.params["gamma"] == 0.2
    flat = cfg.flat_params()
    for key in ("warmup_steps", "base_lr", "gamma", "scheduler", "step_size_epochs", "model",
                "epochs", "batch_size", "steps_per_epoch", "train_size", "val_size", "optimizer",
                "momentum", "weight_decay", "warmup_start_factor", "seed"):
        assert key in flat, key
    # whole batches of the study file's training split
    assert flat["steps_per_epoch"] == spec.raw["data"]["train_size"] // spec.raw["train"]["batch_size"]


def test_conditional_params_only_for_their_scheduler():
    spec = load_study("warmup_vs_plateau")
    declared = spec.raw["space"]["scheduler"]
    epochs = spec.raw["train"]["epochs"]
    # the study's fractions of its (long) run, in whole epochs
    milestones = [math.floor(f * epochs) for f in declared["multistep"]["milestones_fraction"]]
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=1))
    seen = set()
    for _ in range(40):
        trial = study.ask()
        cfg = trial_config(trial, spec)
        seen.add(cfg.schedule.name)
        names = set(trial.params)
        if cfg.schedule.name == "cosine":
            assert "gamma" not in names
        if cfg.schedule.name == "plateau":
            assert {"gamma", "patience_epochs"} <= names and "step_size_epochs" not in names
        if cfg.schedule.name == "multistep":
            assert cfg.schedule.params["milestones_epochs"] == milestones
        study.tell(trial, 0.0)
    assert seen == set(declared)  # 40 random draws reach every declared scheduler type


def test_fixed_trial_missing_param_is_an_error():
    spec = load_study("smoke")
    with pytest.raises(ValueError):
        trial_config(optuna.trial.FixedTrial({"scheduler": "cosine"}), spec)


def test_onecycle_gets_no_warmup_draw_but_fixed_warmup_is_refused():
    from pathlib import Path

    from sweep.errors import StudyFileError
    from sweep.study.spec import parse_study

    text = """
trials: 2
data: {train_size: 200, val_size: 50}
train: {model: resnet8, epochs: 2, batch_size: 50}
space:
  warmup_steps: WARMUP
  base_lr: 0.1
  scheduler: {onecycle: {}, cosine: {}}
"""
    spec = parse_study(text.replace("WARMUP", "{type: int, low: 0, high: 4}"), "s.yaml", Path("s.yaml"))
    cfg = trial_config(optuna.trial.FixedTrial({"scheduler": "onecycle"}), spec)
    assert cfg.schedule.warmup_steps == 0
    cfg = trial_config(optuna.trial.FixedTrial({"scheduler": "cosine", "warmup_steps": 3}), spec)
    assert cfg.schedule.warmup_steps == 3
    with pytest.raises(StudyFileError, match="space.warmup_steps.*warmup given twice"):
        parse_study(text.replace("WARMUP", "3"), "s.yaml", Path("s.yaml"))


SEARCHED = """
name: searched
trials: 4
data: {train_size: 512, val_size: 64}
train: {model: resnet8, epochs: 2, batch_size: 128, optimizer: adamw, beta2: 0.99}
space:
  warmup_steps: 2
  base_lr: 0.001
  weight_decay: {type: float, low: 5.0e-5, high: 5.0e-3, log: true}
  beta1: {type: categorical, choices: [0.8, 0.9]}
  label_smoothing: {type: categorical, choices: [0, 0.1]}
  warmup_shape: {type: categorical, choices: [linear, exponential]}
  warmup_start_factor: {type: float, low: 0.1, high: 0.5}
  scheduler: {cosine: {}}
"""


def test_searched_training_fields_are_the_trials_own_everywhere(tmp_path):
    """A searched training field is an Optuna param under its plain name, the trial's value in
    its training settings and its schedule, and an MLflow param under the same name; the
    fields not searched keep the study's values (beta2 fixed in train:)."""
    from sweep.study.spec import parse_study

    spec = parse_study(SEARCHED, "s.yaml", tmp_path / "s.yaml")
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    trial = study.ask()
    cfg = trial_config(trial, spec)
    assert set(trial.params) == {"weight_decay", "beta1", "label_smoothing", "warmup_shape",
                                 "warmup_start_factor"}
    flat = cfg.flat_params()
    for name, value in trial.params.items():
        assert getattr(cfg.train, name) == value and flat[name] == value
    assert isinstance(cfg.train.label_smoothing, float)  # the categorical's 0 is the number 0.0
    assert (cfg.schedule.warmup_shape, cfg.schedule.warmup_start_factor) == \
        (trial.params["warmup_shape"], trial.params["warmup_start_factor"])
    assert cfg.train.beta2 == flat["beta2"] == 0.99 and cfg.train.model == "resnet8"
    assert cfg.seed == spec.seed + trial.number
    fixed = trial_config(optuna.trial.FixedTrial(dict(trial.params)), spec)
    assert fixed.train == cfg.train and fixed.schedule == cfg.schedule  # as confirm/preview redraw
