"""The fixed sections of a study file (train, data, divergence, objective, sampler,
pruner): each key's type and rule."""

from __future__ import annotations

import copy
import math
from typing import Any, Mapping

from sweep.study.model_ref import DATASETS, model_args_problem, model_problem
from sweep.study.pruner_rules import PRUNER_PARAMS, pruner_problem
from sweep.study.schedules import WARMUP_SHAPES
from sweep.study.specs import (
    DIRECTIONS,
    METRICS,
    OPTIMIZERS,
    PRUNERS,
    SAMPLERS,
    CategoricalParam,
    PrunerSpec,
    SearchSpace,
)
from sweep.study.yaml_doc import _check_keys, _Ctx, _suggest

# --- fixed sections ---------------------------------------------------------------------------

def _type_ok(value: Any, kind) -> bool:
    if kind is bool:
        return isinstance(value, bool)
    if kind is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if kind is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if kind is str:
        return isinstance(value, str)
    if kind == INT_OR_AUTO:
        return value == "auto" or _type_ok(value, int)
    if kind == BOOL_OR_AUTO:
        return value == "auto" or isinstance(value, bool)
    if kind is dict:
        return isinstance(value, Mapping)
    return False


INT_OR_AUTO = "int|auto"  # a count, or "auto" for a value the worker measures (train.fuse)
BOOL_OR_AUTO = "bool|auto"  # on, off, or "auto": decided by the device (train.compile)
_KIND_NAMES = {bool: "true or false", int: "an integer", float: "a number", str: "a string",
               INT_OR_AUTO: "an integer or auto", BOOL_OR_AUTO: "true, false or auto",
               dict: "a mapping (key: value lines under it)"}


def _section(ctx: _Ctx, doc: Mapping, name: str, cls, rules: Mapping[str, tuple]) -> Any:
    """Validate ``doc[name]`` against ``rules``: key -> (kind, check(value)->problem|None).

    Missing keys take the dataclass defaults.
    """
    section = _check_keys(ctx, (name,), doc.get(name), rules)
    values = {}
    for key, value in section.items():
        kind, check = rules[key]
        optional = value is None and cls.__dataclass_fields__[key].default is None
        if not optional:
            if not _type_ok(value, kind):
                raise ctx.fail((name, key), f"must be {_KIND_NAMES[kind]}, got {value!r}")
            problem = check(value) if check else None
            if problem:
                raise ctx.fail((name, key), problem)
        values[key] = float(value) if kind is float and value is not None else value
        if kind is dict:
            values[key] = copy.deepcopy(dict(value))  # plain dicts, not the loader's line dicts
    return cls(**values)


def _one_of(choices):
    return lambda v: None if v in choices else f"must be one of {', '.join(choices)}, got {v!r}"


def _at_least(low):
    return lambda v: None if v >= low else f"must be >= {low}, got {v!r}"


def _in_range(low, high, low_open=False, high_open=False):
    def check(v):
        ok = (v > low if low_open else v >= low) and (v < high if high_open else v <= high)
        return None if ok else (f"must be in {'(' if low_open else '['}{low}, {high}"
                                f"{')' if high_open else ']'}, got {v!r}")
    return check


_TRAIN_RULES = {
    "model": (str, model_problem), "model_args": (dict, lambda v: model_args_problem(dict(v))),
    "width": (int, _at_least(1)), "epochs": (int, _at_least(1)),
    "batch_size": (int, _at_least(1)), "optimizer": (str, _one_of(OPTIMIZERS)),
    # momentum 1 never forgets a gradient (steps grow without bound); the same for AdamW's betas
    "momentum": (float, _in_range(0, 1, high_open=True)), "nesterov": (bool, None),
    "beta1": (float, _in_range(0, 1, high_open=True)),
    "beta2": (float, _in_range(0, 1, high_open=True)),
    "weight_decay": (float, _at_least(0)), "label_smoothing": (float, _in_range(0, 1)),
    "warmup_shape": (str, _one_of(WARMUP_SHAPES)),
    "warmup_start_factor": (float, _in_range(0, 1)),  # exponential shape: > 0, see check_schedule
    "eval_batch_size": (int, _at_least(1)), "sync_every_steps": (int, _at_least(1)),
    "compile": (BOOL_OR_AUTO, None), "bf16": (bool, None), "channels_last": (bool, None),
    "fuse": (INT_OR_AUTO, lambda v: None if v == "auto" or v >= 1 else f"must be >= 1 or auto, got {v!r}"),
}
_DATA_RULES = {"train_size": (int, _at_least(1)), "val_size": (int, _at_least(1)),
               "test_size": (int, _at_least(1)), "split_seed": (int, _at_least(0)),
               "dataset": (str, _one_of(DATASETS))}
_DIVERGENCE_RULES = {"enabled": (bool, None), "loss_factor": (float, _in_range(1, 1e12, True)),
                     "patience_steps": (int, _at_least(1)), "reference_steps": (int, _at_least(1)),
                     "ceiling_factor": (float, _in_range(1, 1e12, True)),
                     "val_loss_factor": (float, _in_range(1, 1e12, True))}
_OBJECTIVE_RULES = {"metric": (str, _one_of(METRICS)), "direction": (str, _one_of(DIRECTIONS))}
_SAMPLER_RULES = {"type": (str, _one_of(SAMPLERS)), "n_startup_trials": (int, _at_least(0)),
                  "multivariate": (bool, None)}
TOP_KEYS = ("name", "description", "seed", "trials", "objective", "sampler", "pruner",
            "divergence", "data", "train", "space")
#: sections whose fields ``--set`` may override (everything but the search space)
OVERRIDABLE = {"train": _TRAIN_RULES, "data": _DATA_RULES, "divergence": _DIVERGENCE_RULES,
               "objective": _OBJECTIVE_RULES, "sampler": _SAMPLER_RULES}


def _pruner(ctx: _Ctx, raw: Any, path: tuple) -> PrunerSpec:
    if raw is None:
        return PrunerSpec()
    if isinstance(raw, str):
        raw = {"type": raw}
    section = _check_keys(ctx, path, raw, ("type", *sorted({k for r in PRUNER_PARAMS.values()
                                                              for k in r}), "wrapped", "per"))
    kind = section.get("type", "median")
    if kind not in PRUNERS:
        raise ctx.fail(path + ("type",), f"unknown pruner {kind!r}{_suggest(kind, PRUNERS)}; "
                                         f"choose one of {', '.join(PRUNERS)}")
    params = {}
    for key, value in section.items():
        if key in ("type", "wrapped", "per"):
            continue
        rules = PRUNER_PARAMS[kind]
        if key not in rules:
            raise ctx.fail(path + (key,), f"not a parameter of pruner {kind!r} (its parameters: "
                                          f"{', '.join(rules) or 'none'})")
        kind_, check = rules[key]
        if not _type_ok(value, kind_) or (check and check(value)):
            raise ctx.fail(path + (key,), check(value) if _type_ok(value, kind_) and check
                           else f"must be {_KIND_NAMES[kind_]}, got {value!r}")
        params[key] = value
    problem = pruner_problem(kind, params)
    if problem:
        raise ctx.fail(path + (problem[0],), problem[1])
    wrapped = None
    if kind == "patient":
        if "wrapped" not in section:
            raise ctx.fail(path, "pruner 'patient' needs 'wrapped:' (the pruner it wraps)")
        wrapped = _pruner(ctx, section["wrapped"], path + ("wrapped",))
    elif "wrapped" in section:
        raise ctx.fail(path + ("wrapped",), "only pruner 'patient' wraps another pruner")
    per = section.get("per")
    if per is not None and (not isinstance(per, str) or len(path) > 1):
        raise ctx.fail(path + ("per",), "must be the name of a categorical parameter of the space, "
                       f"e.g. per: scheduler, given once on the outer pruner; got {per!r}")
    return PrunerSpec(kind, params, wrapped, per)


def _check_pruner_groups(ctx: _Ctx, pruner: PrunerSpec, space: SearchSpace) -> None:
    """``pruner.per`` names a categorical parameter every trial draws (the groups pruning
    stays within); hyperband builds its own bracket studies, which would ignore the groups."""
    if pruner.per is None:
        return
    choices = categorical_params(space)
    if pruner.per not in choices:
        raise ctx.fail(("pruner", "per"), f"{pruner.per!r} is not a categorical parameter of the "
                       f"space{_suggest(pruner.per, choices)}; categorical parameters: "
                       f"{', '.join(choices) or 'none (a study with one scheduler type has no groups)'}")
    inner = pruner
    while inner is not None:
        if inner.type in ("hyperband", "none"):
            raise ctx.fail(("pruner", "per"), f"pruner {inner.type!r} cannot prune per group; "
                           f"use median, percentile, successive_halving or threshold")
        inner = inner.wrapped


def categorical_params(space: SearchSpace) -> list[str]:
    """Names of the space's categorical parameters drawn by every trial."""
    names = ["scheduler"] if len(space.scheduler) > 1 else []
    drawn = (("warmup_steps", space.warmup_steps), ("base_lr", space.base_lr),
             *space.train.items())
    names += [n for n, p in drawn if isinstance(p, CategoricalParam)]
    return names


