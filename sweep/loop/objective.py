"""One Optuna trial: suggest -> train -> report -> outcome.

``start_trial`` (config, MLflow run, user attributes, listeners) and ``end_trial`` (result,
stop or exception -> outcome, run ended) are the two halves every trial goes through, alone
(``run_trial``) or as a slot of a fused pack (``sweep.loop.pack``).

The MLflow run of a trial always ends: FINISHED (complete), KILLED (pruned, diverged,
interrupted or re-enqueued) or FAILED (the trial raised). What happens to the Optuna trial
around these two halves (claimed, told or re-enqueued once, its checkpoint file): ``lifecycle``;
the study loop: ``worker``.
"""

from __future__ import annotations

import math
import os
import socket
import traceback
from dataclasses import dataclass
from typing import Callable, Mapping, Sequence

import optuna

from sweep.training.data import Splits
from sweep.training.divergence import DivergenceMonitor
from sweep.training.model_check import model_record
from sweep.study.phases import phase_tags
from sweep.study.pruning import describe_pruner
from sweep.study.space import TrialConfig, trial_config
from sweep.study.specs import StudySpec
from sweep.stores import CheckpointWriter
from sweep.stores import RESUMED_AT_STEP, CheckpointDir, TrialCheckpoint
from sweep.stores import CHECKPOINT_EPOCHS, RESUMED_EPOCHS
from sweep.base.urls import mask_url
from sweep.errors import CredentialsRefused
from sweep.loop.lifecycle import Outcome, note
from sweep.record import CODE_VERSION, REASON, RUN_END_BY, STATE, Tracker, TrialRun
from sweep.training.train import StopTraining, TrainResult, train

import torch


class PruningListener:
    """Reports the objective metric each epoch and asks the study's pruner."""

    def __init__(self, trial: optuna.Trial, metric: str, pruner_name: str, steps_per_epoch: int):
        self.trial, self.metric, self.pruner_name = trial, metric, pruner_name
        self.steps_per_epoch = steps_per_epoch

    def on_steps(self, first_step: int, lrs: Sequence[float], losses: Sequence[float]) -> None:
        pass

    def on_epoch_end(self, epoch: int, metrics: dict) -> None:
        value = metrics[self.metric]
        if not math.isfinite(value) or not math.isfinite(metrics["val_loss"]):
            return  # a non-finite epoch is divergence, handled by DivergenceMonitor
        self.trial.report(value, epoch)
        if self.trial.should_prune():
            raise StopTraining("pruner", (epoch + 1) * self.steps_per_epoch - 1, epoch,
                               {"pruner": self.pruner_name, "value": value})


@dataclass
class WorkerContext:
    """What a worker loads once and reuses for all its trials."""

    spec: StudySpec
    splits: Splits
    device: torch.device
    tracker: Tracker
    experiment_id: str
    parent_run_id: str
    code_version: str
    # An optional listener factory for the console: (trial number, epochs, row) -> listener with
    # close(); row 1 is under the trials bar, a fused slot takes the row of its seat.
    progress: object | None = None
    checkpoints: CheckpointDir | None = None  # None: trials neither checkpoint nor resume
    stop: object | None = None  # the command's ``stopping.BoundedStop`` (None: the loop's own)
    # A listener of every step the worker trains (``cost.StepClock``: the launch's cost line),
    # told the pack size by the worker (``start``); None: no one is timing.
    step_clock: object | None = None


@dataclass
class StartedTrial:
    """A trial whose config is drawn and whose MLflow run is open: what ``end_trial`` needs."""

    trial: optuna.Trial
    cfg: TrialConfig
    run: TrialRun
    listeners: list  # tracking, divergence, pruning (and a progress bar) for this trial alone
    metric: str  # the objective: which of the last epoch's metrics is the trial's value
    progress: object | None = None
    checkpoint: TrialCheckpoint | None = None  # its file; ``.resume``: the state to go on from
    writer: CheckpointWriter | None = None  # the process's checkpoint writer (with checkpoint)

    @property
    def resume(self) -> dict | None:
        return self.checkpoint.resume if self.checkpoint is not None else None

    def save_later(self, on_written: Callable[[float], None] | None = None):
        """The training loop's ``checkpoint`` callback (None: no checkpoints): the state's copy
        goes to the writer thread, which saves it (``on_written``: its seconds there)."""
        if self.checkpoint is None:
            return None
        return lambda take: self.writer.save(self.checkpoint, take, on_written)


def start_trial(trial: optuna.Trial, ctx: WorkerContext, tags: Mapping[str, object] | None = None,
                row: int = 1, interrupt=None) -> StartedTrial | Outcome:
    """Draw the trial's config, open its MLflow run, record its user attributes and build its
    listeners (a progress bar on console ``row`` when the worker shows progress). While the
    store is away the run's start waits and retries (a stop raises from ``interrupt.check``);
    returns a FAIL ``Outcome`` (the trial's own, to be told) only when the store refuses the run
    for good; raises ``CredentialsRefused`` when it refuses the credentials (the worker stops
    and the trial is retried: ``worker``). Shared by the unfused trial (``run_trial``) and the
    fused pack (``pack``)."""
    spec = ctx.spec
    steps_per_epoch = spec.steps_per_epoch
    try:
        cfg = trial_config(trial, spec)
        model = model_record(cfg.train, cfg.data.num_classes)  # path, args, size, source hash
        checkpoint = None
        if ctx.checkpoints is not None:
            # the note is written by the writer thread, with the boundary's other notes
            checkpoint = ctx.checkpoints.open(
                trial, cfg, on_saved=ctx.checkpoints.writer.deferred(
                    lambda epochs: note(trial, CHECKPOINT_EPOCHS, epochs)),
                steps_per_epoch=steps_per_epoch)
        resumed = {RESUMED_AT_STEP: checkpoint.resume["steps"]} if checkpoint and checkpoint.resume \
            else {}
        run = ctx.tracker.start_trial(
            ctx.experiment_id, ctx.parent_run_id, spec.name, trial.number,
            params={**cfg.flat_params(), "device": str(ctx.device),
                    "model_parameters": model["model_parameters"]},
            tags={CODE_VERSION: ctx.code_version, "sweep.study_file": str(spec.path),
                  "sweep.host": socket.gethostname(), "sweep.pid": os.getpid(), **phase_tags(trial),
                  "sweep.model_source_sha256": model["model_source_sha256"],
                  **resumed, **(tags or {})},
            check=interrupt.check if interrupt is not None else None)
    except CredentialsRefused:
        raise  # not the trial's doing, and every later trial would meet it: the worker stops
    except Exception as err:  # e.g. a read-only or full MLflow store: this trial fails, loudly
        detail = " ".join(str(err).split())[:400]  # one line, with the driver's own reason
        message = mask_url(f"could not start the trial's MLflow run: {type(err).__name__}: {detail}")
        note(trial, "error", message)
        return Outcome(optuna.trial.TrialState.FAIL, detail=message)
    # host and pid are the claim's notes (``lifecycle.Trials.claim``), written before any wait
    for key, value in (("seed", cfg.seed), ("mlflow_run_id", run.run_id), *model.items()):
        note(trial, key, value)
    listeners = [run, DivergenceMonitor(spec.divergence, cfg.schedule.warmup_steps, steps_per_epoch,
                                           num_classes=cfg.data.num_classes),
                 PruningListener(trial, spec.objective.metric, describe_pruner(spec.pruner),
                                 steps_per_epoch)]
    bar = ctx.progress(trial.number, spec.train.epochs, row) if ctx.progress else None
    if bar is not None:
        listeners.append(bar)
    started = StartedTrial(trial, cfg, run, listeners, spec.objective.metric, bar, checkpoint,
                           ctx.checkpoints.writer if checkpoint is not None else None)
    if checkpoint is not None:
        listeners.append(checkpoint.record)
        if checkpoint.resume is not None:
            return _resumed(started)
    return started


def _resumed(started: StartedTrial) -> StartedTrial | Outcome:
    """A retry that continues its interrupted trial's checkpoint: its listeners hear the steps
    and epochs trained before (the run logs the curve from step 0, the pruner gets every epoch's
    value, the divergence monitor its state), as if the trial had never stopped. The pruner may
    stop it there, with what the study knows now."""
    resume = started.checkpoint.resume
    note(started.trial, RESUMED_EPOCHS, resume["epochs"])
    note(started.trial, RESUMED_AT_STEP, resume["steps"])
    try:
        started.checkpoint.replay([lst for lst in started.listeners
                                   if lst is not started.checkpoint.record])
    except StopTraining as stop:
        return end_trial(started, stop=stop)
    except Exception as err:  # a store refusing the replay: the caller re-enqueues the trial
        end_trial(started, error=err, background=True, requeued=True)
        raise
    return started


def end_trial(started: StartedTrial, result: TrainResult | None = None,
              stop: StopTraining | None = None, error: BaseException | None = None,
              tags: Mapping[str, object] | None = None, background: bool = False,
              requeued: bool = False) -> Outcome:
    """Record how the trial ended (exactly one of ``result``, ``stop``, ``error``) in its
    Optuna user attributes and its MLflow run, and end the run: FINISHED (complete), KILLED
    (pruned, diverged, interrupted: ``error`` not an ``Exception``, or ``requeued``: the worker
    re-enqueues it, e.g. its pack failed) or FAILED. Returns the outcome to tell Optuna (the
    caller tells it, or re-enqueues the trial: ``lifecycle.Trials``; the checkpoint file goes
    after the tell). With ``background`` (every trial of the study loop) the run is ended
    by the tracker's one writer thread once its points are stored (tags, status; the LR-curve
    figure after): the caller tells Optuna at once, since everything the run will hold is
    queued by then; a store that refuses is retried, then spooled (``metric_writer``)."""
    trial, run = started.trial, started.run
    extra = dict(tags or {})
    if background:  # Optuna hears first: the cleanup leaves the run to this worker until then
        note(trial, RUN_END_BY, run.end_by())
    if started.progress is not None:
        started.progress.close()
    if stop is not None:
        # prune_reason/prune_step/prune_epoch, and the listener's detail: prune_pruner and
        # prune_value (an ordinary prune), prune_loss and prune_cause (divergence).
        for key, value in (("reason", stop.reason), ("step", stop.step), ("epoch", stop.epoch),
                           *stop.detail.items()):
            note(trial, f"prune_{key}", value)
        run.finish("KILLED", {STATE: "PRUNED", REASON: stop.reason, "sweep.prune_step": stop.step,
                              "sweep.prune_epoch": stop.epoch, **extra,
                              **{f"sweep.prune_{k}": v for k, v in stop.detail.items()}},
                   background=background)
        return Outcome(optuna.trial.TrialState.PRUNED, run_id=run.run_id, detail=str(stop))
    if error is not None or result is None:  # interruption, or a bug/OOM in the trial
        err = error if error is not None else RuntimeError("the trial ended without a result")
        interrupted = not isinstance(err, Exception)
        killed = interrupted or requeued  # not the trial's doing: its retry goes on
        message = mask_url(f"{type(err).__name__}: {err}".strip())[:2000]
        note(trial, "error", "interrupted" if interrupted else message)
        trace = "" if interrupted else "".join(traceback.format_exception(err))[-4000:]
        try:
            run.finish("KILLED" if killed else "FAILED",
                       {STATE: "FAIL", "sweep.error": "interrupted" if interrupted else message,
                        "sweep.traceback": trace, **extra},
                       curve_png=not killed, background=background)
        except Exception:
            pass  # the store failing too must not hide the trial's own error
        return Outcome(optuna.trial.TrialState.FAIL, run_id=run.run_id,
                       detail="interrupted" if interrupted else message)
    value = result.history[-1][started.metric]
    epoch_seconds = sum(h["epoch_seconds"] for h in result.history) / len(result.history)
    note(trial, "test_acc", result.test_acc)
    note(trial, "epoch_seconds", epoch_seconds)
    run.log_metric("test_acc", result.test_acc)
    run.log_metric("epoch_seconds", epoch_seconds)
    if result.compile_seconds:
        run.log_metric("compile_seconds", result.compile_seconds)
    try:
        run.finish("FINISHED", {STATE: "COMPLETE", **extra}, background=background)
    except Exception as err:
        note(trial, "error", str(err))
        return Outcome(optuna.trial.TrialState.FAIL, run_id=run.run_id, detail=str(err))
    return Outcome(optuna.trial.TrialState.COMPLETE, value, run.run_id)


def run_trial(trial: optuna.Trial, ctx: WorkerContext, interrupt=None,
              on_started: Callable[[StartedTrial], None] | None = None) -> Outcome:
    """Train one trial; returns its outcome (to be told). Re-raises interruptions
    (BaseException), which the optional ``interrupt`` listener raises from the training loop,
    and an error of its start or end (its replay, a store refusing a note: the caller
    re-enqueues it, ``lifecycle``). ``on_started`` hears the trial once its run is open."""
    started = start_trial(trial, ctx, interrupt=interrupt)
    if isinstance(started, Outcome):
        return started
    if on_started is not None:
        on_started(started)
    listeners = started.listeners
    if ctx.step_clock is not None:
        listeners = [*listeners, ctx.step_clock]
    if interrupt is not None:
        listeners = [*listeners, interrupt]  # last: the steps it interrupts are logged first
    try:
        if interrupt is not None:
            interrupt.check()  # a signal that came while the trial was being set up
        result = train(started.cfg, ctx.splits, ctx.device, listeners,
                       checkpoint=started.save_later(),
                       resume=started.resume)
    except StopTraining as stop:
        return end_trial(started, stop=stop, background=True)
    except BaseException as err:  # interruption, or a bug/OOM in the trial
        outcome = end_trial(started, error=err, background=True)
        if not isinstance(err, Exception):
            raise
        return outcome
    # The run ends on the tracker's writer thread: Optuna's result never waits for MLflow.
    return end_trial(started, result=result, background=True)
