"""``sweep launch`` as a plain function: check everything, then create stores, then run.

Order matters for "bad input writes nothing": every check that can fail on user input (study
file, device, URLs, data folder) runs before the first store is created.
"""

from __future__ import annotations

import os
import socket
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Protocol, Sequence

import optuna
import torch

from sweep.loop import budget_used, resolve_budget, update_parent_run
from sweep.loop import Cost, StepClock
from sweep.loop import reconcile_study
from sweep.stores import CheckpointDir, resolve_dir, storage_key
from sweep.record import Tracker, check_tracking_uri, launch_lines, replay_spool
from sweep.loop import WorkerContext
from sweep.loop import log_pack_times, time_table
from sweep.base.stopping import BoundedStop
from sweep.stores import check_storage_url, open_storage
from sweep.base.urls import mask_url
from sweep.record import tag_code_version
from sweep.base.version import code_version
from sweep.loop import open_study
from sweep.loop import run_worker
from sweep.study.specs import StudySpec
from sweep.training.data import Splits, load_splits, locate
from sweep.training.model_check import check_model
from sweep.training.train import resolve_device


@dataclass(frozen=True)
class LaunchOptions:
    storage: str
    tracking_uri: str
    data_dir: str | None
    device: str = "auto"
    trials: int | None = None
    allow_space_change: bool = False
    checkpoint_dir: str | None = None  # None: beside the Optuna store (checkpoints.default_dir)
    allow_config_change: bool = False  # resume although train/data/... settings differ (identity)


@dataclass
class LaunchResult:
    text: str
    exit_code: int = 0
    cost: Cost | None = None  # the cost line's numbers, once the first steps were timed


def study_params(spec: StudySpec, opts: LaunchOptions, budget: int) -> dict:
    """Study-level MLflow params: the fixed settings and the search space, flat."""
    raw = spec.raw
    params = {"study": spec.name, "seed": spec.seed, "trials": budget,
              "storage": mask_url(opts.storage), "device": opts.device}

    def flatten(prefix: str, value) -> None:
        if isinstance(value, dict) and value:
            for key, inner in value.items():
                flatten(f"{prefix}.{key}" if prefix else str(key), inner)
        else:
            params[prefix] = value

    for section in ("objective", "sampler", "pruner", "divergence", "data", "train", "space"):
        flatten(section, raw.get(section, {}))
    return params


class Display(Protocol):
    """What a person sees while trials run, handed in by the caller (``views.console.Console``
    for the CLI), so that the commands never import a view."""

    epoch_bar: Callable | None  # a training-listener factory (trial number, epochs, row), or None

    def trial_bar(self, budget: int, used: int) -> Callable:
        """Called with (trial number, outcome) per finished trial; has ``close()``."""

    def watch_record(self, lag: Callable[[], str]) -> None:
        """``lag()``: the MLflow writer's lag as text (empty while it keeps up), to show."""

    def closing(self, study: optuna.Study, budget: int, used: int) -> str:
        """The closing text: best trial, counts, where to look next."""

    def say(self, line: str) -> None:
        """A line to show at once, while trials run (the cost line), even when quiet."""


@dataclass
class StudyStores:
    """A study's opened stores, as every path holds them (launch, the pool's parent, submit and
    each worker). ``splits`` is the data in memory, or None where this process does not train."""

    study: optuna.Study
    budget: int
    tracker: Tracker
    experiment_id: str
    parent_run_id: str
    device: torch.device
    code_version: str
    splits: Splits | None = None
    checkpoint_dir: Path | None = None
    storage_url: str = ""  # names the study's checkpoint folder (``checkpoints.storage_key``)

    def worker_context(self, spec: StudySpec, progress: Callable | None = None,
                       stop: BoundedStop | None = None,
                       step_clock: StepClock | None = None) -> WorkerContext:
        """``progress``: a training-listener factory ``(trial number, epochs, row)`` for the
        console; ``stop``: the command's bounded stop; ``step_clock``: times the first steps
        (the cost line)."""
        checkpoints = CheckpointDir(self.checkpoint_dir, self.code_version, self.device.type,
                                    storage_key(self.storage_url)) \
            if self.checkpoint_dir is not None else None
        return WorkerContext(spec, self.splits, self.device, self.tracker, self.experiment_id,
                             self.parent_run_id, self.code_version, progress=progress,
                             checkpoints=checkpoints, stop=stop, step_clock=step_clock)


def open_study_stores(spec: StudySpec, opts: LaunchOptions, check_device: bool = True,
                      load_data: bool = True) -> StudyStores:
    """Check the run's inputs, then open the stores, creating what is absent: the Optuna study,
    its budget (``budget.resolve_budget``), the MLflow experiment and the parent run.

    Every check that can fail on user input (device, URLs, model, data folder) runs before the
    first store is created. ``load_data``: read the data set into memory (a process that trains);
    otherwise only find it, downloading it once, so workers started later never race to
    download. ``check_device=False`` where the workers run elsewhere (``sweep submit`` on a
    login node without GPUs)."""
    device = resolve_device(opts.device if check_device else "cpu")
    check_storage_url(opts.storage)
    check_tracking_uri(opts.tracking_uri)
    check_model(spec.train, spec.data.num_classes)  # a factory by import path, built and run once
    checkpoint_dir = resolve_dir(opts.checkpoint_dir, opts.storage)
    if load_data:
        splits = load_splits(opts.data_dir, spec.data, device)
    else:
        splits = None
        locate(opts.data_dir, dataset=spec.data.dataset)
    study = open_study(spec, open_storage(opts.storage), opts.allow_space_change,
                       allow_config_change=opts.allow_config_change)
    budget = resolve_budget(study, spec, opts.trials)
    tracker = Tracker(opts.tracking_uri)
    replay_spool(tracker)
    experiment_id = tracker.experiment_id(spec.name)
    parent = tracker.study_run(experiment_id, spec.name, study_params(spec, opts, budget),
                               Path(spec.path))
    version = code_version()
    # The parent run says which code last launched the study (each trial run records its own).
    tag_code_version(tracker, parent, version)
    return StudyStores(study, budget, tracker, experiment_id, parent, device, version, splits,
                       checkpoint_dir, opts.storage)


def worker_command(spec: StudySpec, opts: LaunchOptions, overrides: Sequence[str],
                   device: str | None = None,
                   program: Sequence[str] | None = None) -> list[str]:
    """The ``sweep worker`` command line that pool children and SLURM array tasks run.

    No URLs: they travel in the environment (``ps`` shows command lines to every user). No
    ``--trials``: the budget is stored in the study before any worker starts, and a worker
    without ``--trials`` reads it there. The data folder is passed as given, which the CLI has
    already made absolute. ``program``: what starts sweep (default: this interpreter with
    ``-m sweep.cli``; ``sweep submit`` passes the compute node's)."""
    cmd = [*(program or (sys.executable, "-m", "sweep.cli")), "worker",
           "--study", str(Path(spec.path).resolve()), "--device", device or opts.device, "--quiet"]
    for item in overrides:
        cmd += ["--set", item]
    if opts.data_dir:
        cmd += ["--data-dir", str(opts.data_dir)]
    if opts.allow_space_change:
        cmd.append("--allow-space-change")
    if opts.allow_config_change:
        cmd.append("--allow-config-change")
    if opts.checkpoint_dir:
        cmd += ["--checkpoint-dir", str(Path(opts.checkpoint_dir).resolve())]
    return cmd


def nothing_to_run(spec: StudySpec, stores: StudyStores, display: Display) -> LaunchResult | None:
    """The answer when the study has already used its budget, else None."""
    used = budget_used(stores.study)
    if used < stores.budget:
        return None
    return LaunchResult(f"study {spec.name!r} has used its budget ({used}/{stores.budget} "
                        f"trials): nothing to run; raise it with --trials N\n"
                        + display.closing(stores.study, stores.budget, used))


def launch(spec: StudySpec, opts: LaunchOptions, display: Display) -> LaunchResult:
    with BoundedStop() as stop:  # SIGTERM/SIGINT: every queued point stored or spooled in time
        return _launch(spec, opts, display, stop)


def _launch(spec: StudySpec, opts: LaunchOptions, display: Display,
            stop: BoundedStop) -> LaunchResult:
    stores = open_study_stores(spec, opts)
    stop.last_words = stores.tracker.spool_now
    done = nothing_to_run(spec, stores, display)
    if done is not None:
        return done
    study, budget = stores.study, stores.budget
    display.watch_record(stores.tracker.lag_text)
    # What the rest will cost, said once the first trial's steps were timed (``cost``).
    clock = StepClock(spec.name, spec.total_steps, stores.device.type,
                      lambda cost: display.say(cost.line()))
    bar = display.trial_bar(budget, budget_used(study))
    try:
        report = run_worker(study, stores.worker_context(spec, display.epoch_bar, stop, clock),
                            budget, on_trial=bar)
    finally:
        bar.close()
        if not (stop.deadline and stores.tracker.refusing):  # a stop in an outage: the next launch
            update_parent_run(study, stores.tracker, stores.experiment_id, stores.parent_run_id)
    log_pack_times(stores.tracker, stores.parent_run_id, report.packs)
    text = "\n".join([display.closing(study, budget, budget_used(study)),
                      *filter(None, [time_table(report.packs)]),
                      *launch_lines(stores.tracker, stores.experiment_id, spec.name)])
    if report.interrupted_by is not None:
        return LaunchResult("interrupted: the running trial(s) (every live slot of a fused pack) were "
                            "marked FAIL (KILLED in MLflow) and will be retried by the next launch\n" + text,
                            128 + report.interrupted_by, clock.cost)
    return LaunchResult(text, cost=clock.cost)


def worker_main(spec: StudySpec, opts: LaunchOptions, log=print) -> LaunchResult:
    """The body of a ``sweep worker`` process, one of many pulling trials from a shared study
    until its total budget is used. ``log`` receives one line per finished trial (batch jobs'
    output files). A stop (SIGTERM from SLURM, Ctrl-C) is bounded by ``SWEEP_STOP_S``
    (``stopping``)."""
    with BoundedStop() as stop:
        return _worker_main(spec, opts, log, stop)


def _worker_main(spec: StudySpec, opts: LaunchOptions, log, stop: BoundedStop) -> LaunchResult:
    stores = open_study_stores(spec, opts)
    stop.last_words = stores.tracker.spool_now
    study, budget, ctx = stores.study, stores.budget, stores.worker_context(spec, stop=stop)
    # Every worker builds its sampler from the study's seed; unseeded, N workers would propose
    # the same N parameter sets in lockstep. (A parallel sweep is not reproducible anyway.)
    study.sampler.reseed_rng()
    fixed = reconcile_study(study, ctx.tracker, ctx.experiment_id)
    me = f"{socket.gethostname()}:{os.getpid()}"
    if fixed.failed_trials or fixed.ended_runs:
        log(f"worker {me}: failed stale trial(s) {fixed.failed_trials}, ended "
            f"{len(fixed.ended_runs)} stale MLflow run(s)")

    def on_trial(number, outcome):
        value = f" value {outcome.value:.4f}" if outcome.value is not None else ""
        why = f": {mask_url(outcome.detail)}" if outcome.state.name == "FAIL" and outcome.detail else ""
        log(f"worker {me}: trial #{number} {outcome.state.name.lower()}{value}{why}")

    try:
        report = run_worker(study, ctx, budget, on_trial=on_trial)
    finally:
        if not (stop.deadline and stores.tracker.refusing):  # a stop in an outage: the next launch
            update_parent_run(study, stores.tracker, stores.experiment_id, stores.parent_run_id)
    used = budget_used(study)
    log_pack_times(stores.tracker, stores.parent_run_id, report.packs)
    for line in [*time_table(report.packs).splitlines(),
                 *launch_lines(stores.tracker, stores.experiment_id, spec.name)]:
        log(f"worker {me}: {line}")
    if report.interrupted_by is not None:
        return LaunchResult(f"worker {me}: interrupted; the trial(s) it was training were marked FAIL "
                            f"(KILLED in MLflow) and re-enqueued; {used}/{budget} trials used",
                            128 + report.interrupted_by)
    return LaunchResult(f"worker {me}: done, ran {len(report.ran)} trial(s); study "
                        f"{spec.name!r} has used {used}/{budget} trials")
