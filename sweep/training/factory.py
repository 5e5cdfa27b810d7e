"""A model factory named by import path (``train.model: mypackage.nets:build_net``).

The module is imported as Python imports it, from ``sys.path`` (``PYTHONPATH``), with the
current folder put in front as ``python -m``, uvicorn and gunicorn do, so that ``sweep launch``
run from a project's root finds the project's modules. Every failure is a ``ModelError``
whose one line names the problem and the fix.
"""

from __future__ import annotations

import importlib
import os
import sys
from typing import Any, Callable, Mapping

from torch import nn

from sweep.base.text import first_line
from sweep.errors import ModelError


def _on_path() -> None:
    """The current folder first on ``sys.path`` (once), as ``python -m`` puts it."""
    here = os.getcwd()
    if "" not in sys.path and here not in sys.path:
        sys.path.insert(0, here)


def load_factory(path: str) -> Callable[..., Any]:
    """The callable ``MODULE:NAME`` names (``NAME`` may be dotted: ``Class.method``)."""
    module_name, _, attr = path.partition(":")
    _on_path()
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as err:
        if err.name and module_name.startswith(err.name):
            raise ModelError(f"train.model {path}: no module {err.name!r} on the Python path; "
                             f"run sweep from the folder that holds it or add that folder to "
                             f"PYTHONPATH") from None
        raise ModelError(f"train.model {path}: importing {module_name} failed: "
                         f"{first_line(err)}; install the package it needs") from None
    except Exception as err:  # the user's module raised while importing: say which and why
        raise ModelError(f"train.model {path}: importing {module_name} failed: "
                         f"{first_line(err, typed=True)}; fix that module") from None
    target: Any = module
    for part in attr.split("."):
        if not hasattr(target, part):
            raise ModelError(f"train.model {path}: {module_name} has no attribute "
                             f"{attr!r}; name the function that builds your network")
        target = getattr(target, part)
    if not callable(target):
        raise ModelError(f"train.model {path}: {attr} is not callable (it is of type "
                         f"{type(target).__name__}); name the function or class that returns "
                         f"your nn.Module")
    return target


def build_custom(path: str, args: Mapping[str, Any], num_classes: int) -> nn.Module:
    """``factory(**args, num_classes=num_classes)``, which must return an ``nn.Module``."""
    factory = load_factory(path)
    try:
        model = factory(**dict(args), num_classes=num_classes)
    except Exception as err:
        hint = ("make its keyword arguments match train.model_args and accept num_classes"
                if isinstance(err, TypeError) else "fix the factory or train.model_args")
        raise ModelError(f"train.model {path}: calling it with {_call_text(args, num_classes)} "
                         f"failed: {first_line(err, typed=True)}; {hint}") from None
    if not isinstance(model, nn.Module):
        raise ModelError(f"train.model {path}: returned a {type(model).__name__}, not a "
                         f"torch.nn.Module; return the network itself")
    return model


def _call_text(args: Mapping[str, Any], num_classes: int) -> str:
    return ", ".join([f"{k}={v!r}" for k, v in args.items()] + [f"num_classes={num_classes}"])
