"""``sweep launch --workers N``: N ``sweep worker`` processes on this machine, one shared study.

Order matters: the parent creates the Optuna storage, the study, the MLflow store, experiment
and parent run *before* spawning anyone (fresh SQLite/MLflow stores created by several
processes at once corrupt or crash), and fetches the data once (no download race). Workers
then only open existing stores.

Children run in their own session, so a Ctrl-C in the terminal reaches only the parent, which
forwards exactly one SIGINT/SIGTERM to each child (a second one would make them exit at once).
Storage URLs travel in the environment (``SWEEP_STORAGE``, ``MLFLOW_TRACKING_URI``), never on
command lines that ``ps`` shows to every user.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from sweep.views.console import summary
from sweep.training.data import locate
from sweep.errors import DeviceError
from sweep.orchestration.launch import LaunchOptions, LaunchResult, resolve_budget, study_params
from sweep.study.spec import StudySpec
from sweep.orchestration.storage import check_storage_url, open_storage
from sweep.orchestration.tracking import Tracker, check_tracking_uri
from sweep.training.train import resolve_device
from sweep.orchestration.worker import budget_used, open_study


def device_assignments(workers: int, per_device: int, gpus: int) -> list[str | None]:
    """``CUDA_VISIBLE_DEVICES`` for each worker: ``per_device`` consecutive workers share a GPU,
    GPUs are reused round-robin when there are more workers; None (inherit) without GPUs."""
    if gpus <= 0:
        return [None] * workers
    return [str((i // per_device) % gpus) for i in range(workers)]


@dataclass(frozen=True)
class PoolOptions:
    workers: int
    per_device: int = 1
    study_arg: str = ""          # what the workers get as --study (an absolute file path)
    overrides: tuple[str, ...] = ()


def create_stores(spec: StudySpec, opts: LaunchOptions, check_device: bool = True):
    """Validate, then create storage + study + experiment + parent run; returns (study, budget,
    tracker, experiment_id, device). What every later worker only opens. ``check_device=False``
    where the workers run elsewhere (``sweep submit`` on a login node without GPUs)."""
    try:
        device = resolve_device(opts.device if check_device else "cpu")
    except ValueError as err:
        raise DeviceError(str(err)) from None
    check_storage_url(opts.storage)
    check_tracking_uri(opts.tracking_uri)
    locate(opts.data_dir)  # finds (or downloads once) the data before anything is created
    study = open_study(spec, open_storage(opts.storage), opts.allow_space_change)
    budget = resolve_budget(study, spec, opts.trials)
    tracker = Tracker(opts.tracking_uri)
    experiment_id = tracker.experiment_id(spec.name)
    tracker.study_run(experiment_id, spec.name, study_params(spec, opts), Path(spec.path))
    return study, budget, tracker, experiment_id, device


def worker_command(spec: StudySpec, opts: LaunchOptions, pool: PoolOptions) -> list[str]:
    cmd = [sys.executable, "-m", "sweep.cli", "worker", "--study", pool.study_arg or str(spec.path),
           "--device", opts.device, "--quiet"]
    for item in pool.overrides:
        cmd += ["--set", item]
    if opts.data_dir:
        cmd += ["--data-dir", os.path.abspath(opts.data_dir)]
    if opts.allow_space_change:
        cmd.append("--allow-space-change")
    return cmd


def launch_pool(spec: StudySpec, opts: LaunchOptions, pool: PoolOptions) -> LaunchResult:
    from sweep.orchestration.status import reconcile

    study, budget, tracker, experiment_id, device = create_stores(spec, opts)
    reconcile(study, tracker, experiment_id)
    used = budget_used(study)
    if used >= budget:
        return LaunchResult(f"study {spec.name!r} has used its budget ({used}/{budget} trials): "
                            f"nothing to run; raise it with --trials N\n"
                            + summary(study, opts.tracking_uri, budget, used))
    gpus = 0
    if device.type == "cuda":
        import torch

        gpus = torch.cuda.device_count()
    env = dict(os.environ, SWEEP_STORAGE=opts.storage, MLFLOW_TRACKING_URI=opts.tracking_uri,
               PYTHONUNBUFFERED="1")
    if opts.data_dir:
        env["SWEEP_DATA_DIR"] = os.path.abspath(opts.data_dir)
    if device.type == "cpu" and "OMP_NUM_THREADS" not in os.environ:
        # N workers each using every core oversubscribe the CPU: torch's threads then spin
        # against each other (3-10x slower steps measured here); split the cores instead.
        env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // pool.workers))
    cmd = worker_command(spec, opts, pool)
    if device.type == "cuda" and gpus > 0:
        cmd[cmd.index("--device") + 1] = "cuda"  # each child sees only its own GPU as cuda:0
    children: list[subprocess.Popen] = []
    received: list[int] = []

    def forward(signum, frame):
        received.append(signum)
        for child in children:
            if child.poll() is None:
                child.send_signal(signum)

    old = {sig: signal.signal(sig, forward) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        for visible in device_assignments(pool.workers, pool.per_device, gpus):
            child_env = dict(env)
            if visible is not None:
                child_env["CUDA_VISIBLE_DEVICES"] = visible
            children.append(subprocess.Popen(cmd, env=child_env, start_new_session=True))
            if received:  # a signal arrived while spawning: the new child gets it too
                children[-1].send_signal(received[0])
        codes = [child.wait() for child in children]
    finally:
        for sig, handler in old.items():
            signal.signal(sig, handler)
    text = summary(study, opts.tracking_uri, budget, budget_used(study))
    if received:
        return LaunchResult("interrupted: running trials were marked FAIL (KILLED in MLflow) and "
                            "will be retried by the next launch\n" + text, 128 + received[0])
    bad = [c for c in codes if c != 0]
    if bad:
        return LaunchResult(f"{len(bad)} of {len(codes)} workers failed (exit {bad[0]})\n" + text,
                            1)
    return LaunchResult(text)
