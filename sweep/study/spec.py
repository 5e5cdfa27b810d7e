"""Study files: YAML data, validated once at the edge into frozen typed specs.

The core never sees raw dicts. Every problem raises ``StudyFileError`` with one line:
``FILE: KEY.PATH (line N): problem; allowed values``. Nothing is created before a
study file has passed validation in full.
"""

from __future__ import annotations

import copy
import importlib.resources
import re
from pathlib import Path
from typing import Any, Mapping

import yaml

from sweep.errors import OverrideError, StudyFileError
from sweep.study.model_ref import is_import_path
from sweep.study.sections import (
    _DATA_RULES,
    _DIVERGENCE_RULES,
    _OBJECTIVE_RULES,
    _SAMPLER_RULES,
    _TRAIN_RULES,
    OVERRIDABLE,
    TOP_KEYS,
    _check_pruner_groups,
    _pruner,
    _section,
    _type_ok,
)
from sweep.study.space_rules import _space
from sweep.study.specs import (
    OPTIMIZER_OF,
    DataSpec,
    DivergenceSpec,
    ObjectiveSpec,
    SamplerSpec,
    StudySpec,
    TrainSpec,
)
from sweep.study.yaml_doc import _check_keys, _Ctx, _LineDict, _Loader, _suggest


def _studies_dir() -> Path:
    """The shipped study files: ``studies/`` at the top of a source checkout (the one copy under
    version control), else the copy a wheel installs as package data ``sweep/studies/``."""
    checkout = Path(__file__).resolve().parents[2]
    if (checkout / "pyproject.toml").is_file() and (checkout / "studies").is_dir():
        return checkout / "studies"
    return Path(str(importlib.resources.files("sweep") / "studies"))


STUDIES_DIR = _studies_dir()

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
                flags.append(override_flag(f"{section}.{key}", value))
    return flags


def override_flag(key: str, value: Any) -> str:
    """The ``--set`` item that gives ``key`` the value ``value`` (``("train.epochs", 3)`` ->
    ``train.epochs=3``): written as YAML, so ``parse_overrides`` reads back the same value and
    type (the string ``"3"`` stays a string, None is null)."""
    text = yaml.safe_dump(value, default_flow_style=True).strip()
    return f"{key}={text.removesuffix(chr(10) + '...').strip()}"


def parse_overrides(pairs: list[str] | tuple[str, ...]) -> list[tuple[tuple[str, ...], Any]]:
    """``["train.epochs=3"]`` -> ``[(("train", "epochs"), 3)]``; values are parsed as YAML."""
    parsed = []
    for pair in pairs:
        key, sep, text = pair.partition("=")
        if not sep or not key:
            raise OverrideError(f"--set {pair!r}: expected KEY=VALUE, e.g. --set train.epochs=3")
        path = tuple(key.strip().split("."))
        if path in (("seed",), ("trials",), ("name",)):
            pass
        elif len(path) != 2 or path[0] not in OVERRIDABLE and path[0] != "pruner":
            valid = ["name", "seed", "trials"] + [f"{s}.{k}" for s, r in OVERRIDABLE.items() for k in r]
            raise OverrideError(f"--set {key}: unknown key{_suggest(key, valid)}; overridable keys "
                                f"are name, seed, trials, pruner.*, " + ", ".join(f"{s}.*" for s in OVERRIDABLE))
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
