"""The study loop: the budget, reconciliation, creating or resuming a study, one trial, the
seats of a pack, where a pack's time went, the worker loop, the confirmation plan. Talks to
MLflow only through ``sweep.record``; imports nothing eagerly (callers that must stay free of
torch import the modules they need)."""

from sweep.base.lazy import lazy_names


# The public names and the module each lives in; loaded on first use, so importing the
# package stays light (no torch, optuna or mlflow until a name needs them).
_PUBLIC = {
    "BUDGET": "sweep.loop.budget",
    "Cost": "sweep.loop.cost",
    "FINISHED": "sweep.loop.budget",
    "IDENTITY": "sweep.loop.identity",
    "Reconciled": "sweep.loop.reconcile",
    "StepClock": "sweep.loop.cost",
    "WorkerContext": "sweep.loop.objective",
    "as_searched": "sweep.loop.confirm_plan",
    "best_trial": "sweep.loop.budget",
    "budget_line": "sweep.loop.confirm_plan",
    "budget_used": "sweep.loop.budget",
    "chosen_budget": "sweep.loop.budget",
    "counted": "sweep.loop.budget",
    "differences": "sweep.loop.identity",
    "identity_of": "sweep.loop.identity",
    "log_pack_times": "sweep.loop.pack_times",
    "open_study": "sweep.loop.study",
    "outcome": "sweep.loop.budget",
    "prepare_replicates": "sweep.loop.confirm_plan",
    "reconcile_study": "sweep.loop.reconcile",
    "resolve_budget": "sweep.loop.budget",
    "resolve_plan": "sweep.loop.confirm_plan",
    "run_worker": "sweep.loop.worker",
    "stale_runs": "sweep.loop.reconcile",
    "state_counts": "sweep.loop.budget",
    "stored_plan": "sweep.loop.confirm_plan",
    "time_table": "sweep.loop.pack_times",
    "update_parent_run": "sweep.loop.budget",
    "worker_gone": "sweep.loop.reconcile",
}

__all__ = sorted(_PUBLIC)
__getattr__, __dir__ = lazy_names(__name__, _PUBLIC)
