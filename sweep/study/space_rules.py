"""The ``space:`` section: each searched parameter parsed and checked against the
training settings and the schedules' extremes."""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping

from sweep.errors import FieldError
from sweep.study.schedules import (
    SCHEDULER_PARAMS,
    SCHEDULERS,
    ScheduleConfig,
    check_schedule,
    resolve_params,
)
from sweep.study.sections import _KIND_NAMES, _TRAIN_RULES, _type_ok
from sweep.study.specs import (
    OPTIMIZER_OF,
    SEARCHABLE_TRAIN,
    SPACE_KEYS,
    CategoricalParam,
    Fixed,
    FloatParam,
    IntParam,
    Param,
    SearchSpace,
    TrainSpec,
)
from sweep.study.yaml_doc import _check_keys, _Ctx, _suggest

# --- search space -----------------------------------------------------------------------------

def _param(ctx: _Ctx, path: tuple, raw: Any, kind: str, total_steps: int | None = None) -> Param:
    """Parse one parameter: a plain value (fixed) or ``{type: int|float|categorical, ...}``."""
    if not isinstance(raw, dict):
        return Fixed(list(raw) if isinstance(raw, (list, tuple)) else raw)
    dist = raw.get("type")
    if dist == "categorical":
        _check_keys(ctx, path, raw, ("type", "choices"))
        choices = raw.get("choices")
        if not isinstance(choices, list) or not choices:
            raise ctx.fail(path + ("choices",), "must be a non-empty list")
        if len(choices) == 1:
            raise ctx.fail(path + ("choices",), f"has one choice ({choices[0]!r}): nothing to "
                           f"search; give the value itself, e.g. {path[-1]}: {choices[0]!r}")
        if len(set(map(repr, choices))) != len(choices):
            raise ctx.fail(path + ("choices",), f"has duplicate choices: {choices!r}")
        return CategoricalParam(tuple(choices))
    if dist not in ("int", "float"):
        raise ctx.fail(path + ("type",), f"must be one of int, float, categorical, got {dist!r}")
    valid = ("type", "low", "high", "step", "log") + (("high_fraction",) if dist == "int" else ())
    _check_keys(ctx, path, raw, valid)
    num = int if dist == "int" else float
    if "high_fraction" in raw:
        if "high" in raw:
            raise ctx.fail(path, "give high or high_fraction, not both")
        frac = raw["high_fraction"]
        if not _type_ok(frac, float) or not 0 < frac < 1:
            raise ctx.fail(path + ("high_fraction",), f"must be a number in (0, 1), got {frac!r}")
        raw = {**raw, "high": int(math.floor(frac * total_steps))}
    for key in ("low", "high"):
        if key not in raw:
            raise ctx.fail(path, f"missing {key!r} for a {dist} parameter")
        if not _type_ok(raw[key], num):
            raise ctx.fail(path + (key,), f"must be {_KIND_NAMES[num]}, got {raw[key]!r}")
    low, high, log = raw["low"], raw["high"], raw.get("log", False)
    if not isinstance(log, bool):
        raise ctx.fail(path + ("log",), f"must be true or false, got {log!r}")
    if low > high:
        raise ctx.fail(path, f"low ({low}) > high ({high})")
    if dist == "float" and low == high:
        raise ctx.fail(path, f"low ({low}) = high ({high}): nothing to search; give the value "
                             f"itself, e.g. {path[-1]}: {low}")
    if log and low <= 0:
        raise ctx.fail(path + ("low",), f"a log range needs low > 0, got {low}")
    step = raw.get("step", 1 if dist == "int" else None)
    if step is not None and (not _type_ok(step, num) or step <= 0):
        raise ctx.fail(path + ("step",), f"must be a positive {dist}, got {step!r}")
    if log and step not in (None, 1):
        raise ctx.fail(path + ("step",), "a log range cannot have a step")
    if dist == "int":
        return IntParam(low, high, step, log)
    return FloatParam(float(low), float(high), log, None if step is None else float(step))


def param_values(p: Param) -> list:
    """The extreme values a parameter can take (for range checks at load time)."""
    if isinstance(p, Fixed):
        return [p.value]
    if isinstance(p, CategoricalParam):
        return list(p.choices)
    return [p.low, p.high]


def _searched_train(ctx: _Ctx, section: Mapping, train: TrainSpec,
                    fixed_in_train: Mapping) -> dict[str, Param]:
    """The ``train:`` fields given in ``space:``: each in one place only, for the study's
    optimizer, and every value it can take valid as ``train:`` would check it."""
    searched = {}
    for key in SEARCHABLE_TRAIN:
        if key not in section:
            continue
        path = ("space", key)
        if key in fixed_in_train:
            raise ctx.fail(path, f"is both fixed in train: ({ctx.where(('train', key))}) and "
                                 f"searched in space:; give it in one place")
        if OPTIMIZER_OF.get(key, train.optimizer) != train.optimizer:
            raise ctx.fail(path, f"is a parameter of optimizer {OPTIMIZER_OF[key]!r}, but "
                                 f"train.optimizer is {train.optimizer!r}; remove it or change "
                                 f"the optimizer")
        kind, check = _TRAIN_RULES[key]
        raw = section[key]
        if isinstance(raw, dict) and kind in (bool, str) and raw.get("type") != "categorical":
            raise ctx.fail(path + ("type",), f"{key} takes {_KIND_NAMES[kind]}: search it with "
                           f"{{type: categorical, choices: [...]}} or give one value")
        if isinstance(raw, dict) and kind is float and raw.get("type") == "int":
            raise ctx.fail(path + ("type",), f"{key} is a number: use type float or categorical")
        param = _param(ctx, path, raw, "float" if kind is float else "categorical")
        for value in param_values(param):
            problem = (None if _type_ok(value, kind) else f"must be {_KIND_NAMES[kind]}, "
                       f"got {value!r}") or (check(value) if check else None)
            if problem:
                raise ctx.fail(path, problem)
        if isinstance(param, Fixed) and kind is float:
            param = Fixed(float(param.value))
        searched[key] = param
    return searched


def train_with(train: TrainSpec, values: Mapping[str, Any]) -> TrainSpec:
    """``train`` with the searched fields set to one trial's ``values`` (numbers as floats:
    a categorical of 0 and 0.1 draws the int 0)."""
    return dataclasses.replace(train, **{k: float(v) if _TRAIN_RULES[k][0] is float else v
                                         for k, v in values.items()})


def _space(ctx: _Ctx, raw: Any, train: TrainSpec, total_steps: int, steps_per_epoch: int,
           fixed_in_train: Mapping) -> SearchSpace:
    section = _check_keys(ctx, ("space",), raw, SPACE_KEYS + SEARCHABLE_TRAIN)
    for key in SPACE_KEYS:
        if key not in section:
            raise ctx.fail(("space",), f"missing {key!r}; the space needs {', '.join(SPACE_KEYS)}")
    warmup = _param(ctx, ("space", "warmup_steps"), section["warmup_steps"], "int", total_steps)
    base_lr = _param(ctx, ("space", "base_lr"), section["base_lr"], "float")
    for value in param_values(warmup):
        if not _type_ok(value, int) or not 0 <= value <= total_steps - 1:
            raise ctx.fail(("space", "warmup_steps"),
                           f"must lie in [0, {total_steps - 1}] (T-1 = {train.epochs} epochs x "
                           f"{steps_per_epoch} steps/epoch - 1), got {value!r}; shorten warmup or "
                           f"train longer")
    for value in param_values(base_lr):
        if not _type_ok(value, float) or value <= 0:
            raise ctx.fail(("space", "base_lr"), f"must be a number > 0, got {value!r}")
    searched = _searched_train(ctx, section, train, fixed_in_train)
    schedulers = section["scheduler"]
    if not isinstance(schedulers, dict) or not schedulers:
        raise ctx.fail(("space", "scheduler"), "must map each scheduler type to its parameters, "
                       f"e.g. {{cosine: {{}}, step: {{gamma: 0.1, step_size_epochs: 10}}}}; "
                       f"types: {', '.join(SCHEDULERS)}")
    parsed: dict[str, dict[str, Param]] = {}
    for name, params in schedulers.items():
        path = ("space", "scheduler", name)
        if name not in SCHEDULER_PARAMS:
            raise ctx.fail(path, f"unknown scheduler {name!r}{_suggest(name, SCHEDULERS)}; "
                                 f"choose from {', '.join(SCHEDULERS)}")
        params = params or {}
        if not isinstance(params, dict):
            raise ctx.fail(path, f"must map parameter names to values, got {params!r}")
        valid = SCHEDULER_PARAMS[name]
        for key in params:
            if key not in valid:
                raise ctx.fail(path + (key,), f"not a parameter of scheduler {name!r}"
                                              f"{_suggest(key, valid)}; its parameters: "
                                              f"{', '.join(valid) or 'none'}")
        parsed[name] = {k: _param(ctx, path + (k,), v, SCHEDULER_PARAMS[name][k].kind)
                        for k, v in params.items()}
        _check_scheduler_extremes(ctx, path, name, parsed[name], warmup, base_lr, train,
                                  steps_per_epoch, searched)
    return SearchSpace(warmup, base_lr, parsed, searched)


def _check_scheduler_extremes(ctx, path, name, params, warmup, base_lr, train, steps_per_epoch,
                              searched):
    """Check every combination of the parameters' extreme values against the schedule rules
    (the warmup's shape and start factor: the study's, or each extreme of their search)."""
    import itertools

    warmups_of = {k: param_values(searched[k]) if k in searched else [getattr(train, k)]
                  for k in ("warmup_shape", "warmup_start_factor")}
    keys = list(params)
    for combo in itertools.product(*(param_values(params[k]) for k in keys)):
        given = dict(zip(keys, combo))
        try:
            resolved = resolve_params(name, given, train.epochs)
        except FieldError as err:
            raise ctx.fail(path + err.key, err.problem) from None
        # onecycle brings its own ramp: a sampled warmup is not drawn for it (space.py), while
        # a fixed warmup > 0 is warmup given twice and is rejected by check_schedule.
        warmups = [0] if name == "onecycle" and not isinstance(warmup, Fixed) else param_values(warmup)
        for w in warmups:
            for lr, shape, factor in itertools.product(param_values(base_lr),
                                                       *warmups_of.values()):
                cfg = ScheduleConfig(name, w, shape, float(factor), resolved)
                try:
                    check_schedule(cfg, steps_per_epoch, train.epochs, lr)
                except FieldError as err:
                    key = err.key[-1]
                    where = (("space", key) if key == "warmup_steps" or key in searched else
                             ("train", key) if key == "warmup_start_factor" else path + err.key)
                    raise ctx.fail(where, err.problem) from None


