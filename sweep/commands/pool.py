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
from dataclasses import dataclass

from sweep.loop import budget_used, update_parent_run

from sweep.loop import reconcile_study
from sweep.record import launch_lines
from sweep.commands.launch import (Display, LaunchOptions, LaunchResult, nothing_to_run,
    open_study_stores, worker_command)
from sweep.study.specs import StudySpec


@dataclass(frozen=True)
class PoolOptions:
    workers: int
    per_device: int = 1
    overrides: tuple[str, ...] = ()  # --set items (and the seed) every worker repeats


def device_assignments(workers: int, per_device: int, gpus: int) -> list[str | None]:
    """``CUDA_VISIBLE_DEVICES`` for each worker: ``per_device`` consecutive workers share a GPU,
    GPUs are reused round-robin when there are more workers; None (inherit) without GPUs."""
    if gpus <= 0:
        return [None] * workers
    return [str((i // per_device) % gpus) for i in range(workers)]


def worker_environments(opts: LaunchOptions, pool: PoolOptions, gpus: int,
                        on_cpu: bool) -> list[dict[str, str]]:
    """The environment of each pool worker: the URLs (never on a command line), its GPU
    (``device_assignments``) and, on the CPU, its share of the cores."""
    env = dict(os.environ, SWEEP_STORAGE=opts.storage, MLFLOW_TRACKING_URI=opts.tracking_uri,
               PYTHONUNBUFFERED="1")
    if on_cpu and "OMP_NUM_THREADS" not in os.environ:
        # N workers each using every core oversubscribe the CPU: torch's threads then spin
        # against each other (3-10x slower steps measured here); split the cores instead.
        env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // pool.workers))
    envs = []
    for visible in device_assignments(pool.workers, pool.per_device, gpus):
        envs.append(dict(env, CUDA_VISIBLE_DEVICES=visible) if visible is not None else dict(env))
    return envs


def launch_pool(spec: StudySpec, opts: LaunchOptions, pool: PoolOptions,
                display: Display) -> LaunchResult:
    stores = open_study_stores(spec, opts, load_data=False)
    study, budget = stores.study, stores.budget
    reconcile_study(study, stores.tracker, stores.experiment_id)
    done = nothing_to_run(spec, stores, display)
    if done is not None:
        return done
    gpus = 0
    if stores.device.type == "cuda":
        import torch

        gpus = torch.cuda.device_count()
    # each child sees only its own GPU, as cuda:0
    cmd = worker_command(spec, opts, pool.overrides, "cuda" if gpus > 0 else None)
    envs = worker_environments(opts, pool, gpus, stores.device.type == "cpu")
    children: list[subprocess.Popen] = []
    received: list[int] = []

    def forward(signum, frame):
        # Once: each worker's own bounded stop does the rest. A second signal would make every
        # worker skip its orderly end for its last words, and under SLURM the workers get the
        # job's SIGTERM directly as well.
        received.append(signum)
        if len(received) > 1:
            return
        for child in children:
            if child.poll() is None:
                child.send_signal(signum)

    old = {sig: signal.signal(sig, forward) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        for env in envs:
            children.append(subprocess.Popen(cmd, env=env, start_new_session=True))
            if received:  # a signal arrived while spawning: the new child gets it too
                children[-1].send_signal(received[0])
        codes = [child.wait() for child in children]
    finally:
        for sig, handler in old.items():
            signal.signal(sig, handler)
    update_parent_run(study, stores.tracker, stores.experiment_id, stores.parent_run_id)
    text = "\n".join([display.closing(study, budget, budget_used(study)),
                      *launch_lines(stores.tracker, stores.experiment_id, spec.name)])
    if received:
        return LaunchResult("interrupted: running trials were marked FAIL (KILLED in MLflow) and "
                            "will be retried by the next launch\n" + text, 128 + received[0])
    bad = [c for c in codes if c != 0]
    if bad:
        return LaunchResult(f"{len(bad)} of {len(codes)} workers failed (exit {bad[0]})\n" + text,
                            1)
    return LaunchResult(text)
