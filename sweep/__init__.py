"""sweep: hyperparameter sweeps over learning-rate schedules (Optuna + MLflow + PyTorch).

From Python: ``sweep.launch(...)``, ``sweep.plan(...)`` and ``sweep.load(...)`` (``sweep.api``,
docs/python.md); the errors they raise are in ``sweep.errors``. ``import sweep`` stays light:
the API is imported at its first use, and it imports torch, optuna and mlflow only when called.
"""

from sweep.base.lazy import lazy_names
from sweep.base.version import __version__

#: the public names, each imported from its module on first use (PEP 562)
_LAZY = {"launch": "sweep.api", "plan": "sweep.api", "load": "sweep.api",
         "Launched": "sweep.api", "Study": "sweep.api", "SweepError": "sweep.errors"}

__all__ = ["__version__", *_LAZY]
__getattr__, __dir__ = lazy_names(__name__, _LAZY)
