"""A package's public names imported from their modules at first use (PEP 562), so importing the
package stays light: no torch, optuna or mlflow until a name that needs them is used."""

from __future__ import annotations

import importlib
from typing import Callable, Mapping


def lazy_names(package: str, names: Mapping[str, str]) -> tuple[Callable, Callable]:
    """The ``__getattr__`` and ``__dir__`` of ``package`` whose public ``names`` map each name to
    the module it lives in. A name is imported once, then kept in the package's namespace."""
    space = importlib.import_module(package).__dict__

    def __getattr__(name: str):
        if name not in names:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(names[name]), name)
        space[name] = value  # the next lookup finds it without this hook
        return value

    def __dir__() -> list[str]:
        return sorted({*space, *names})

    return __getattr__, __dir__
