"""What ``train.model``, ``train.model_args`` and ``data.dataset`` may say, as plain data.

A model is a built-in name (``resnet{6n+2}``, ``resnet18``) or an import path
``package.module:factory`` naming a function (or class) on the Python path that sweep calls
with the keyword arguments of ``train.model_args`` and ``num_classes``. Only the text is
checked here; importing and calling the factory is the training layer's
(``sweep.training.models.check_model``), done before any store is written.
"""

from __future__ import annotations

import re
from typing import Any

MODELS = ("resnet8", "resnet14", "resnet20", "resnet32", "resnet44", "resnet56", "resnet110",
          "resnet18")
#: data sets and their class counts: a model's ``num_classes`` follows the data set
NUM_CLASSES = {"cifar10": 10, "cifar100": 100}
DATASETS = tuple(NUM_CLASSES)

_IDENTIFIER = r"[A-Za-z_][A-Za-z0-9_]*"
IMPORT_PATH = re.compile(rf"{_IDENTIFIER}(\.{_IDENTIFIER})*:{_IDENTIFIER}(\.{_IDENTIFIER})*")


def is_import_path(model: str) -> bool:
    """Whether ``model`` names a factory by import path (``mypackage.nets:build_net``)."""
    return IMPORT_PATH.fullmatch(model) is not None


def model_problem(model: str) -> str | None:
    """None for a built-in name or a well-formed import path, else the one-line problem."""
    if model in MODELS or is_import_path(model):
        return None
    return (f"must be one of {', '.join(MODELS)} or an import path MODULE:FACTORY such as "
            f"mypackage.nets:build_net, got {model!r}")


def _plain(value: Any) -> bool:
    """YAML scalars, lists and string-keyed mappings of them: what a study file can say and
    MLflow/Optuna can record as JSON."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return True
    if isinstance(value, (list, tuple)):
        return all(_plain(v) for v in value)
    if isinstance(value, dict):
        return all(isinstance(k, str) and _plain(v) for k, v in value.items())
    return False


def model_args_problem(args: dict) -> str | None:
    """None when ``args`` can be passed to a factory as keyword arguments, else why not."""
    for key, value in args.items():
        if not isinstance(key, str) or not re.fullmatch(_IDENTIFIER, key):
            return f"keys must be Python identifiers (keyword arguments), got {key!r}"
        if key == "num_classes":
            return ("must not set num_classes: sweep passes it from data.dataset "
                    "(cifar10: 10, cifar100: 100); remove it")
        if not _plain(value):
            return f"{key}: must be a number, string, boolean, list or mapping, got {value!r}"
    return None
