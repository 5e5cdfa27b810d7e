"""``sweep launch`` as a plain function: check everything, then create stores, then run.

Order matters for "bad input writes nothing": every check that can fail on user input (study
file, device, URLs, data folder) runs before the first store is created.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from sweep.views.console import EpochBar, TrialBar, summary
from sweep.training.data import load_splits
from sweep.errors import DeviceError
from sweep.orchestration.objective import WorkerContext
from sweep.study.spec import StudySpec
from sweep.orchestration.storage import check_storage_url, mask_url, open_storage
from sweep.orchestration.tracking import Tracker, check_tracking_uri
from sweep.training.train import resolve_device
from sweep.orchestration.worker import budget_used, code_version, open_study, run_worker


@dataclass(frozen=True)
class LaunchOptions:
    storage: str
    tracking_uri: str
    data_dir: str | None
    device: str = "auto"
    trials: int | None = None
    quiet: bool = False
    allow_space_change: bool = False


@dataclass
class LaunchResult:
    text: str
    exit_code: int = 0


def study_params(spec: StudySpec, opts: LaunchOptions) -> dict:
    """Study-level MLflow params: the fixed settings and the search space, flat."""
    raw = spec.raw
    params = {"study": spec.name, "seed": spec.seed, "trials": opts.trials or spec.trials,
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


def prepare(spec: StudySpec, opts: LaunchOptions):
    """Validate the run's inputs, then open the stores and load the data once."""
    try:
        device = resolve_device(opts.device)
    except ValueError as err:
        raise DeviceError(str(err)) from None
    check_storage_url(opts.storage)
    check_tracking_uri(opts.tracking_uri)
    splits = load_splits(opts.data_dir, spec.data, device)
    storage = open_storage(opts.storage)
    study = open_study(spec, storage, opts.allow_space_change)
    tracker = Tracker(opts.tracking_uri)
    experiment_id = tracker.experiment_id(spec.name)
    parent = tracker.study_run(experiment_id, spec.name, study_params(spec, opts), Path(spec.path))
    ctx = WorkerContext(spec, splits, device, tracker, experiment_id, parent, code_version(),
                        progress=None if opts.quiet else EpochBar)
    return study, ctx


def resolve_budget(study, spec: StudySpec, trials: int | None) -> int:
    """The study's total budget: ``--trials`` (then stored), else the stored ``sweep.budget``,
    else the study file's ``trials`` (then stored, so later workers agree)."""
    stored = study.user_attrs.get("sweep.budget")
    budget = trials or stored or spec.trials
    if budget != stored:
        study.set_user_attr("sweep.budget", budget)
    return budget


def launch(spec: StudySpec, opts: LaunchOptions) -> LaunchResult:
    study, ctx = prepare(spec, opts)
    # launch's default is the study file's budget (a worker's is the stored one).
    budget = resolve_budget(study, spec, opts.trials or spec.trials)
    used = budget_used(study)
    if used >= budget:
        return LaunchResult(f"study {spec.name!r} has used its budget ({used}/{budget} trials): "
                            f"nothing to run; raise it with --trials N\n"
                            + summary(study, opts.tracking_uri, budget, used))
    bar = TrialBar(budget, used, opts.quiet)
    try:
        report = run_worker(study, ctx, budget, on_trial=bar)
    finally:
        bar.close()
    text = summary(study, opts.tracking_uri, budget, budget_used(study))
    if report.interrupted_by is not None:
        return LaunchResult("interrupted: the running trial was marked FAIL (KILLED in MLflow) "
                            "and will be retried by the next launch\n" + text,
                            128 + report.interrupted_by)
    return LaunchResult(text)


def work(spec: StudySpec, opts: LaunchOptions, log=print) -> LaunchResult:
    """``sweep worker``: one of many processes pulling trials from a shared study until its total
    budget is used. ``log`` receives one line per finished trial (batch jobs' output files)."""
    import os
    import socket

    from sweep.orchestration.status import reconcile

    study, ctx = prepare(spec, opts)
    # Every worker builds its sampler from the study's seed; unseeded, N workers would propose
    # the same N parameter sets in lockstep. (A parallel sweep is not reproducible anyway.)
    study.sampler.reseed_rng()
    budget = resolve_budget(study, spec, opts.trials)
    fixed = reconcile(study, ctx.tracker, ctx.experiment_id)
    me = f"{socket.gethostname()}:{os.getpid()}"
    if fixed.failed_trials or fixed.ended_runs:
        log(f"worker {me}: failed stale trial(s) {fixed.failed_trials}, ended "
            f"{len(fixed.ended_runs)} stale MLflow run(s)")

    def on_trial(number, outcome):
        value = f" value {outcome.value:.4f}" if outcome.value is not None else ""
        why = f": {mask_url(outcome.detail)}" if outcome.state.name == "FAIL" and outcome.detail else ""
        log(f"worker {me}: trial #{number} {outcome.state.name.lower()}{value}{why}")

    report = run_worker(study, ctx, budget, on_trial=on_trial)
    used = budget_used(study)
    if report.interrupted_by is not None:
        return LaunchResult(f"worker {me}: interrupted; a trial it was training was marked FAIL "
                            f"(KILLED in MLflow) and re-enqueued; {used}/{budget} trials used",
                            128 + report.interrupted_by)
    return LaunchResult(f"worker {me}: done, ran {len(report.ran)} trial(s); study "
                        f"{spec.name!r} has used {used}/{budget} trials")
