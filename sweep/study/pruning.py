"""Pruners: the study file's ``pruner:`` section turned into an Optuna pruner.

Epochs are the resource: trials report the objective once per epoch with step = the epoch
index 0 .. epochs-1 (Optuna's own convention, and the ``step`` of ``val_acc`` in MLflow), so
``n_warmup_steps``, ``interval_steps``, ``min_resource`` and ``max_resource`` count epochs.
A step-``r`` decision happens after ``r + 1`` epochs: ``median`` with ``n_warmup_steps: 0``
may stop a trial after its first epoch; ``hyperband``/``successive_halving`` rungs sit at
steps ``min_resource * reduction_factor**k`` (k >= the bracket's early-stopping rate).
Divergence is not a pruner's business (it is per optimizer step, see ``sweep.training.divergence``).

A retry (a trial continued after its worker died or was stopped, ``sweep.stores.retry``) meets
the pruning decisions of the trial it continues: Optuna's Hyperband draws a trial's bracket from
a hash of the study name and the trial's number, and the retry has a new number, so its bracket
is drawn from the number it continues instead, recorded on it as ``PRUNING_TRIAL``. The other
pruners compare a trial's values at a step with other trials' and never read its number.
"""

from __future__ import annotations

import copy

import optuna
from optuna.trial import FrozenTrial

from sweep.study.phases import StudyView, is_search
from sweep.study.specs import PrunerSpec

DEFAULT_MEDIAN = {"n_startup_trials": 5, "n_warmup_steps": 2}
# system attribute of a retry: the number of the first trial of its chain (the original), whose
# Hyperband bracket it keeps (set when the retry is enqueued)
PRUNING_TRIAL = "sweep.pruning_trial"


def pruning_number(trial: FrozenTrial) -> int:
    """The trial number ``trial``'s pruning decisions are drawn from: its original's for a
    retry, else its own."""
    return int(trial.system_attrs.get(PRUNING_TRIAL, trial.number))


class RetryHyperbandPruner(optuna.pruners.HyperbandPruner):
    """Optuna's ``HyperbandPruner``, with each trial's bracket drawn from ``pruning_number``: a
    retry stays in its original's bracket (rungs, competitors, budget share) whatever its own
    number. Every trial that was never a retry gets the bracket Optuna would give it."""

    def _get_bracket_id(self, study: optuna.Study, trial: FrozenTrial) -> int:
        number = pruning_number(trial)
        if number != trial.number:
            trial = copy.copy(trial)  # Optuna hashes study name and number; keep its formula
            trial.number = number
        return super()._get_bracket_id(study, trial)


class GroupPruner(optuna.pruners.BasePruner):
    """Wraps the study's pruner: it never stops a confirmation trial, compares only with search
    trials, and with ``per`` only with trials that drew the same value of that categorical
    parameter (a ``StudyView``). Each group then needs its own ``n_startup_trials`` complete
    trials before any of its trials is pruned: a schedule that keeps a high LR early and
    decays late (plateau, multistep) looks worse at epoch 3 than one that decays early, so
    pruned against all trials it would never complete (the short-horizon bias, Wu et al.
    2018)."""

    def __init__(self, wrapped: optuna.pruners.BasePruner, per: str | None = None):
        self.wrapped, self.per = wrapped, per

    def prune(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> bool:
        if not is_search(trial):
            return False  # a replicate runs to the end, whatever it looks like early
        if self.per is None:
            return self.wrapped.prune(StudyView(study, is_search), trial)
        mine = trial.params.get(self.per)
        return self.wrapped.prune(
            StudyView(study, lambda t: is_search(t) and t.params.get(self.per) == mine), trial)


def build_pruner(spec: PrunerSpec, epochs: int) -> optuna.pruners.BasePruner:
    """The study's pruner (``GroupPruner`` around the Optuna pruner ``spec`` names)."""
    return GroupPruner(_optuna_pruner(spec, epochs), spec.per)


def _optuna_pruner(spec: PrunerSpec, epochs: int) -> optuna.pruners.BasePruner:
    """The Optuna pruner for ``spec``; hyperband's ``max_resource`` is the study's epochs."""
    p = dict(spec.params)
    kind = spec.type
    if kind == "none":
        return optuna.pruners.NopPruner()
    if kind == "median":
        return optuna.pruners.MedianPruner(**{**DEFAULT_MEDIAN, **p})
    if kind == "percentile":
        return optuna.pruners.PercentilePruner(**{**DEFAULT_MEDIAN, "percentile": 25.0, **p})
    if kind == "successive_halving":
        return optuna.pruners.SuccessiveHalvingPruner(**{"min_resource": 1, **p})
    if kind == "hyperband":
        return RetryHyperbandPruner(**{"min_resource": 1, **p}, max_resource=epochs)
    if kind == "threshold":  # lower/upper were checked at load (pruner_problem)
        return optuna.pruners.ThresholdPruner(**p)
    if kind == "patient":
        return optuna.pruners.PatientPruner(_optuna_pruner(spec.wrapped, epochs),
                                            patience=p.get("patience", 2),
                                            min_delta=p.get("min_delta", 0.0))
    raise ValueError(f"unknown pruner {kind!r}")  # unreachable: the spec validated the name


def describe_pruner(spec: PrunerSpec) -> str:
    """A short name for logs and user attributes, e.g. ``patient(median)``."""
    name = f"patient({describe_pruner(spec.wrapped)})" if spec.type == "patient" else spec.type
    return f"{name} per {spec.per}" if spec.per else name
