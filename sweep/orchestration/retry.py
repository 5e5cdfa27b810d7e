"""The one retry rule: a trial that failed because its worker died, stalled or was interrupted is
re-enqueued once, with its parameters and its phase attributes (a confirmation replicate stays
one). The same rule serves every path that finds such a trial: a worker that is interrupted, a
worker that finds a dead local worker's trial (``bookkeeping.fail_dead_trials``) and Optuna's
stale-heartbeat check (the storage's ``heartbeat_stale_trial_callback``, ``storage.py``).

It is idempotent: a trial that already has a retry gets no second one, so the paths may meet.
An interrupted worker enqueues the retry *before* it tells Optuna FAIL; a second Ctrl-C in
between leaves a RUNNING trial that already has its retry, which the next launch fails (dead
pid or stale heartbeat) without enqueueing it again. (In the other order, a second Ctrl-C
between the two left a FAIL trial with no retry, counted against the budget.)
"""

from __future__ import annotations

import optuna
from optuna.trial import FrozenTrial, TrialState

from sweep.study.phases import ENQUEUED_ATTRS

FAILED_TRIAL, RETRY_HISTORY = "failed_trial", "retry_history"  # Optuna's own system attributes


def retry_later(study: optuna.Study, frozen: FrozenTrial) -> None:
    """Re-enqueue ``frozen``'s parameters once (see the module docstring)."""
    if frozen.system_attrs.get(RETRY_HISTORY):
        return  # already a retry: once is enough
    if any(t.system_attrs.get(FAILED_TRIAL) == frozen.number
           for t in study.get_trials(deepcopy=False)):
        return  # re-enqueued already
    study.add_trial(optuna.trial.create_trial(
        state=TrialState.WAITING, params=frozen.params, distributions=frozen.distributions,
        user_attrs={k: frozen.user_attrs[k] for k in ENQUEUED_ATTRS if k in frozen.user_attrs},
        system_attrs={FAILED_TRIAL: frozen.number, RETRY_HISTORY: [frozen.number]}))
