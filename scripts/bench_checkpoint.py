#!/usr/bin/env python3
"""What trial checkpoints cost and what resumption saves.

1. ``cost``: seconds per checkpoint per trial (the real write path: training state + step record,
   ``torch.save`` to a temporary file, fsync, rename), and the file's size, for the models a
   study may train; for a fused slot also the extraction of its rows. Then one smoke-sized trial
   trained twice side by side, with and without checkpoints: the checkpoints' share of its time.
2. ``resume``: a smoke-sized study (10 epochs) run through ``sweep launch`` processes and
   interrupted with SIGTERM at random moments (seeded); counts the epochs trained in all, the
   epochs its retries did not train again because they resumed (``resumed_epochs``), and what
   the interrupted trials lost (their unfinished epochs).
3. ``pack``: a fused pack's epoch boundary, for K = 1, 8, 16, 32 ResNet-20 slots: the training
   thread's seconds (``blocking_s_median``: copying the pack off the device and handing it to
   the writer) and the writer thread's (``write_s_median``: cutting each slot from the copy, its
   file, fsync, rename, its Optuna note), side by side with the synchronous path in the same run
   (``sync_blocking_s_median``: every slot cut, written and noted on the training thread). The
   notes go to a real SQLite Optuna store. Each boundary's writes finish before the next (an
   epoch takes seconds); old and new paths alternate.

    python scripts/bench_checkpoint.py [--what cost|resume|pack|both] [--data-dir DIR]
        [--interruptions 3] [--trials 3] [--seed 0] [--threads 1] [--device cpu] [--reps 5]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import signal
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
DEFAULT_DATA = os.environ.get("SWEEP_DATA_DIR", str(REPO.parent / "shared/data/cifar10-subset"))
SMOKE_SETS = ["train.epochs=10", "train.fuse=1"]  # smoke: 1,000 images, batch 100, resnet8 x1


def _timed_saves(checkpoint):
    """``train``'s ``checkpoint`` callback that saves on the calling thread (the synchronous
    cost of one checkpoint), recording the seconds of each call."""
    seconds = []

    def save(take):
        began = time.perf_counter()
        checkpoint.save(take())
        seconds.append(time.perf_counter() - began)

    return save, seconds


def _checkpoint(folder: Path, name: str, epochs: int):
    from sweep.stores.checkpoints import TrialCheckpoint

    return TrialCheckpoint(folder / f"{name}.pt", {"bench": name}, epochs + 1, lambda n: None)


def state_cost(model: str, width: int, folder: Path, reps: int, steps: int) -> dict:
    """A state of ``model`` with its optimizer state and a record of ``steps`` steps, saved
    ``reps`` times (no training: the size and cost do not depend on the values)."""
    import torch

    from sweep.training.checkpoint import unfused_state
    from sweep.training.models import build_model

    net = build_model(model, width).to(memory_format=torch.channels_last)
    optimizer = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9, nesterov=True)
    net(torch.randn(8, 3, 32, 32).contiguous(memory_format=torch.channels_last)).sum().backward()
    optimizer.step()

    class Schedule:
        def state_dict(self):
            return {"schedule": ["cosine", 0, 10, 100], "plateau": None}

    ckpt = _checkpoint(folder, f"{model}-{width}", 10)
    ckpt.record.lrs, ckpt.record.losses = [0.1] * steps, [2.3] * steps
    save, seconds = _timed_saves(ckpt)
    generator = torch.Generator().manual_seed(0)
    for _ in range(reps):
        state = unfused_state(net, optimizer, Schedule(), generator, 1, steps, [{"val_loss": 1.0}])
        save(lambda: state)
    return {"model": f"{model} x{width}", "params": sum(p.numel() for p in net.parameters()),
            "file_mb": ckpt.path.stat().st_size / 1e6, "seconds_median": statistics.median(seconds),
            "seconds_max": max(seconds), "reps": reps, "record_steps": steps}


def slot_cost(folder: Path, k: int, reps: int) -> dict:
    """Extraction of one slot's state from a fused pack of ``k`` resnet8 x1, then its write."""
    import torch

    from sweep.study.specs import TrainSpec
    from sweep.training.data import Splits
    from sweep.training.fused_pack import Pack, PackStats, SlotJob
    from sweep.study.space import TrialConfig
    from sweep.study.schedules import ScheduleConfig
    from sweep.study.specs import DataSpec

    t = TrainSpec(model="resnet8", width=1, epochs=10, batch_size=100, bf16=False)
    x = torch.zeros(200, 3, 32, 32, dtype=torch.uint8)
    y = torch.zeros(200, dtype=torch.long)
    splits = Splits(x, y, x, y, x, y, "zeros")
    cfg = TrialConfig(0.1, ScheduleConfig("cosine"), t, DataSpec(200, 100, 100), 0, {})
    pack = Pack(t, splits, torch.device("cpu"), False, False, lambda end: None, PackStats())
    pack.start([SlotJob(cfg, []) for _ in range(k)])
    extract, write = [], []
    ckpt = _checkpoint(folder, f"slot-k{k}", 10)
    for _ in range(reps):
        began = time.perf_counter()
        state = pack.slot_state(0)
        extract.append(time.perf_counter() - began)
        began = time.perf_counter()
        ckpt.save(state)
        write.append(time.perf_counter() - began)
    return {"k": k, "extract_s_median": statistics.median(extract),
            "write_s_median": statistics.median(write), "file_mb": ckpt.path.stat().st_size / 1e6}


def trial_share(data_dir: str, folder: Path) -> dict:
    """One smoke-sized trial (10 epochs) trained with and without checkpoints, interleaved."""
    import optuna
    import torch

    from sweep.study.space import trial_config
    from sweep.study.spec import load_study
    from sweep.training.data import load_splits
    from sweep.training.train import train

    spec = load_study("smoke", SMOKE_SETS)
    cfg = trial_config(optuna.trial.FixedTrial({"scheduler": "cosine", "warmup_steps": 0,
                                                "base_lr": 0.2}), spec)
    splits = load_splits(data_dir, spec.data, torch.device("cpu"))
    runs = {"with": [], "without": []}
    saves: list[float] = []
    for rep in range(2):
        for mode in ("without", "with") if rep % 2 == 0 else ("with", "without"):
            ckpt = _checkpoint(folder, "trial", cfg.train.epochs)
            save, seconds = _timed_saves(ckpt)
            began = time.perf_counter()
            train(cfg, splits, torch.device("cpu"), [ckpt.record],
                  checkpoint=save if mode == "with" else None)
            runs[mode].append(time.perf_counter() - began)
            saves += seconds
    per_trial = statistics.median(runs["with"])
    saved_per_trial = sum(saves) / 2
    return {"trial_s_with": runs["with"], "trial_s_without": runs["without"],
            "checkpoints_per_trial": len(saves) // 2,
            "checkpoint_s_median": statistics.median(saves),
            "share_of_trial": saved_per_trial / per_trial,
            "file_mb": ckpt.path.stat().st_size / 1e6}


# --- a pack's epoch boundary: the training thread's share, then and now -----------------------

def pack_boundary(folder: Path, k: int, reps: int, device: str, record_steps: int) -> dict:
    """One pack of ``k`` ResNet-20 slots; ``reps`` boundaries each way (see the docstring)."""
    import optuna
    import torch

    from sweep.stores.checkpoint_writer import CheckpointWriter
    from sweep.stores.checkpoints import TrialCheckpoint
    from sweep.study.schedules import ScheduleConfig
    from sweep.study.space import TrialConfig
    from sweep.study.specs import DataSpec, TrainSpec
    from sweep.training.data import Splits
    from sweep.training.fused_pack import Pack, PackStats, SlotJob

    dev = torch.device(device)
    t = TrainSpec(model="resnet20", width=1, epochs=10, batch_size=100, bf16=False)
    x = torch.zeros(200, 3, 32, 32, dtype=torch.uint8, device=dev)
    y = torch.zeros(200, dtype=torch.long, device=dev)
    cfg = TrialConfig(0.1, ScheduleConfig("cosine"), t, DataSpec(200, 100, 100), 0, {})
    study = optuna.create_study(study_name=f"pack-{k}",
                                storage=f"sqlite:///{folder}/bench-notes.db")
    trials = [study.ask() for _ in range(k)]
    writer = CheckpointWriter()
    written: list[float] = []

    def slot(i: int, deferred: bool) -> TrialCheckpoint:
        note = (lambda epochs, trial=trials[i]: trial.set_user_attr("checkpoint_epochs", epochs))
        ckpt = TrialCheckpoint(folder / f"k{k}-{'new' if deferred else 'old'}-{i}.pt",
                               {"bench": i}, 10, writer.deferred(note) if deferred else note)
        ckpt.record.lrs, ckpt.record.losses = [0.1] * record_steps, [2.3] * record_steps
        return ckpt

    old, new = [slot(i, False) for i in range(k)], [slot(i, True) for i in range(k)]
    jobs = [SlotJob(cfg, [], checkpoint=lambda take, c=c: writer.save(c, take, written.append))
            for c in new]
    pack = Pack(t, Splits(x, y, x, y, x, y, "zeros"), dev, False, False, lambda end: None,
                PackStats())
    pack.start(jobs)
    for s in pack.slots:  # a state after the first epoch, with a step record to match
        s.step, s.history = record_steps, [{"val_loss": 1.0, "val_acc": 0.1}]
    sync, blocking, write = [], [], []
    for rep in range(reps):
        for mode in ("sync", "writer") if rep % 2 == 0 else ("writer", "sync"):
            began = time.perf_counter()
            if mode == "sync":  # the old path: Pack.end_epoch -> slot_state -> save, per slot
                for i, ckpt in enumerate(old):
                    ckpt.save(pack.slot_state(i))
                sync.append(time.perf_counter() - began)
                continue
            written.clear()
            pack.checkpoint_slots(range(k))
            blocking.append(time.perf_counter() - began)
            writer.flush()
            write.append(sum(written))
    writer.close()
    stored = study.trials[0].user_attrs.get("checkpoint_epochs")
    return {"k": k, "device": device, "sync_blocking_s_median": statistics.median(sync),
            "blocking_s_median": statistics.median(blocking),
            "write_s_median": statistics.median(write),
            "blocking_ratio": statistics.median(blocking) / statistics.median(sync),
            "file_mb": new[0].path.stat().st_size / 1e6, "reps": reps,
            "notes_stored": stored == 1}


# --- resumption in a study interrupted at random moments ---------------------------------------

def _epochs_running(db: Path) -> int:
    query = ("SELECT count(v.trial_id) FROM trials t JOIN trial_intermediate_values v "
             "ON v.trial_id = t.trial_id WHERE t.state = 'RUNNING'")
    try:
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as conn:
            return conn.execute(query).fetchone()[0]
    except sqlite3.Error:
        return 0


def resume_run(data_dir: str, folder: Path, trials: int, interruptions: int, seed: int,
               threads: int) -> dict:
    """Launch, SIGTERM at a random moment once a trial trains, relaunch; ``interruptions`` times,
    then to the end. Epoch counts come from the Optuna store afterwards."""
    import optuna

    rng = random.Random(seed)
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS=str(threads),
               PYTHONWARNINGS="ignore")
    cmd = [sys.executable, "-m", "sweep.cli", "launch", "--study", "smoke", "--quiet",
           "--trials", str(trials), "--data-dir", data_dir,
           *[a for s in SMOKE_SETS for a in ("--set", s)]]
    began, moments = time.perf_counter(), []
    for _ in range(interruptions):
        proc = subprocess.Popen(cmd, cwd=folder, env=env, stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE, text=True)
        while _epochs_running(folder / "sweep.db") == 0 and proc.poll() is None:
            time.sleep(0.05)
        wait = rng.uniform(0.5, 12.0)  # into the running trial(s): up to about one trial
        moments.append(round(wait, 2))
        time.sleep(wait)
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=300)
    done = subprocess.run(cmd, cwd=folder, env=env, capture_output=True, text=True, timeout=900)
    wall = time.perf_counter() - began
    if done.returncode != 0:
        raise SystemExit(done.stderr[-2000:])
    study = optuna.load_study(study_name="smoke", storage=f"sqlite:///{folder}/sweep.db")
    epochs = 10
    trained = lost = resumed = 0
    for t in study.get_trials():
        done_here = len(t.intermediate_values) - t.user_attrs.get("resumed_epochs", 0)
        trained += done_here
        resumed += t.user_attrs.get("resumed_epochs", 0)
        if t.state.name == "FAIL" and t.user_attrs.get("error") == "interrupted":
            lost += 1  # its unfinished epoch (partly trained, not kept)
    return {"budget_epochs": trials * epochs, "interruptions": interruptions,
            "seconds_after_first_epoch": moments, "epochs_trained": trained,
            "epochs_not_retrained_thanks_to_resume": resumed,
            "epochs_trained_without_resume": trained + resumed,
            "partial_epochs_lost": lost, "wall_s": wall,
            "trials": [{"number": t.number, "state": t.state.name,
                        "retry_of": t.system_attrs.get("failed_trial"),
                        "resumed_epochs": t.user_attrs.get("resumed_epochs", 0),
                        "epochs_reported": len(t.intermediate_values)}
                       for t in study.get_trials()]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--what", choices=("cost", "resume", "pack", "both"), default="both")
    parser.add_argument("--data-dir", default=DEFAULT_DATA)
    parser.add_argument("--interruptions", type=int, default=3)
    parser.add_argument("--trials", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default="cpu", help="pack: cpu or cuda")
    parser.add_argument("--reps", type=int, default=5, help="pack: boundaries per path and K")
    parser.add_argument("--ks", default="1,8,16,32", help="pack: the K to measure")
    args = parser.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    out = {"machine": f"{platform.machine()} {os.cpu_count()} cores, torch {torch.__version__}, "
                      f"{args.threads} thread(s)"}
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        if args.what in ("cost", "both"):
            out["state"] = [state_cost("resnet8", 1, folder, 10, 100),
                            state_cost("resnet20", 1, folder, 10, 10_000),
                            state_cost("resnet18", 1, folder, 3, 10_000)]
            out["slot"] = [slot_cost(folder, k, 10) for k in (2, 8)]
            out["trial"] = trial_share(args.data_dir, folder)
        if args.what == "pack":
            import optuna

            optuna.logging.set_verbosity(optuna.logging.WARNING)
            out["load_1min"] = os.getloadavg()[0]
            out["pack"] = [pack_boundary(folder, int(k), args.reps, args.device, 10_000)
                           for k in args.ks.split(",")]
        if args.what in ("resume", "both"):
            run = folder / "resume"
            run.mkdir()
            out["resume"] = resume_run(args.data_dir, run, args.trials, args.interruptions,
                                       args.seed, args.threads)
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
