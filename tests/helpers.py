"""Plain helpers several test files share (fixtures are in conftest.py). One import style:
``from helpers import ...`` (pytest puts this folder on sys.path, as for conftest)."""

from __future__ import annotations

import json
import os
import pickle
import signal
import socket
import subprocess
import sys
import time
import zlib
from collections import Counter
from pathlib import Path

import numpy as np
import optuna
import pytest
import yaml
from optuna.trial import TrialState

REPO = Path(__file__).resolve().parent.parent
TINY = REPO / "tests" / "studies" / "tiny.yaml"  # trials cost well under a second each

PG_PASSWORD = "pw-Zq81-secret"  # the test PostgreSQL role's; tests grep every output for it


def spool_records(path: Path) -> list[dict]:
    """The whole records of a spool file, read here by the format's own definition (docs/record.md:
    compact JSON, a tab, its CRC-32 as 8 hex digits, a newline; or a plain JSON line of the old
    format), not with the spool's reader: a torn or damaged line is left out."""
    out = []
    for line in path.read_bytes().split(b"\n")[:-1]:  # the last piece has no newline: torn
        body, tab, crc = line.rpartition(b"\t")
        if tab and crc != b"%08x" % zlib.crc32(body):
            continue
        try:
            out.append(json.loads(body if tab else line))
        except ValueError:
            continue
    return out


def write_cifar(root: Path, per_batch: int = 40, test: int = 40, seed: int = 0) -> Path:
    """Write a CIFAR-10 folder in the official pickle format with ``per_batch`` records per
    training batch. Images are class-dependent noise, so a model can learn something."""
    rng = np.random.default_rng(seed)
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True, exist_ok=True)

    def batch(n: int) -> dict:
        labels = rng.integers(0, 10, n)
        base = (labels[:, None] * 23 % 256).astype(np.int16)
        data = np.clip(base + rng.integers(-40, 40, (n, 3072)), 0, 255).astype(np.uint8)
        return {"data": data, "labels": labels.tolist(), "batch_label": "synthetic"}

    for i in range(1, 6):
        with open(folder / f"data_batch_{i}", "wb") as f:
            pickle.dump(batch(per_batch), f)
    with open(folder / "test_batch", "wb") as f:
        pickle.dump(batch(test), f)
    return root


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --- a real MLflow tracking server, killed and restarted -----------------------------------------

def start_mlflow_server(backend: str, port: int, artifacts: Path) -> subprocess.Popen:
    """``mlflow server`` on a fixed port (backend store URI, artifact folder), as ``sweep ui``
    starts it, once /health answers. Not ``ui.mlflow_server``: its free-port check refuses a port the killed server's
    connections still hold in TIME_WAIT, which the server itself (SO_REUSEADDR) takes."""
    import urllib.request

    proc = subprocess.Popen([sys.executable, "-m", "mlflow", "server", "--backend-store-uri",
                             backend, "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
                             "--serve-artifacts", "--artifacts-destination", str(artifacts)],
                            env={**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"},
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        assert proc.poll() is None, "mlflow server exited"
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2):
                return proc
        except OSError:
            time.sleep(0.2)
    raise AssertionError("mlflow server did not start")


def bench_tracking():
    """``scripts/bench_tracking.py`` as a module (its feed, its /proc walk), loaded once."""
    import importlib.util

    if "bench_tracking" not in sys.modules:
        spec = importlib.util.spec_from_file_location("bench_tracking",
                                                      REPO / "scripts" / "bench_tracking.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules["bench_tracking"] = module  # dataclasses look their module up while defined
        spec.loader.exec_module(module)
    return sys.modules["bench_tracking"]


def kill_tree(proc: subprocess.Popen) -> None:
    """SIGKILL a process and everything below it (a server's workers hold its socket)."""
    for pid in [*bench_tracking().descendants(proc.pid), proc.pid]:  # uvicorn's worker holds the socket
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait()


# --- sweep processes and what they leave in the stores ------------------------------------------

def sweep_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "sweep.cli", *args]


def sweep_env(data_dir: Path) -> dict:
    """The environment of a sweep process in the tests: the data folder, fast heartbeats. The
    grace period leaves room for a loaded 2-core CI machine, where four workers' SQLite writes
    can hold a healthy worker's beat back for seconds; dead local workers are found by pid at
    once anyway, so no test here waits for it."""
    return dict(os.environ, SWEEP_DATA_DIR=str(data_dir), SWEEP_HEARTBEAT_INTERVAL="1",
                SWEEP_GRACE_PERIOD="10", PYTHONUNBUFFERED="1", PYTHONPATH=str(REPO))


def submit_tiny_array(data_dir: Path, slurm_conf: str, folder: Path, storage: str,
                      tracking_uri: str, tasks: int, budget: int, *sets: str) -> tuple[str, str, dict]:
    """``sweep submit`` of the TINY study as an array of ``tasks`` on the test cluster (one CPU
    each, ``--set`` flags ``sets``); returns (job id, submit's stdout+stderr, the env used)."""
    env = dict(sweep_env(data_dir), SLURM_CONF=slurm_conf)
    done = subprocess.run(
        sweep_cmd("submit", "--study", str(TINY), "--array", str(tasks), "--trials", str(budget),
                  "--storage", storage, "--tracking-uri", tracking_uri, "--cpus-per-task", "1",
                  "--time", "00:10:00", "--data-dir", str(data_dir), "--python", sys.executable,
                  *[arg for s in sets for arg in ("--set", s)]),
        env=env, cwd=folder, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stdout + done.stderr
    return submitted_job(done.stdout), done.stdout + done.stderr, env


def submitted_job(said: str) -> str:
    """The job id in ``sweep submit``'s answer ("submitted job 42: array of ...")."""
    return said.split("submitted job ", 1)[1].split(":")[0]


def plain_storage(url: str):
    """The study's storage opened without heartbeats (a reader, like `sweep status`)."""
    if url.startswith("journal:///"):
        from optuna.storages.journal import JournalFileBackend, JournalStorage

        return JournalStorage(JournalFileBackend(url[len("journal://"):]))
    return optuna.storages.RDBStorage(url)


def trial_runs(tracking_uri: str, study_name: str) -> list:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri)
    experiment = client.get_experiment_by_name(study_name)
    return client.search_runs([experiment.experiment_id], "tags.`sweep.role` = 'trial'",
                              max_results=1000)


def check_consistent(study: optuna.Study, runs: list, budget: int) -> None:
    """The budget is met exactly; nothing RUNNING; each trial has exactly one ended run."""
    from sweep.loop.budget import budget_used, counted

    trials = study.get_trials(deepcopy=False)
    assert budget_used(study) == budget
    assert not [t.number for t in trials if t.state == TrialState.RUNNING]
    assert not [r.info.run_id for r in runs if r.info.status == "RUNNING"]
    per_trial = Counter(int(r.data.tags["sweep.trial_number"]) for r in runs)
    assert max(per_trial.values()) == 1, f"a trial has several runs: {per_trial}"
    numbers = [t.number for t in counted(trials)]
    missing = [n for n in numbers if per_trial.get(n) != 1]
    assert not missing, f"finished trials without an MLflow run: {missing}"
    by_number = {int(r.data.tags["sweep.trial_number"]): r for r in runs}
    for t in counted(trials):
        expected = {TrialState.COMPLETE: "COMPLETE", TrialState.FAIL: "FAIL",
                    TrialState.PRUNED: "PRUNED"}[t.state]
        assert by_number[t.number].data.tags["sweep.state"] == expected


def has_trials(path: Path) -> bool:
    """Whether the SQLite storage at ``path`` exists and holds a trial (read-only look)."""
    import sqlite3

    try:
        with sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=5) as conn:
            return conn.execute("SELECT count(*) FROM trials").fetchone()[0] > 0
    except sqlite3.Error:
        return False


def in_training(t) -> bool:
    """Running, its worker's pid recorded, and mid-training: it has reported its first epoch
    and (the tests train 4 epochs) has three more to go, so a signal lands inside training."""
    return (t.state == TrialState.RUNNING and bool(t.user_attrs.get("pid"))
            and len(t.intermediate_values) == 1)


def wait_running(storage, study_name: str, exclude: set[int], deadline: float):
    """A trial ``in_training`` not in ``exclude``."""
    while True:
        try:
            study = optuna.load_study(study_name=study_name, storage=storage)
            break
        except KeyError:  # the launcher has not created it yet
            assert time.time() < deadline, "the study was never created"
            time.sleep(0.2)
    while time.time() < deadline:
        for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
            # A retry is not retried again (once is enough): pick originals only.
            if in_training(t) and t.number not in exclude \
                    and not t.system_attrs.get("retry_history"):
                return t
        time.sleep(0.05)
    raise AssertionError("no running trial appeared")


def wait_array_ended(job: str, env: dict, deadline: float) -> None:
    """Return once every task of SLURM array ``job`` has ended (squeue lists it until then)."""
    # Asked at least once, and at least 60 s from now: a caller whose own earlier wait ate the
    # window (a loaded machine) must not fail here without squeue having been asked.
    deadline = max(deadline, time.time() + 60)
    queued = ""
    while True:
        done = subprocess.run(["squeue", "-h", "-j", job, "-o", "%i %T %r"], env=env,
                              capture_output=True, text=True, timeout=60)
        queued = (f"squeue exit {done.returncode}: "
                  f"{done.stdout.strip() or done.stderr.strip() or '(nothing printed)'}")
        # An empty listing counts only from a squeue that answered: a controller slow to answer
        # (a loaded machine) also prints nothing on stdout, and the array has not ended then.
        if done.returncode == 0 and not done.stdout.strip():
            return
        if time.time() >= deadline:
            break
        time.sleep(1)
    pytest.fail(f"array {job} still queued: {queued}")


def queue_state(job: str, env: dict, jobs_dir) -> str:
    """What squeue says of ``job`` and the tail of its outputs: the message of a wait that failed."""
    done = subprocess.run(["squeue", "-h", "-j", job, "-o", "%i %T %r"], env=env,
                          capture_output=True, text=True, timeout=60)
    outputs = "\n".join(p.read_text() for p in sorted(jobs_dir.glob("*.out")))
    return f"squeue: {done.stdout.strip() or done.stderr.strip()!r}; outputs: {outputs[-2000:]}"


# --- the LR reference from torch's own scheduler classes ----------------------------------------

def torch_lr_reference(main, base_lrs, warmup: int, steps_per_epoch: int, total: int,
                       f0: float = 0.01, per_epoch: bool = False,
                       val_losses: list[float] | None = None) -> list[list[float]]:
    """``curve[t][g]``: the LR of group g at optimizer step t, built as ``SequentialLR`` would run
    it: for t < W a ``LinearLR`` from ``f0`` on a one-parameter-per-group SGD; from W on a fresh
    optimizer at the base LRs whose main scheduler ``main(opt, total - W)`` was stepped t - W
    times (per-epoch schedulers: once per epoch). With ``val_losses`` the main scheduler is
    ReduceLROnPlateau, stepped with the loss of every epoch e whose end (e + 1) x S is not inside
    warmup (an epoch ending exactly at W included); a missing loss feeds nothing."""
    import torch
    from torch.optim import lr_scheduler as tl

    def optimizer():
        groups = [{"params": [torch.nn.Parameter(torch.zeros(1))], "lr": lr} for lr in base_lrs]
        return torch.optim.SGD(groups, lr=base_lrs[0])

    def lrs(opt):
        return [float(g["lr"]) for g in opt.param_groups]

    S, curve = steps_per_epoch, []
    if warmup:
        opt = optimizer()
        ramp = tl.LinearLR(opt, start_factor=f0, end_factor=1.0, total_iters=warmup)
        for _ in range(warmup):
            curve.append(lrs(opt))
            opt.step()
            ramp.step()
    opt = optimizer()
    scheduler = main(opt, total - warmup)
    if val_losses is not None and warmup % S == 0 and warmup and warmup // S - 1 < len(val_losses):
        scheduler.step(val_losses[warmup // S - 1])  # the epoch that ends exactly at W is fed
    for t in range(warmup, total):
        curve.append(lrs(opt))
        opt.step()
        tau = t - warmup
        if val_losses is not None:
            if (t + 1) % S == 0 and t // S < len(val_losses):
                scheduler.step(val_losses[t // S])
        elif t < total - 1 and (not per_epoch or (tau + 1) % S == 0):
            scheduler.step()  # OneCycleLR refuses a step past total_steps
    return curve


# --- a smoke launch, checked end to end ---------------------------------------------------------

def smoke_lr_reference(params: dict, steps_per_epoch: int, total: int,
                       val_losses: list[float]) -> list[float]:
    """The LR of every step of a smoke trial (its logged MLflow params) from torch's classes."""
    from torch.optim import lr_scheduler as tl

    S, name = steps_per_epoch, params["scheduler"]
    mains = {
        "step": lambda o, n: tl.StepLR(o, int(params["step_size_epochs"]) * S,
                                       float(params["gamma"])),
        "cosine": lambda o, n: tl.CosineAnnealingLR(o, n, eta_min=0.0),
        "plateau": lambda o, n: tl.ReduceLROnPlateau(o, factor=float(params["gamma"]),
                                                     patience=int(params["patience_epochs"])),
    }
    assert name in mains, f"no reference for {name}"
    curve = torch_lr_reference(mains[name], (float(params["base_lr"]),),
                               int(params["warmup_steps"]), S, total,
                               f0=float(params.get("warmup_start_factor", 0.01)),
                               val_losses=val_losses if name == "plateau" else None)
    return [row[0] for row in curve]


def check_smoke_stores(folder, n_trials: int = 6, epochs: int = 3) -> dict:
    """Optuna and MLflow agree on every trial of a smoke launch, and every logged LR curve equals
    torch's; returns the trial runs by trial number (the fused test checks their tags too)."""
    study = optuna.load_study(study_name="smoke", storage=f"sqlite:///{folder}/sweep.db")
    trials = study.get_trials()
    assert len(trials) == n_trials
    assert all(t.state in (TrialState.COMPLETE, TrialState.PRUNED) for t in trials)
    assert any(t.state == TrialState.COMPLETE for t in trials)

    import math

    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{folder}/mlflow.db")
    experiment = client.get_experiment_by_name("smoke")
    runs = client.search_runs([experiment.experiment_id], max_results=100)
    parents = [r for r in runs if r.data.tags.get("sweep.role") == "study"]
    children = {r.info.run_id: r for r in runs if r.data.tags.get("sweep.role") == "trial"}
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    assert len(children) == n_trials
    assert all(r.info.status != "RUNNING" for r in runs)

    smoke = yaml.safe_load((REPO / "studies" / "smoke.yaml").read_text())
    steps_per_epoch = smoke["data"]["train_size"] // smoke["train"]["batch_size"]  # whole batches
    for trial in trials:
        run = children[trial.user_attrs["mlflow_run_id"]]
        tags, params = run.data.tags, run.data.params
        assert tags["mlflow.parentRunId"] == parents[0].info.run_id
        assert tags["sweep.trial_number"] == str(trial.number)
        assert tags["optuna.study_name"] == "smoke"
        assert tags["sweep.state"] == trial.state.name
        expected_status = "FINISHED" if trial.state == TrialState.COMPLETE else "KILLED"
        assert run.info.status == expected_status
        for key in ("warmup_steps", "base_lr", "scheduler", "model", "epochs", "batch_size",
                    "steps_per_epoch", "train_size", "val_size", "optimizer", "momentum",
                    "weight_decay", "warmup_start_factor", "seed", "device"):
            assert key in params, key
        assert params["steps_per_epoch"] == str(steps_per_epoch)
        for key, value in trial.params.items():
            assert params[key] == str(value)

        val_acc = client.get_metric_history(run.info.run_id, "val_acc")
        assert {m.step: m.value for m in val_acc} == trial.intermediate_values
        val_loss = [m.value for m in sorted(client.get_metric_history(run.info.run_id, "val_loss"),
                                            key=lambda m: m.step)]
        lr = sorted(client.get_metric_history(run.info.run_id, "lr"), key=lambda m: m.step)
        epochs_run = len(val_acc)
        assert [m.step for m in lr] == list(range(epochs_run * steps_per_epoch))
        reference = smoke_lr_reference(params, steps_per_epoch, epochs * steps_per_epoch, val_loss)
        for logged, ref in zip(lr, reference):
            assert math.isclose(logged.value, ref, rel_tol=1e-9), (trial.params, logged.step)
        losses = client.get_metric_history(run.info.run_id, "train_loss")
        assert len(losses) == len(lr) and all(math.isfinite(m.value) for m in losses)
        if trial.state == TrialState.COMPLETE:
            assert trial.user_attrs["test_acc"] == run.data.metrics["test_acc"]
            assert epochs_run == epochs and "epoch_seconds" in run.data.metrics
            assert "lr_curve.png" in [a.path for a in client.list_artifacts(run.info.run_id)]
        else:
            assert trial.user_attrs["prune_reason"] in ("pruner", "diverged")
            assert tags["sweep.prune_reason"] == trial.user_attrs["prune_reason"]
    return {int(r.data.tags["sweep.trial_number"]): r for r in children.values()}
