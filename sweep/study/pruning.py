"""Pruners: the study file's ``pruner:`` section turned into an Optuna pruner.

Epochs are the resource: trials report the objective once per epoch with step = the epoch
index 0 .. epochs-1 (Optuna's own convention, and the ``step`` of ``val_acc`` in MLflow), so
``n_warmup_steps``, ``interval_steps``, ``min_resource`` and ``max_resource`` count epochs.
A step-``r`` decision happens after ``r + 1`` epochs: ``median`` with ``n_warmup_steps: 0``
may stop a trial after its first epoch; ``hyperband``/``successive_halving`` rungs sit at
steps ``min_resource * reduction_factor**k`` (k >= the bracket's early-stopping rate).
Divergence is not a pruner's business (it is per optimizer step, see ``sweep.training.divergence``).
"""

from __future__ import annotations

import optuna

from sweep.study.phases import StudyView, is_search
from sweep.study.specs import PrunerSpec

DEFAULT_MEDIAN = {"n_startup_trials": 5, "n_warmup_steps": 2}


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
        return optuna.pruners.HyperbandPruner(**{"min_resource": 1, **p}, max_resource=epochs)
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
