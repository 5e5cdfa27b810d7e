"""Study files: YAML data, validated once at the edge into frozen typed specs.

The core never sees raw dicts. Every problem raises ``StudyFileError`` with one line:
``FILE: KEY.PATH (line N): problem; allowed values``. Nothing is created before a
study file has passed validation in full.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import re
import importlib.resources
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import yaml

from sweep.errors import FieldError, OverrideError, StudyFileError
from sweep.study.model_ref import DATASETS, MODELS, NUM_CLASSES, is_import_path
from sweep.study.model_ref import model_args_problem, model_problem
from sweep.study.pruner_rules import PRUNER_PARAMS, pruner_problem
from sweep.study.schedules import SCHEDULER_PARAMS, SCHEDULERS, WARMUP_SHAPES, ScheduleConfig
from sweep.study.schedules import check_schedule, resolve_params


def _studies_dir() -> Path:
    """The shipped study files: ``studies/`` at the top of a source checkout (the one copy under
    version control), else the copy a wheel installs as package data ``sweep/studies/``."""
    checkout = Path(__file__).resolve().parents[2]
    if (checkout / "pyproject.toml").is_file() and (checkout / "studies").is_dir():
        return checkout / "studies"
    return Path(str(importlib.resources.files("sweep") / "studies"))


STUDIES_DIR = _studies_dir()

OPTIMIZERS = ("sgd", "adamw")
SAMPLERS = ("tpe", "random")
PRUNERS = tuple(PRUNER_PARAMS)  # none, median, percentile, successive_halving, ...
METRICS = ("val_acc", "val_loss")  # what the trainer produces each epoch
DIRECTIONS = ("maximize", "minimize")
SPACE_KEYS = ("warmup_steps", "base_lr", "scheduler")  # every space has these
#: ``train:`` fields that may be searched in ``space:`` instead (per trial; per slot in a pack)
SEARCHABLE_TRAIN = ("weight_decay", "momentum", "nesterov", "warmup_shape", "warmup_start_factor",
                    "label_smoothing", "beta1", "beta2")
#: the optimizer each optimizer-specific field belongs to (elsewhere it would be silently unused)
OPTIMIZER_OF = {"momentum": "sgd", "nesterov": "sgd", "beta1": "adamw", "beta2": "adamw"}


# --- typed specs ------------------------------------------------------------------------------

@dataclass(frozen=True)
class IntParam:
    low: int
    high: int
    step: int = 1
    log: bool = False


@dataclass(frozen=True)
class FloatParam:
    low: float
    high: float
    log: bool = False
    step: float | None = None


@dataclass(frozen=True)
class CategoricalParam:
    choices: tuple


@dataclass(frozen=True)
class Fixed:
    value: Any


Param = IntParam | FloatParam | CategoricalParam | Fixed


@dataclass(frozen=True)
class SearchSpace:
    """``scheduler`` maps each scheduler type to its conditional parameters."""

    warmup_steps: Param
    base_lr: Param
    scheduler: Mapping[str, Mapping[str, Param]]
    #: the ``train:`` fields given in ``space:`` (``SEARCHABLE_TRAIN``), by name
    train: Mapping[str, Param] = field(default_factory=dict)


@dataclass(frozen=True)
class DataSpec:
    train_size: int = 45_000
    val_size: int = 5_000
    test_size: int | None = None  # None: the whole test batch
    split_seed: int = 0
    dataset: str = "cifar10"  # or cifar100 (fine labels)

    @property
    def num_classes(self) -> int:
        """The classes of ``dataset``: the model's output width."""
        return NUM_CLASSES[self.dataset]


@dataclass(frozen=True)
class TrainSpec:
    model: str = "resnet20"  # a built-in name or an import path MODULE:FACTORY (model_ref.py)
    width: int = 1
    #: keyword arguments of a factory named by import path (with ``num_classes``)
    model_args: Mapping[str, Any] = field(default_factory=dict)
    epochs: int = 30
    batch_size: int = 128
    optimizer: str = "sgd"
    momentum: float = 0.9  # sgd only
    nesterov: bool = True  # sgd only
    beta1: float = 0.9  # adamw only (torch.optim.AdamW's defaults)
    beta2: float = 0.999
    weight_decay: float = 5e-4
    label_smoothing: float = 0.0
    warmup_shape: str = "linear"
    warmup_start_factor: float = 0.01
    eval_batch_size: int = 1000
    sync_every_steps: int = 10  # host reads the per-step losses this often (divergence latency)
    compile: bool | str = "auto"  # torch.compile: true, false, or auto (CUDA only; pack.py)
    bf16: bool = True  # autocast on CUDA only
    channels_last: bool = True  # the layout models and batches train in (models.memory_format)
    fuse: int | str = 1  # trials trained together as one grouped network; "auto": see pack.py


@dataclass(frozen=True)
class DivergenceSpec:
    enabled: bool = True
    loss_factor: float = 4.0  # loss above factor x early reference ...
    patience_steps: int = 20  # ... for this many consecutive steps means diverged
    reference_steps: int = 10  # the reference is the lowest loss of the first steps
    # Loss above ceiling_factor x min(lowest loss so far, chance level ln C) is divergence at
    # once. 100: resnet8 runs on the shared subset peaked at 2.4x (4.8x if left at chance), a
    # 2-epoch resnet20 at LR 2 at 8.4x (docs/pruning.md).
    ceiling_factor: float = 100.0
    # Validation loss above val_loss_factor x ln C after an epoch is divergence. 10,000: early
    # val_loss reached 39x ln C in a healthy run and 260x in a 2-epoch resnet20 at LR 2 with
    # warmup (BatchNorm statistics still settling); an explosion gives ~1e7x.
    val_loss_factor: float = 10000.0


@dataclass(frozen=True)
class ObjectiveSpec:
    metric: str = "val_acc"
    direction: str = "maximize"


@dataclass(frozen=True)
class SamplerSpec:
    type: str = "tpe"
    n_startup_trials: int = 10
    multivariate: bool = True


@dataclass(frozen=True)
class PrunerSpec:
    type: str = "median"
    params: Mapping[str, Any] = field(default_factory=dict)
    wrapped: "PrunerSpec | None" = None  # for type 'patient'
    per: str | None = None  # prune within groups of this categorical parameter (pruning.py)


@dataclass(frozen=True)
class StudySpec:
    name: str
    description: str
    path: Path
    seed: int
    trials: int
    objective: ObjectiveSpec
    sampler: SamplerSpec
    pruner: PrunerSpec
    divergence: DivergenceSpec
    data: DataSpec
    train: TrainSpec
    space: SearchSpace
    raw: Mapping[str, Any]  # the validated document, for logging the study file as data

    @property
    def steps_per_epoch(self) -> int:
        return self.data.train_size // self.train.batch_size

    @property
    def total_steps(self) -> int:
        return self.steps_per_epoch * self.train.epochs


# --- YAML with line numbers -------------------------------------------------------------------

class _LineDict(dict):
    """A dict that remembers the line of each key, so errors can point into the file."""

    lines: dict


class _Loader(yaml.SafeLoader):
    pass


def _construct_mapping(loader: _Loader, node: yaml.MappingNode) -> _LineDict:
    loader.flatten_mapping(node)
    result = _LineDict()
    result.lines = {}
    for key_node, value_node in node.value:
        key = loader.construct_object(key_node, deep=True)
        if key in result:
            raise StudyFileError(f"line {key_node.start_mark.line + 1}: duplicate key {key!r}")
        result[key] = loader.construct_object(value_node, deep=True)
        result.lines[key] = key_node.start_mark.line + 1
    return result


_Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


class _Ctx:
    """Builds one-line errors: ``file: key.path (line N): problem``."""

    def __init__(self, source: str, doc: Mapping, overridden: set[tuple] = frozenset()):
        self.source, self.doc, self.overridden = source, doc, overridden

    def fail(self, path: tuple, problem: str) -> StudyFileError:
        return StudyFileError(f"{self.source}: {self.where(path)}: {problem}")

    def where(self, path: tuple) -> str:
        """``key.path (line N)``, or ``(--set)`` for a value from the command line."""
        where = ".".join(map(_key_text, path)) or "(top level)"
        if tuple(path) in self.overridden:
            return f"{where} (--set)"  # the value came from the command line, not the file
        line = self._line(path)
        return f"{where} (line {line})" if line else where

    def _line(self, path: tuple) -> int | None:
        node, line = self.doc, None
        for key in path:
            if isinstance(node, dict) and key in node:
                line = getattr(node, "lines", {}).get(key, line)
                node = node[key]
            else:
                break
        return line


def _key_text(key) -> str:
    """A key as it appears in an error: plain when it is a plain word, else quoted (a key of
    whitespace or control characters must not break the one-line message)."""
    text = str(key)
    return text if text and text.isprintable() and text.strip() == text else repr(key)


def _suggest(key: str, valid) -> str:
    close = difflib.get_close_matches(str(key), list(valid), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _check_keys(ctx: _Ctx, path: tuple, section: Any, valid) -> Mapping:
    if section is None:
        return {}
    if not isinstance(section, dict):
        raise ctx.fail(path, f"must be a mapping, got {type(section).__name__}")
    for key in section:
        if key not in valid:
            raise ctx.fail(path + (key,), f"unknown key{_suggest(key, valid)}; valid keys: "
                                          f"{', '.join(valid)}")
    return section


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


# --- entry points -----------------------------------------------------------------------------

def available_studies() -> list[str]:
    return sorted(p.stem for p in STUDIES_DIR.glob("*.yaml"))


def find_study(name_or_path: str) -> Path:
    """A name in ``studies/`` (without .yaml) or a path to a YAML file."""
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml") and path.is_file():
        return path
    candidate = STUDIES_DIR / f"{name_or_path}.yaml"
    if candidate.is_file():
        return candidate
    raise StudyFileError(f"unknown study {name_or_path!r}: no file {candidate} and no YAML file at "
                         f"that path; available studies: {', '.join(available_studies()) or 'none'}")


_EXPONENT_NUMBER = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")

# The sections that decide what a trial trains and how it is judged: a confirmation must
# replicate the search with the same ones. ``train.fuse`` is left out: a fused trial is the same
# computation as an unfused one (docs/packs.md).
TRIAL_SETTINGS = ("objective", "divergence", "data", "train")
NOT_A_SETTING = {("train", "fuse")}


def trial_settings(spec: StudySpec) -> dict:
    """{section: {key: value}} of the validated document for ``TRIAL_SETTINGS``."""
    return {section: {k: v for k, v in dict(spec.raw.get(section) or {}).items()
                      if (section, k) not in NOT_A_SETTING}
            for section in TRIAL_SETTINGS}


def settings_overrides(spec: StudySpec, settings: Mapping[str, Mapping[str, Any]]) -> list[str]:
    """The ``--set`` flags that turn ``spec``'s trial settings into ``settings``."""
    mine = trial_settings(spec)
    flags = []
    for section, values in settings.items():
        for key, value in values.items():
            if mine.get(section, {}).get(key) != value:
                text = yaml.safe_dump(value, default_flow_style=True).strip()
                flags.append(f"{section}.{key}={text.removesuffix(chr(10) + '...').strip()}")
    return flags


def parse_overrides(pairs: list[str] | tuple[str, ...]) -> list[tuple[tuple[str, ...], Any]]:
    """``["train.epochs=3"]`` -> ``[(("train", "epochs"), 3)]``; values are parsed as YAML."""
    parsed = []
    for pair in pairs:
        key, sep, text = pair.partition("=")
        if not sep or not key:
            raise OverrideError(f"--set {pair!r}: expected KEY=VALUE, e.g. --set train.epochs=3")
        path = tuple(key.strip().split("."))
        if path in (("seed",), ("trials",)):
            pass
        elif len(path) != 2 or path[0] not in OVERRIDABLE and path[0] != "pruner":
            valid = ["seed", "trials"] + [f"{s}.{k}" for s, r in OVERRIDABLE.items() for k in r]
            raise OverrideError(f"--set {key}: unknown key{_suggest(key, valid)}; overridable keys "
                                f"are seed, trials, pruner.*, " + ", ".join(f"{s}.*" for s in OVERRIDABLE))
        elif path[0] in OVERRIDABLE and path[1] not in OVERRIDABLE[path[0]]:
            valid = list(OVERRIDABLE[path[0]])
            raise OverrideError(f"--set {key}: unknown key{_suggest(path[1], valid)}; valid keys "
                                f"of {path[0]}: {', '.join(valid)}")
        try:
            value = yaml.safe_load(text)
        except yaml.YAMLError:
            value = text
        if isinstance(value, str) and _EXPONENT_NUMBER.fullmatch(text.strip()):
            value = float(text)  # YAML 1.1 reads 1e12 (no dot) as a string; a user means a number
        parsed.append((path, value))
    return parsed


def load_study(name_or_path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> StudySpec:
    """Read, override and validate a study file. Raises StudyFileError/OverrideError."""
    path = find_study(str(name_or_path))
    try:
        text = path.read_text()
    except OSError as err:
        raise StudyFileError(f"{path}: cannot read ({err.strerror})") from None
    return parse_study(text, str(path), path, overrides)


def parse_study(text: str, source: str, path: Path,
                overrides: list[str] | tuple[str, ...] = ()) -> StudySpec:
    try:
        doc = yaml.load(text, Loader=_Loader)
    except StudyFileError as err:
        raise StudyFileError(f"{source}: {err}") from None
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        line = f" (line {mark.line + 1})" if mark else ""
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise StudyFileError(f"{source}{line}: not valid YAML: {problem}") from None
    if not isinstance(doc, dict):
        raise StudyFileError(f"{source}: a study file must be a YAML mapping with keys "
                             f"{', '.join(TOP_KEYS)}")
    overrides = parse_overrides(overrides)
    for key_path, value in overrides:
        node = doc
        for key in key_path[:-1]:
            if not isinstance(node.get(key), dict):
                node[key] = _LineDict()
                node[key].lines = {}
            node = node[key]
        node[key_path[-1]] = value
    return _validate(_Ctx(source, doc, {p for p, _ in overrides}), doc, path)


def _divergence(ctx: _Ctx, doc: Mapping) -> DivergenceSpec:
    spec = _section(ctx, doc, "divergence", DivergenceSpec, _DIVERGENCE_RULES)
    if spec.ceiling_factor <= spec.loss_factor:  # else the ceiling pre-empts the patience rule
        raise ctx.fail(("divergence", "ceiling_factor"),
                       f"must be above loss_factor ({spec.loss_factor:g}), got "
                       f"{spec.ceiling_factor:g}; raise it or lower loss_factor")
    return spec


def _check_custom_model(ctx: _Ctx, train: TrainSpec, fixed_in_train: Mapping) -> None:
    """``model_args`` only with a model by import path; such a model takes no ``width`` (its
    own arguments say its size) and trains one trial at a time (packs fuse only the built-in
    families, whose layers the fused network knows: docs/your-model.md)."""
    if not is_import_path(train.model):
        if "model_args" in fixed_in_train:
            raise ctx.fail(("train", "model_args"), f"only a model given by import path "
                           f"(MODULE:FACTORY) takes model_args; {train.model} does not; remove it")
        return
    if train.width != 1:
        raise ctx.fail(("train", "width"), f"width applies to the built-in ResNets only; pass "
                       f"your model's size in train.model_args instead (got width {train.width})")
    if isinstance(train.fuse, int) and train.fuse > 1:
        raise ctx.fail(("train", "fuse"), f"a model given by import path trains one trial at a "
                       f"time; packs fuse only the built-in ResNets; use fuse: 1 or auto, got "
                       f"{train.fuse}")


def _validate(ctx: _Ctx, doc: Mapping, path: Path) -> StudySpec:
    _check_keys(ctx, (), doc, TOP_KEYS)
    name = doc.get("name", path.stem)
    if not isinstance(name, str) or not name.strip():
        raise ctx.fail(("name",), f"must be a non-empty string, got {name!r}")
    description = doc.get("description", "")
    if not isinstance(description, str):
        raise ctx.fail(("description",), "must be a string")
    for key, low in (("seed", 0), ("trials", 1)):
        value = doc.get(key, 0 if key == "seed" else None)
        if not _type_ok(value, int) or value < low:
            raise ctx.fail((key,), f"must be an integer >= {low}, got {value!r}")
    train = _section(ctx, doc, "train", TrainSpec, _TRAIN_RULES)
    fixed_in_train = doc.get("train") or {}
    for key in ("beta1", "beta2"):  # (momentum and nesterov with adamw loaded before: kept)
        if key in fixed_in_train and train.optimizer != "adamw":
            raise ctx.fail(("train", key), f"is a parameter of optimizer {OPTIMIZER_OF[key]!r}, "
                           f"but train.optimizer is {train.optimizer!r}; remove it or change "
                           f"the optimizer")
    data = _section(ctx, doc, "data", DataSpec, _DATA_RULES)
    if train.model == "resnet18" and train.width != 1:
        raise ctx.fail(("train", "width"), "resnet18 has a fixed width; width must be 1")
    _check_custom_model(ctx, train, fixed_in_train)
    if train.batch_size > data.train_size:
        raise ctx.fail(("train", "batch_size"), f"batch size {train.batch_size} is larger than the "
                       f"training split (data.train_size = {data.train_size})")
    steps_per_epoch = data.train_size // train.batch_size
    total_steps = steps_per_epoch * train.epochs
    pruner = _pruner(ctx, doc.get("pruner"), ("pruner",))
    space = _space(ctx, doc.get("space"), train, total_steps, steps_per_epoch, fixed_in_train)
    _check_pruner_groups(ctx, pruner, space)
    return StudySpec(
        name=name, description=description.strip(), path=path, seed=doc.get("seed", 0),
        trials=doc["trials"],
        objective=_section(ctx, doc, "objective", ObjectiveSpec, _OBJECTIVE_RULES),
        sampler=_section(ctx, doc, "sampler", SamplerSpec, _SAMPLER_RULES),
        pruner=pruner,
        divergence=_divergence(ctx, doc),
        data=data, train=train,
        space=space,
        raw=copy.deepcopy(dict(doc)),
    )
