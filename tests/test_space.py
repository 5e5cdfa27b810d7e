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
