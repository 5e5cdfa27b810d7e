"""The rules of the study file's ``pruner:`` parameters: which parameters each pruner type
takes, their types and ranges, and the rules between them. A table the spec reads when it loads
a study file; building the Optuna pruner is ``pruning.py``'s job. This module imports nothing of
sweep, so the spec and the pruners both depend on it and not on each other.
"""

from __future__ import annotations

import math


def _non_negative(v):
    return None if v >= 0 else f"must be >= 0, got {v!r}"


def _positive(v):
    return None if v >= 1 else f"must be >= 1, got {v!r}"


def _percent(v):
    return None if 0 <= v <= 100 else f"must be in [0, 100], got {v!r}"


def _reduction(v):
    return None if v >= 2 else f"must be >= 2, got {v!r}"


_MEDIAN = {"n_startup_trials": (int, _non_negative), "n_warmup_steps": (int, _non_negative),
           "interval_steps": (int, _positive), "n_min_trials": (int, _positive)}

#: pruner type -> parameter -> (type, check). Counts of steps are epochs.
PRUNER_PARAMS: dict[str, dict] = {
    "none": {},
    "median": _MEDIAN,
    "percentile": {**_MEDIAN, "percentile": (float, _percent)},
    "successive_halving": {"min_resource": (int, _positive), "reduction_factor": (int, _reduction),
                           "min_early_stopping_rate": (int, _non_negative)},
    "hyperband": {"min_resource": (int, _positive), "reduction_factor": (int, _reduction)},
    "threshold": {"lower": (float, None), "upper": (float, None),
                  "n_warmup_steps": (int, _non_negative), "interval_steps": (int, _positive)},
    "patient": {"patience": (int, _non_negative), "min_delta": (float, _non_negative)},
}


def pruner_problem(kind: str, params: dict) -> tuple[str, str] | None:
    """Rules between a pruner's parameters, checked when the study file is loaded:
    ``(key, problem)`` or None. (Each parameter alone is checked by ``PRUNER_PARAMS``.)"""
    if kind == "threshold":
        if "lower" not in params and "upper" not in params:
            return "type", "pruner 'threshold' needs 'lower' or 'upper' (or both)"
        if params.get("lower", -math.inf) > params.get("upper", math.inf):
            return "lower", (f"must be <= upper, got lower={params['lower']!r} > "
                             f"upper={params['upper']!r}")
    return None
