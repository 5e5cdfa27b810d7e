"""The record's names and tags: the contract the MLflow UI, ``sweep report`` and users'
notebooks rely on.

* experiment = the study name; the parent run has tag ``sweep.role=study`` and is a finished
  container (never left RUNNING); trial runs have ``mlflow.parentRunId`` = the parent,
  ``sweep.role=trial``, ``sweep.trial_number``, ``sweep.state``, ``optuna.study_name``.
* trial metrics: ``lr`` and ``train_loss`` at every optimizer step, ``val_loss``/``val_acc``
  per epoch, ``test_acc`` and ``epoch_seconds`` at the end. Non-finite values are never logged.
* completeness: each trial run's end records what it should hold: ``sweep.steps_trained``,
  ``sweep.epochs_trained`` and ``sweep.expected_points`` (``lr=1200,train_loss=1200,...``:
  points per metric key), pruned, failed and interrupted trials too (``completeness``).
"""

from __future__ import annotations

ROLE, STATE, REASON = "sweep.role", "sweep.state", "sweep.prune_reason"
CODE_VERSION = "sweep.code_version"  # on every trial run, and on the parent (last launch)
STEPS_TRAINED, EPOCHS_TRAINED = "sweep.steps_trained", "sweep.epochs_trained"
EXPECTED_POINTS = "sweep.expected_points"  # "lr=1200,train_loss=1200,val_loss=10,..."
EPOCH_METRICS = ("val_loss", "val_acc")  # logged once per epoch, step = the epoch (0-based)
FINAL_METRICS = ("test_acc", "epoch_seconds")  # logged once when a trial completes
STEP_METRICS = ("lr", "train_loss")  # logged at every optimizer step, step = the step
# Optuna user attribute: by when (s since the epoch) the trial's run end is written or spooled;
# until then another worker's stale-run cleanup leaves the run to its own worker.
RUN_END_BY = "sweep.run_end_by"
# MLflow's SQLite store per point (measured: 96,144 points of 16 runs added 23.8 MB; the metrics
# table's primary key repeats the run id and key per row); PostgreSQL is of the same order.
BYTES_PER_POINT = 250


def points_per_trial(total_steps: int, epochs: int) -> int:
    """The points a trial that trains to its end logs (a pruned one logs fewer): every
    ``STEP_METRICS`` at each of its ``total_steps`` steps, ``EPOCH_METRICS`` per epoch, and the
    ``FINAL_METRICS`` once."""
    return len(STEP_METRICS) * total_steps + len(EPOCH_METRICS) * epochs + len(FINAL_METRICS)
