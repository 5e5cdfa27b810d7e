"""A trial's MLflow run: opened while the store may be away (waiting, never failing for an
outage), fed from the training thread through the process's one writer, and ended once the
writer holds every point, with what it should hold (``completeness``) and its LR-curve figure.

Metrics go through the process's one writer thread (``metric_writer``), which sends batches of
up to 1,000 (a synchronous ``log_metric`` costs 10-23 ms on SQLite; a batch of 1,000 costs
0.1-0.2 s), retries refused writes and spools them to local disk when the store stays down
(``spool``).
"""

from __future__ import annotations

import math
import time
from typing import Any, Mapping, Sequence

from sweep.base.stopping import stop_seconds
from sweep.base.text import first_line, warn
from sweep.base.urls import mask_url
from sweep.record.metric_writer import spool_after_s
from sweep.record.names import (EPOCH_METRICS, EPOCHS_TRAINED, EXPECTED_POINTS, ROLE, STATE,
                                STEPS_TRAINED)
from sweep.record.store_errors import is_permanent, is_read_only, wait_for_store
from sweep.record.study_runs import log_params
from sweep.record.writer_work import RunEnd


def _never_starts(err: BaseException) -> bool:
    """A run start that waiting cannot cure: a permanent refusal or a read-only store."""
    return is_permanent(err) or is_read_only(err)


def start_trial(tracker, experiment_id: str, parent_run_id: str, study_name: str,
                trial_number: int, params: Mapping[str, Any], tags: Mapping[str, str],
                check=None) -> "TrialRun":
    """Open a trial's run on ``tracker`` (a ``tracking.Tracker``). While the store is away (an
    outage, a restart) this waits and retries (``store_errors.wait_for_store``): a trial never
    fails for an outage; ``check`` raises to stop the waiting (a stop signal). A permanent
    refusal is raised."""
    run = wait_for_store(lambda: tracker.client.create_run(
        experiment_id, run_name=f"trial-{trial_number:04d}",
        tags={ROLE: "trial", "mlflow.parentRunId": parent_run_id, STATE: "RUNNING",
              "sweep.trial_number": str(trial_number), "optuna.study_name": study_name,
              **{k: mask_url(str(v)) for k, v in tags.items()}}),
        f"trial #{trial_number}'s run start", check, warn, _never_starts)
    wait_for_store(lambda: log_params(tracker.client, run.info.run_id, params),
                   f"trial #{trial_number}'s params", check, warn, _never_starts)
    return TrialRun(tracker, run.info.run_id)


class TrialRun:
    """One trial's MLflow run, and a training listener whose points go to the process's one
    metric writer (``Tracker.writer``): the training thread only appends to its queue.
    ``tracker`` is the ``tracking.Tracker`` (its ``writer``, ``client`` and ``in_background``)."""

    def __init__(self, tracker, run_id: str):
        self.tracker, self.run_id = tracker, run_id
        self.lr_curve: list[tuple[int, float]] = []
        self.expected: dict[str, int] = {}  # points handed to the writer, per metric key
        self.epochs_trained = 0
        self._writer = tracker.writer

    @property
    def metrics_logged(self) -> int:
        """Points of this run the store has taken so far (spooled ones not counted)."""
        return self._writer.stored_by_run.get(self.run_id, 0)

    @property
    def logging_seconds(self) -> float:
        """Time the writer spent in this run's ``log_batch`` calls."""
        return self._writer.seconds_by_run.get(self.run_id, 0.0)

    def _count(self, key: str, n: int) -> None:
        self.expected[key] = self.expected.get(key, 0) + n

    # -- listener interface (called from the training thread; must be cheap) --
    def on_steps(self, first_step: int, lrs: Sequence[float], losses: Sequence[float]) -> None:
        now = int(time.time() * 1000)
        steps = range(first_step, first_step + len(lrs))
        self.lr_curve.extend(zip(steps, lrs))
        points = [("lr", lr, now, step) for step, lr in zip(steps, lrs)]
        finite = [("train_loss", loss, now, step) for step, loss in zip(steps, losses)
                  if math.isfinite(loss)]
        self._count("lr", len(points))
        if finite:
            self._count("train_loss", len(finite))
            points += finite
        self._writer.put_many(self.run_id, points)

    def on_epoch_end(self, epoch: int, metrics: dict) -> None:
        self.epochs_trained += 1
        for key in EPOCH_METRICS:
            self.log_metric(key, metrics[key], epoch)

    def log_metric(self, key: str, value: float, step: int = 0) -> None:
        if value is not None and math.isfinite(value):
            self._count(key, 1)
            self._writer.put_many(self.run_id, [(key, float(value), int(time.time() * 1000), step)])

    def end_by(self) -> float:
        """When (s since the epoch) an end queued now is written or spooled at the latest
        (``RUN_END_BY``): the writer's outage allowance and a stop's bound, with a margin."""
        return time.time() + spool_after_s() + stop_seconds() + 30

    def completeness_tags(self) -> dict[str, str]:
        """What the run should hold once every point is stored (``completeness`` reads it)."""
        return {STEPS_TRAINED: str(len(self.lr_curve)), EPOCHS_TRAINED: str(self.epochs_trained),
                EXPECTED_POINTS: ",".join(f"{k}={n}" for k, n in sorted(self.expected.items()))}

    def finish(self, status: str, tags: Mapping[str, Any] | None = None,
               curve_png: bool = True, background: bool = False) -> None:
        """End the run with ``status`` (FINISHED, KILLED or FAILED) and ``tags`` once the writer
        has stored (or spooled) every point queued before; the LR-curve figure (about 0.1 s of
        matplotlib plus an artifact upload) is drawn on the tracker's background thread.

        With ``background`` nothing here waits (the fused pack's slots, FACTS.md: 0.25 s per
        trial on the H200); otherwise this waits until the end is written or spooled. A store
        that refuses is never an exception: the writer retries, then spools (``metric_writer``).
        """
        items = {k: mask_url(str(v))[:5000] for k, v in (tags or {}).items()}
        items.update(self.completeness_tags())
        end = RunEnd(self.run_id, status, items, int(time.time() * 1000))
        done = self._writer.end(end)
        if curve_png and self.lr_curve:
            # After the run's end is written: an upload then never races the run's points for
            # a store that is coming back, and a dead server costs the figure, not the points.
            self.tracker.in_background(lambda: done.wait(spool_after_s() + 60) and not end.spooled
                                       and self._log_curve())
        if not background and not done.wait(spool_after_s() + 60):
            warn(f"the end of run {self.run_id} is still queued (MLflow store and spool both "
                 f"refuse); it is written when one of them takes it")

    def _log_curve(self) -> None:
        try:
            self.tracker.client.log_figure(self.run_id, _curve_figure(self.lr_curve),
                                           "lr_curve.png")
        except Exception as err:  # the curve is also in the `lr` metric; say so and go on
            warn(f"lr_curve.png of run {self.run_id} not logged: {first_line(err)}")


def _curve_figure(curve: list[tuple[int, float]]):
    import matplotlib

    matplotlib.use("Agg", force=False)
    from matplotlib.figure import Figure

    steps, lrs = zip(*curve)
    fig = Figure(figsize=(6, 3.2), dpi=100)
    ax = fig.add_subplot()
    ax.plot(steps, lrs, lw=1.2)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("learning rate")
    if min(lrs) > 0:
        ax.set_yscale("log")
    ax.grid(alpha=0.3)
    fig.subplots_adjust(left=0.14, right=0.97, bottom=0.16, top=0.95)  # tight_layout costs 40 ms
    return fig
