"""sweep: hyperparameter sweeps over learning-rate schedules (Optuna + MLflow + PyTorch).

From Python: ``sweep.launch(...)``, ``sweep.plan(...)`` and ``sweep.load(...)`` (``sweep.api``,
docs/python.md); the errors they raise are in ``sweep.errors``. ``import sweep`` stays light:
the API is imported at its first use, and it imports torch, optuna and mlflow only when called.
"""

from sweep.base.version import __version__

#: the public names, each imported from its module on first use (PEP 562)
_LAZY = {"launch": "sweep.api", "plan": "sweep.api", "load": "sweep.api",
         "Launched": "sweep.api", "Study": "sweep.api", "SweepError": "sweep.errors"}

__all__ = ["__version__", *_LAZY]


def __getattr__(name: str):
    if name not in _LAZY:
        raise AttributeError(f"module 'sweep' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(_LAZY[name]), name)
    globals()[name] = value  # the next lookup finds it without this hook
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY})
