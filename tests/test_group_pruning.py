"""Pruning per group (``pruner: {per: scheduler}``) and the confirmation phase's exemption, driven
as Optuna's own pruner tests are: a real in-memory study, ``study.ask()`` / ``trial.report()``,
no training."""

from __future__ import annotations

import optuna
import pytest

from sweep.errors import StudyFileError
from sweep.study.phases import CONFIRM, PHASE
from sweep.study.pruning import build_pruner
from sweep.study.specs import PrunerSpec
from sweep.study.spec import load_study, parse_study

TYPES = ["cosine", "plateau"]
MEDIAN = {"n_startup_trials": 2, "n_warmup_steps": 0}


def _run(study, scheduler, values, complete=True, user_attrs=None):
    """One trial of ``scheduler`` reporting ``values`` per epoch; returns whether the pruner
    would stop it after the last one (and completes it when asked to)."""
    study.enqueue_trial({"scheduler": scheduler}, user_attrs=user_attrs)
    trial = study.ask()
    trial.suggest_categorical("scheduler", TYPES)
    for step, value in enumerate(values):
        trial.report(value, step)
    pruned = trial.should_prune()
    if complete:
        study.tell(trial, values[-1])
    else:
        study.tell(trial, state=optuna.trial.TrialState.PRUNED)
    return pruned


def _study(per):
    return optuna.create_study(direction="maximize",
                               pruner=build_pruner(PrunerSpec("median", MEDIAN, per=per), 4))


def test_a_plateau_trial_is_not_pruned_by_cosine_trials_values():
    grouped, pooled = _study("scheduler"), _study(None)
    for study in (grouped, pooled):
        for _ in range(3):
            _run(study, "cosine", [0.6, 0.8, 0.9])
    # the same poor early curve: pooled with cosine it is stopped, in its own group it is not
    assert _run(pooled, "plateau", [0.2, 0.3, 0.4], complete=False)
    assert not _run(grouped, "plateau", [0.2, 0.3, 0.4])


def test_a_plateau_trial_is_pruned_once_plateau_has_enough_complete_trials_and_it_is_worse():
    study = _study("scheduler")
    for _ in range(3):
        _run(study, "cosine", [0.6, 0.8, 0.9])
    assert not _run(study, "plateau", [0.3, 0.4, 0.5])  # plateau's 1st complete trial
    assert not _run(study, "plateau", [0.2, 0.2, 0.2], complete=False)  # 1 < n_startup_trials
    assert not _run(study, "plateau", [0.3, 0.4, 0.5])  # its 2nd: now plateau has a median
    assert _run(study, "plateau", [0.2, 0.2, 0.2], complete=False)  # below it
    assert not _run(study, "plateau", [0.35, 0.45, 0.55], complete=False)  # above it
    # and cosine trials are still judged by cosine's own median (0.9), not by plateau's
    assert _run(study, "cosine", [0.5, 0.6, 0.7], complete=False)


@pytest.mark.parametrize("per", [None, "scheduler"])
def test_confirmation_trials_are_never_pruned_nor_used_as_references(per):
    study = _study(per)
    confirm = {PHASE: CONFIRM}
    for _ in range(2):
        _run(study, "plateau", [0.3, 0.4, 0.5])
    # a terrible replicate runs to its end
    assert not _run(study, "plateau", [0.0, 0.0, 0.0], user_attrs=confirm)
    # excellent replicates would lift the median to 0.99 if they were references
    for _ in range(5):
        _run(study, "plateau", [0.99, 0.99, 0.99], user_attrs=confirm)
    assert not _run(study, "plateau", [0.35, 0.45, 0.55], complete=False)
    assert _run(study, "plateau", [0.1, 0.1, 0.1], complete=False)


STUDY = """
name: grouped
trials: 4
pruner: {type: median, n_startup_trials: 2, per: %s}
data: {train_size: 512, val_size: 64}
train: {model: resnet8, epochs: 2, batch_size: 128}
space:
  warmup_steps: {type: int, low: 0, high: 4}
  base_lr: {type: float, low: 0.01, high: 1.0, log: true}
  scheduler: {cosine: {}, plateau: {gamma: 0.5, patience_epochs: 1}}
"""


def test_per_is_a_categorical_parameter_of_the_space(tmp_path):
    spec = parse_study(STUDY % "scheduler", "s.yaml", tmp_path / "s.yaml")
    assert spec.pruner.per == "scheduler"
    with pytest.raises(StudyFileError) as err:
        parse_study(STUDY % "schedular", "s.yaml", tmp_path / "s.yaml")
    assert str(err.value) == ("s.yaml: pruner.per (line 4): 'schedular' is not a categorical "
                              "parameter of the space (did you mean 'scheduler'?); categorical "
                              "parameters: scheduler")
    with pytest.raises(StudyFileError, match="base_lr' is not a categorical"):
        parse_study(STUDY % "base_lr", "s.yaml", tmp_path / "s.yaml")
    one_type = STUDY.replace(", plateau: {gamma: 0.5, patience_epochs: 1}}", "}")
    with pytest.raises(StudyFileError, match="one scheduler type has no groups"):
        parse_study(one_type % "scheduler", "s.yaml", tmp_path / "s.yaml")
    hyperband = STUDY.replace("type: median, n_startup_trials: 2", "type: hyperband")
    with pytest.raises(StudyFileError, match="'hyperband' cannot prune per group"):
        parse_study(hyperband % "scheduler", "s.yaml", tmp_path / "s.yaml")


def test_per_may_name_a_searched_training_field(tmp_path):
    """``per: warmup_shape`` groups by the searched categorical training field, as ``per:
    scheduler`` groups by scheduler type: a trial is compared only with its own shape's."""
    searched = STUDY.replace("  scheduler:", "  warmup_shape: {type: categorical, choices: "
                                             "[linear, exponential]}\n  scheduler:")
    spec = parse_study(searched % "warmup_shape", "s.yaml", tmp_path / "s.yaml")
    assert spec.pruner.per == "warmup_shape"
    study = optuna.create_study(direction="maximize",
                                pruner=build_pruner(spec.pruner, spec.train.epochs))
    shapes = optuna.distributions.CategoricalDistribution(["linear", "exponential"])

    def run(shape, value, complete=True):
        study.enqueue_trial({"warmup_shape": shape})
        trial = study.ask({"warmup_shape": shapes})
        for step in range(4):
            trial.report(value, step)
        pruned = trial.should_prune()
        study.tell(trial, value if complete else None,
                   state=None if complete else optuna.trial.TrialState.PRUNED)
        return pruned

    run("linear", 0.8), run("linear", 0.9)  # two complete linear trials, far better ...
    assert not run("exponential", 0.1)  # ... do not judge the first exponential trial
    assert run("linear", 0.1, complete=False)  # within its own group it is the worst


def test_the_shipped_question_prunes_per_scheduler_type():
    spec = load_study("warmup_vs_plateau")
    assert spec.pruner.per == "scheduler"
