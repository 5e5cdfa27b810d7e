"""Fused trials in the study loop (issue 11): `train.fuse` in study files, and real launches
(`sweep launch` in a subprocess, real SQLite and MLflow stores, real resnet8 training on tiny
data) in which every slot of a pack is a whole trial of its own.

The fused pack's arithmetic (a slot equals the unfused trial) is tested beside the training core;
here: what Optuna and MLflow hold afterwards, pruning and refill, budgets, and signals.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import optuna
import pytest
from mlflow.tracking import MlflowClient
from optuna.trial import TrialState

from sweep.errors import StudyFileError
from sweep.study.spec import load_study, parse_study

from helpers import check_smoke_stores

REPO = Path(__file__).resolve().parent.parent


def env(**extra) -> dict:
    return {**os.environ, "PYTHONWARNINGS": "ignore", "SWEEP_HEARTBEAT_INTERVAL": "1",
            "SWEEP_GRACE_PERIOD": "3", "PYTHONPATH": str(REPO), **extra}


def launch(folder: Path, data: Path, *args: str, timeout: float = 600, quiet: bool = True):
    return subprocess.run([sys.executable, "-m", "sweep.cli", "launch", *(["--quiet"] * quiet),
                           "--data-dir", str(data), *args],
                          cwd=folder, capture_output=True, text=True, timeout=timeout, env=env())


# --- the study file key -------------------------------------------------------------------------

def test_fuse_defaults_to_one_and_takes_a_count_or_auto():
    assert load_study("smoke", ["train.fuse=1"]).train.fuse == 1
    assert parse_study("trials: 1\nspace: {warmup_steps: 0, base_lr: 0.1, scheduler: {cosine: {}}}",
                       "t.yaml", Path("t.yaml")).train.fuse == 1
    assert load_study("smoke", ["train.fuse=3"]).train.fuse == 3
    assert load_study("smoke", ["train.fuse=auto"]).train.fuse == "auto"


@pytest.mark.parametrize("value, problem", [
    ("0", "train.fuse (--set): must be >= 1 or auto, got 0"),
    ("-2", "must be >= 1 or auto, got -2"),
    ("1.5", "train.fuse (--set): must be an integer or auto, got 1.5"),
    ("many", "must be an integer or auto, got 'many'"),
    ("true", "must be an integer or auto, got True"),
])
def test_bad_fuse_values_name_the_key(value, problem):
    with pytest.raises(StudyFileError) as err:
        load_study("smoke", [f"train.fuse={value}"])
    assert problem in str(err.value)


def test_bad_fuse_on_the_command_line_is_one_line_and_writes_nothing(tmp_path, tiny_cifar):
    proc = launch(tmp_path, tiny_cifar, "--study", "smoke", "--set", "train.fuse=0")
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        f"error: {REPO / 'studies' / 'smoke.yaml'}: train.fuse (--set): must be >= 1 or auto, "
        f"got 0"]
    assert not list(tmp_path.iterdir())


def test_pack_capacity_is_bounded_by_the_budget_and_auto_is_one_on_the_cpu(capsys):
    import torch

    from sweep.training.capacity import pack_capacity

    cpu = torch.device("cpu")
    train = load_study("smoke", ["train.fuse=3"]).train
    assert pack_capacity(train, cpu, remaining=10) == 3
    assert pack_capacity(train, cpu, remaining=2) == 2  # never more slots than trials left
    assert pack_capacity(train, cpu, remaining=0) == 1
    auto = load_study("smoke", ["train.fuse=auto"]).train
    assert pack_capacity(auto, cpu, remaining=10) == 1  # measured: fusion does not pay on CPU
    assert capsys.readouterr().err == ""


def test_one_trial_trains_as_a_pack_on_cuda_only():
    """K = 1 gets the pack's CUDA-graph step on CUDA; on the CPU it trains through train()."""
    import torch

    from sweep.training.capacity import trains_as_pack

    train = load_study("smoke").train
    assert not trains_as_pack(train, torch.device("cpu"), 1)
    assert trains_as_pack(train, torch.device("cpu"), 2)
    assert trains_as_pack(train, torch.device("cuda"), 1)  # a device name; nothing runs on it


def test_compile_applies_to_packs_and_auto_means_cuda_only():
    """train.compile compiles the pack's step (issue 18): it no longer forces one trial at a
    time; auto (the default) is on for CUDA only."""
    import torch

    from sweep.training.capacity import pack_capacity, trains_as_pack
    from sweep.training.train import compiles

    train = load_study("smoke", ["train.compile=true", "train.fuse=4"]).train
    cuda, cpu = torch.device("cuda"), torch.device("cpu")  # device names: nothing runs on them
    assert pack_capacity(train, cuda, remaining=10) == 4
    assert trains_as_pack(train, cuda, 1) and trains_as_pack(train, cpu, 2)
    assert load_study("smoke").train.compile == "auto"
    assert [compiles(s, cuda) for s in (True, False, "auto")] == [True, False, True]
    assert [compiles(s, cpu) for s in (True, False, "auto")] == [True, False, False]


def test_auto_k_is_the_knee_of_the_measured_throughput():
    from sweep.training.capacity import MEASURED_THROUGHPUT, throughput_knee

    assert throughput_knee(MEASURED_THROUGHPUT) == 16  # K=32: only 6% over K=16 (H100)
    assert throughput_knee({1: 10.0, 8: 50.0, 16: 52.0}) == 8
    assert throughput_knee({1: 10.0, 8: 50.0, 16: 100.0}) == 16


@pytest.mark.gpu
def test_auto_fuse_on_cuda_fits_memory_and_the_rule():
    import torch

    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    from sweep.training.capacity import auto_fuse

    device = torch.device("cuda")
    k = auto_fuse(device, "resnet20", 1, 128)
    assert 1 <= k <= 16
    free, _ = torch.cuda.mem_get_info(device)
    assert auto_fuse(device, "resnet20", 1, 128) == k  # measuring leaves nothing allocated
    assert torch.cuda.mem_get_info(device)[0] >= free * 0.95


def test_heartbeat_beats_every_live_trial_of_a_pack(tmp_path):
    """One heartbeat thread beats all the trials added to it, and stops beating a discarded one
    (real SQLite storage; Optuna's own stale-trial query is the judge)."""
    from sweep.stores.heartbeat import Heartbeat

    storage = optuna.storages.RDBStorage(f"sqlite:///{tmp_path}/o.db", heartbeat_interval=1,
                                         grace_period=2)
    study = optuna.create_study(storage=storage)
    trials = [study.ask() for _ in range(3)]
    beat = Heartbeat(storage, trials[0]._trial_id)
    beat.add(trials[1]._trial_id)
    beat.add(trials[2]._trial_id)
    try:
        _wait_until(lambda: _beaten(tmp_path / "o.db") == {t._trial_id for t in trials})
        beat.discard(trials[2]._trial_id)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            stale = set(storage._get_stale_trial_ids(study._study_id))
            if trials[2]._trial_id in stale:
                break
            time.sleep(0.5)
        assert trials[2]._trial_id in stale  # never beaten: stale past the grace period
        assert trials[0]._trial_id not in stale and trials[1]._trial_id not in stale
    finally:
        beat.stop()


def _beaten(db: Path) -> set[int]:
    import sqlite3

    with sqlite3.connect(db) as conn:
        return {row[0] for row in conn.execute("SELECT trial_id FROM trial_heartbeats")}


def _wait_until(cond, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "condition never held"
        time.sleep(0.2)


# --- a fused smoke study end to end ------------------------------------------------------------

@pytest.mark.slow
def test_fused_smoke_study_keeps_every_trial_whole(tmp_path, shared_cifar):
    """The e2e smoke launch with 3 trials fused: the same checks as unfused (each trial its own
    run, lr/train_loss every step equal to torch's schedulers, val metrics equal to Optuna's
    intermediate values, test_acc, LR curve), plus the pack tags."""
    proc = launch(tmp_path, shared_cifar, "--study", "smoke", "--trials", "6",
                  "--set", "train.epochs=3", "--set", "train.fuse=3")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "study 'smoke': 6/6 trials used" in proc.stdout
    # the closing summary says where the packs' time went, and the parent run holds it
    assert "where the time went" in proc.stdout and "training steps" in proc.stdout
    runs = check_smoke_stores(tmp_path)
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path}/mlflow.db")
    parent = next(r for r in client.search_runs([client.get_experiment_by_name("smoke")
                                                 .experiment_id])
                  if r.data.tags.get("sweep.role") == "study")
    seconds = parent.data.metrics
    parts = {k: v for k, v in seconds.items() if k.startswith("pack_seconds_")
             and k not in ("pack_seconds_total", "pack_seconds_checkpoint_writer")
             and not k.startswith("pack_seconds_listener_")}
    assert seconds["pack_seconds_steps"] > 0 and seconds["pack_seconds_other"] >= 0
    assert abs(sum(parts.values()) - seconds["pack_seconds_total"]) <= \
        0.01 * seconds["pack_seconds_total"]  # the parts add up: nothing counted twice
    assert seconds["pack_seconds_listener_TrialRun"] <= seconds["pack_seconds_listeners"]
    # checkpoints: copies on the training thread (a part), files and notes on the writer thread
    assert seconds["pack_seconds_checkpoint"] > 0 and seconds["pack_seconds_checkpoint_writer"] > 0
    packs = Counter(r.data.tags["sweep.pack"] for r in runs.values())
    assert sum(packs.values()) == 6 and max(packs.values()) >= 3  # trained together
    for number, run in runs.items():
        tags = run.data.tags
        assert tags["sweep.slot"] in ("0", "1", "2")
        together = [int(n) for n in tags["sweep.pack_trials"].split(",")]
        assert number in together and len(together) >= 2
        assert all(runs[n].data.tags["sweep.pack"] == tags["sweep.pack"] for n in together)


# --- pruning and refill -------------------------------------------------------------------------

REFILL = """
name: refill
seed: 0
trials: 6
objective: {metric: val_acc, direction: maximize}
sampler: {type: random}
pruner: {type: threshold, lower: 1.01, n_warmup_steps: 1}
divergence: {loss_factor: 4.0, patience_steps: 3, reference_steps: 2}
data: {train_size: 120, val_size: 40, test_size: 40}
train: {model: resnet8, width: 1, epochs: 3, batch_size: 20, sync_every_steps: 2, fuse: 2}
space:
  warmup_steps: 0
  base_lr: {type: categorical, choices: [0.05, 1000.0]}
  # per-slot values: the trials of the one pack differ in these too (docs/search-space.md)
  weight_decay: {type: float, low: 1.0e-4, high: 1.0e-2, log: true}
  label_smoothing: {type: categorical, choices: [0.0, 0.1]}
  scheduler: {constant: {}}
"""


@pytest.mark.slow
def test_pruned_and_diverged_slots_are_refilled_within_the_budget(tmp_path, tiny_cifar):
    """LR 1000 diverges within its first epoch (a StopTraining mid-epoch), LR 0.05 is pruned by
    the threshold pruner after its second epoch (val_acc < 1.01 always): every freed seat is
    taken by the next trial of the study, in the same pack, until the budget of 6 is spent."""
    study_file = tmp_path / "refill.yaml"
    study_file.write_text(REFILL)
    proc = launch(tmp_path, tiny_cifar, "--study", str(study_file))
    assert proc.returncode == 0, proc.stderr[-3000:]
    study = optuna.load_study(study_name="refill", storage=f"sqlite:///{tmp_path}/sweep.db")
    trials = study.get_trials()
    assert len(trials) == 6 and all(t.state == TrialState.PRUNED for t in trials)
    reasons = {t.params["base_lr"]: set() for t in trials}
    for t in trials:
        reasons[t.params["base_lr"]].add(t.user_attrs["prune_reason"])
    assert reasons.get(1000.0) == {"diverged"} and reasons.get(0.05) == {"pruner"}, reasons

    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    steps_per_epoch = 120 // 20
    pack_ids, seats = set(), Counter()
    for t in trials:
        run = client.get_run(t.user_attrs["mlflow_run_id"])
        assert run.info.status == "KILLED" and run.data.tags["sweep.state"] == "PRUNED"
        pack_ids.add(run.data.tags["sweep.pack"])
        seats[run.data.tags["sweep.slot"]] += 1
        val_acc = {m.step: m.value for m in client.get_metric_history(run.info.run_id, "val_acc")}
        assert val_acc == t.intermediate_values
        lrs = client.get_metric_history(run.info.run_id, "lr")
        assert lrs and all(m.value == t.params["base_lr"] for m in lrs)  # constant, its own
        for name in ("weight_decay", "label_smoothing"):  # MLflow's params are Optuna's
            assert float(run.data.params[name]) == t.params[name]
        if t.user_attrs["prune_reason"] == "pruner":  # two whole epochs, then the pruner
            assert sorted(val_acc) == [0, 1] and t.user_attrs["prune_epoch"] == 1
            assert sorted(m.step for m in lrs) == list(range(2 * steps_per_epoch))
        else:  # stopped inside its first epoch: no epoch reported, its steps up to the stop
            assert val_acc == {} and t.user_attrs["prune_epoch"] == 0
            assert len(lrs) < steps_per_epoch
    # One pack ran the whole study: trials 2..5 took the seats 0 and 1 that others freed.
    assert len(pack_ids) == 1 and set(seats) == {"0", "1"} and sum(seats.values()) == 6
    assert len({t.params["weight_decay"] for t in trials}) == 6  # six decays, one pack


def test_each_slot_of_a_pack_shows_its_own_epoch_bar(tmp_path, tiny_cifar):
    """Without --quiet a fused trial shows its epochs as an unfused one does, on the console row
    of its seat (a pack would otherwise be silent until its first trial ends)."""
    study_file = tmp_path / "bars.yaml"
    study_file.write_text(REFILL.replace("name: refill", "name: bars").replace("trials: 6", "trials: 2")
                          .replace("{type: categorical, choices: [0.05, 1000.0]}", "0.05")
                          .replace("pruner: {type: threshold, lower: 1.01, n_warmup_steps: 1}",
                                   "pruner: {type: none}"))
    proc = launch(tmp_path, tiny_cifar, "--study", str(study_file), quiet=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    shown = proc.stderr.replace("\r", "\n")
    for number in (0, 1):
        assert f"trial {number} epochs: 100%" in shown, shown[-3000:]


# --- several fused workers (Ctrl-C, SIGTERM and SIGKILL of a pack: tests/test_interrupt.py) -

@pytest.mark.slow
def test_two_fused_workers_on_one_sqlite_storage_keep_the_budget_exact(tmp_path, tiny_cifar):
    """`--workers 2` with fuse 3 on a budget of 7 (not a multiple of anything): exactly 7 trials
    count, each with exactly one ended run; the later packs shrink to fit."""
    from helpers import TINY, check_consistent, plain_storage, trial_runs

    storage, tracking = f"sqlite:///{tmp_path}/optuna.db", f"sqlite:///{tmp_path}/mlflow.db"
    done = subprocess.run(
        [sys.executable, "-m", "sweep.cli", "launch", "--study", str(TINY), "--workers", "2",
         "--trials", "7", "--storage", storage, "--tracking-uri", tracking, "--quiet",
         "--set", "train.fuse=3", "--set", "train.epochs=2"],
        cwd=tmp_path, capture_output=True, text=True, timeout=600,
        env=env(SWEEP_DATA_DIR=str(tiny_cifar)))
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    study = optuna.load_study(study_name="tiny", storage=plain_storage(storage))
    runs = trial_runs(tracking, "tiny")
    check_consistent(study, runs, 7)
    assert len({r.data.tags["sweep.pack"] for r in runs}) >= 2  # both workers fused
    assert all(math.isfinite(t.value) for t in study.trials if t.state == TrialState.COMPLETE)
