"""The one retry rule: a trial that failed because its worker died, stalled or was interrupted is
re-enqueued with its parameters, its seed and its phase attributes (a confirmation replicate
stays one). The same rule serves every path that finds such a trial: a worker that is
interrupted, a worker that finds a dead local worker's trial (``reconcile.fail_dead_trials``)
and Optuna's stale-heartbeat check (the storage's ``heartbeat_stale_trial_callback``,
``storage.py``).

How often: a trial that was never retried gets one retry. A retry gets another only when it made
progress: its latest checkpoint holds more finished epochs than the one it resumed from
(``checkpoints``: the retry continues from that checkpoint, so the chain of retries ends after at
most as many links as the trial has epochs). A retry that trained no further epoch is not
retried again: a trial that keeps killing its worker does not loop forever. A trial that a
signal stopped (``signalled``: SIGTERM before a SLURM time limit, preemption, Ctrl-C) is retried
whatever its progress: the signal is not the trial's doing, and a job preempted twice within one
epoch must not lose the trial; each such retry needs a new signal, so this cannot loop either.

The retry keeps the original's seed (``sweep.seed``): it is the same trial continued, so it draws
the same weights and batches whether it resumes from a checkpoint or restarts from step 0.
``retry_history`` lists every trial it continues, first the original (Optuna's own attribute:
those trials no longer count towards the budget, ``sweep.loop.budget``). ``PRUNING_TRIAL``
names the original too: the pruner draws the retry's Hyperband bracket from that number, so the
retry meets the rungs its original would have (``sweep.study.pruning``).

It is idempotent: a trial that already has a retry gets no second one, so the paths may meet.
Each path fails the trial by a compare-and-set of its state first (RUNNING -> FAIL; the storage
refuses to finish a finished trial) and only the winner calls this: Optuna's stale check, the
dead-pid check and a worker giving its own trials up (``loop.lifecycle.give_up``: a stop, a
slot's error, a failed pack). A stale check racing a signalled retry thus makes one retry, not
two owners of one checkpoint file (the check here is read-then-add, not atomic on its own).
"""

from __future__ import annotations

import optuna
from optuna.trial import FrozenTrial, TrialState

from sweep.study.phases import ENQUEUED_ATTRS, SEED
from sweep.study.pruning import PRUNING_TRIAL, pruning_number

FAILED_TRIAL, RETRY_HISTORY = "failed_trial", "retry_history"  # Optuna's own system attributes
# user attributes: finished epochs in the trial's latest checkpoint / in the one it resumed from
CHECKPOINT_EPOCHS, RESUMED_EPOCHS = "checkpoint_epochs", "resumed_epochs"


def made_progress(frozen: FrozenTrial) -> bool:
    """Whether ``frozen`` checkpointed an epoch beyond the checkpoint it started from."""
    saved = frozen.user_attrs.get(CHECKPOINT_EPOCHS)
    return saved is not None and saved > frozen.user_attrs.get(RESUMED_EPOCHS, 0)


def retry_later(study: optuna.Study, frozen: FrozenTrial, signalled: bool = False) -> bool:
    """Re-enqueue ``frozen`` (see the module docstring); whether it has a retry now.
    ``signalled``: its own worker stopped it on a signal (not a death found by others)."""
    history = list(frozen.system_attrs.get(RETRY_HISTORY) or [])
    if history and not signalled and not made_progress(frozen):
        return False  # a retry that got no further: once is enough
    if any(t.system_attrs.get(FAILED_TRIAL) == frozen.number
           for t in study.get_trials(deepcopy=False)):
        return True  # re-enqueued already
    user_attrs = {k: frozen.user_attrs[k] for k in ENQUEUED_ATTRS if k in frozen.user_attrs}
    if "seed" in frozen.user_attrs:  # the seed it trained with (objective.start_trial)
        user_attrs.setdefault(SEED, frozen.user_attrs["seed"])
    study.add_trial(optuna.trial.create_trial(
        state=TrialState.WAITING, params=frozen.params, distributions=frozen.distributions,
        user_attrs=user_attrs,
        system_attrs={FAILED_TRIAL: frozen.number, RETRY_HISTORY: [*history, frozen.number],
                      PRUNING_TRIAL: pruning_number(frozen)}))
    return True
