"""The one place that calls ``trial.suggest_*``: an Optuna trial becomes a ``TrialConfig``.

Parameter names in Optuna are the study file's names (``warmup_steps``, ``base_lr``,
``scheduler``, ``gamma``, ``step_size_epochs``, and the searched training fields such as
``weight_decay`` or ``warmup_shape``), so Optuna, MLflow and the study file agree.
Conditional parameters are suggested only for the scheduler that uses them. The searched
training fields are suggested after all the others, so a study that searches none samples
exactly as before they existed.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from typing import Any

import optuna

from sweep.study.phases import SEED
from sweep.study.schedules import ScheduleConfig, resolve_params
from sweep.study.specs import (CategoricalParam, FloatParam, Fixed, IntParam, Param, SearchSpace,
    StudySpec)
from sweep.study.specs import DataSpec, TrainSpec
from sweep.study.space_rules import train_with


@dataclass(frozen=True)
class TrialConfig:
    """Everything one trial's training needs; no Optuna object past this point."""

    base_lr: float
    schedule: ScheduleConfig
    train: TrainSpec
    data: DataSpec
    seed: int
    sampled: dict  # the hyperparameters as sampled, by study-file name

    def flat_params(self) -> dict[str, Any]:
        """The resolved configuration as flat ``name -> value`` pairs (MLflow params)."""
        out = dict(self.sampled)
        out.update({f"sched.{k}": v for k, v in self.schedule.params.items() if v is not None})
        train = asdict(self.train)
        if self.train.optimizer != "adamw":  # AdamW's betas mean nothing to SGD
            train.pop("beta1"), train.pop("beta2")
        out.update(train)
        out.update({k: v for k, v in asdict(self.data).items()})
        out.update(base_lr=self.base_lr, scheduler=self.schedule.name,
                   warmup_steps=self.schedule.warmup_steps, seed=self.seed,
                   steps_per_epoch=self.data.train_size // self.train.batch_size)
        return {k: json.dumps(v, sort_keys=True) if isinstance(v, (list, tuple, dict)) else v
                for k, v in out.items()}


def suggest(trial: optuna.Trial, name: str, param: Param) -> Any:
    if isinstance(param, Fixed):
        return param.value
    if isinstance(param, CategoricalParam):
        return trial.suggest_categorical(name, list(param.choices))
    if isinstance(param, IntParam):
        return trial.suggest_int(name, param.low, param.high, step=param.step, log=param.log)
    if isinstance(param, FloatParam):
        return trial.suggest_float(name, param.low, param.high, step=param.step, log=param.log)
    raise TypeError(f"not a parameter spec: {param!r}")


def trial_config(trial: optuna.Trial, spec: StudySpec) -> TrialConfig:
    """Sample one trial's hyperparameters from ``spec.space``; the only sampler of the project."""
    space: SearchSpace = spec.space
    sampled: dict[str, Any] = {}
    names = list(space.scheduler)
    scheduler = names[0] if len(names) == 1 else trial.suggest_categorical("scheduler", names)
    sampled["scheduler"] = scheduler
    # onecycle's own ramp is its warmup: no warmup_steps is drawn for it (the spec rejects a
    # fixed warmup > 0 with onecycle as warmup given twice).
    warmup = space.warmup_steps
    sampled["warmup_steps"] = (0 if scheduler == "onecycle" and not isinstance(warmup, Fixed)
                               else suggest(trial, "warmup_steps", warmup))
    sampled["base_lr"] = suggest(trial, "base_lr", space.base_lr)
    given = {k: suggest(trial, k, p) for k, p in space.scheduler[scheduler].items()}
    sampled.update(given)
    searched = {k: suggest(trial, k, p) for k, p in space.train.items()}
    sampled.update(searched)
    train = train_with(spec.train, searched)
    params = resolve_params(scheduler, given, spec.train.epochs)
    schedule = ScheduleConfig(scheduler, int(sampled["warmup_steps"]), train.warmup_shape,
                              train.warmup_start_factor, params)
    return TrialConfig(base_lr=float(sampled["base_lr"]), schedule=schedule, train=train,
                       data=spec.data, seed=trial_seed(trial, spec), sampled=sampled)


def trial_seed(trial: optuna.Trial, spec: StudySpec) -> int:
    """The study's seed + the trial number, unless the trial was enqueued with its own seed
    (``sweep confirm``'s replicates: the same seeds for every configuration they compare)."""
    given = trial.user_attrs.get(SEED)
    return int(given) if given is not None else spec.seed + trial.number
