#!/usr/bin/env python3
"""Fused trials (issue 11): what a pack of K trials buys, on one device.

1. throughput: training steps of K trials as one pack (``sweep.training.fused.train_pack``, no
   Optuna, no MLflow) for K = 1, 2, 4, 8, 16, 32, against the unfused ``train()`` of one trial;
   aggregate training images/s and trials/hour (at ``--trial-images`` images per trial,
   training only). ``--modes``: eager, graphs (CUDA graphs), compiled (torch.compile, then a
   CUDA graph on CUDA), inductor (torch.compile without a graph), each :fp32 or :bf16.
2. fixed cost: ending a trial's MLflow run (flush of its per-step metrics, tags, status,
   LR-curve figure) on the training thread vs handed to the tracker's background thread, which
   is what a fused pack does (real SQLite MLflow store).
3. study: one whole study through ``sweep launch`` (subprocesses, fresh stores each): fused
   (``train.fuse``) vs ``--workers 4`` unfused vs one unfused worker; wall time, and the share
   of the training steps that went to trials that were pruned/diverged/failed (from the MLflow
   ``lr`` series: one point per optimizer step of a trial), fused and unfused alike; and the
   fused launch's table of where each pack's time went (steps, evaluation, compile, capture,
   listeners, sampler/storage calls, MLflow runs). ``--study-variants fused`` runs only it.

CPU (this project's 2-core machine; small sizes, ratios from one run):
    python scripts/bench_fused.py --device cpu
GPU, the step table (K = 1, 8, 16, 32; eager / graphs / compiled + graph side by side, bf16):
    python scripts/bench_fused.py --device cuda --model resnet20 --what throughput \
        --ks 1,8,16,32 --modes eager:bf16,graphs:bf16,compiled:bf16 --steps 30 --rounds 1
GPU (full-size warmup_vs_plateau on the shared subset tiled to 50,000 training images):
    python scripts/bench_fused.py --device cuda --model resnet20 --study warmup_vs_plateau \
        --tile 50000 --fuse auto
(the unfused launches of a full warmup_vs_plateau take about 20 min (--workers 4) and 70 min
(one worker) on an H200: shrink them with --study-set train.epochs=N, or --what throughput,fixed).
On a lent GPU machine (no optuna/mlflow there): ../shared/gpu/prepare.sh here, carry .gpu, and
start the command with the pip install + PYTHONPATH line that script prints.
"""

from __future__ import annotations

import argparse
import os
import pickle
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
DEFAULT_DATA = os.environ.get("SWEEP_DATA_DIR", str(REPO.parent / "shared/data/cifar10-subset"))



def throughput(args, device) -> None:
    """Training images/s of packs of K against one unfused train(), both through the real code
    (``sweep.training.fused_bench.step_throughput``: synthetic data on the device, warm-up
    steps and graph capture excluded, evaluation not included)."""
    import torch

    from sweep.training.fused_bench import step_throughput

    def measure(**kw) -> float:
        try:
            return step_throughput(args.model, 1, batch=args.batch, device=device,
                                   steps=args.steps, **kw)
        except torch.OutOfMemoryError:
            torch.cuda.empty_cache()
            return float("nan")

    variants = [("unfused train()", "-", "fp32", dict(k=1, precision="fp32", fused=False))]
    if device.type == "cuda":
        variants.append(("unfused train()", "-", "bf16", dict(k=1, precision="bf16", fused=False)))
    step = {"eager": dict(graphs="off", compile=False), "graphs": dict(graphs="on", compile=False),
            "compiled": dict(graphs="on", compile=True),
            "inductor": dict(graphs="off", compile=True)}
    modes = [m.split(":") for m in args.modes.split(",")]
    variants += [(f"fused K={k}", mode, p, dict(k=k, precision=p, **step[mode]))
                 for mode, p in modes for k in args.ks]
    # Rounds alternate the order (forward, backward, ...) so that load from other processes on
    # a shared machine hits every variant alike; the median per variant is reported.
    rates: dict[int, list[float]] = {i: [] for i in range(len(variants))}
    for r in range(args.rounds):
        order = list(range(len(variants)))
        for i in (order if r % 2 == 0 else order[::-1]):
            rates[i].append(measure(**variants[i][3]))
            print(f"  ... round {r}: {variants[i][0]} {variants[i][1]} {variants[i][2]}: "
                  f"{rates[i][-1]:,.0f} img/s", file=sys.stderr, flush=True)
    rows = [(name, g, p, statistics.median(rates[i])) for i, (name, g, p, _) in enumerate(variants)]
    base = rows[0][3]
    card = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"\n## throughput: {args.model}, batch {args.batch} per trial, {args.steps} timed "
          f"steps, device {device} ({card}), torch {torch.__version__}, torch threads "
          f"{torch.get_num_threads()}, median of {args.rounds} alternating rounds, "
          f"{time.strftime('%Y-%m-%d')}")
    print(f"trials/hour: training steps only, at {args.trial_images:,} images per trial")
    print("| variant | step | precision | images/s (all slots) | vs unfused fp32 | trials/hour |")
    print("|---|---|---|---|---|---|")
    for name, graphs, precision, rate in rows:
        print(f"| {name} | {graphs} | {precision} | {rate:,.0f} | {rate / base:.2f}x | "
              f"{rate * 3600 / args.trial_images:,.1f} |")
    side_by_side(rows, args.ks, modes)


def side_by_side(rows, ks, modes) -> None:
    """The fused rows again, one line per K and one column per step (eager / graphs /
    compiled + graph ...), with compiled against graphs where both ran: the table to compare."""
    rate = {(name, mode, p): r for name, mode, p, r in rows}
    columns = [f"{mode}:{p}" for mode, p in modes]
    label = {"graphs": "graphs", "compiled": "compiled + graph", "eager": "eager",
             "inductor": "compiled, no graph"}
    ratio = [(f"compiled:{p}", f"graphs:{p}") for p in dict.fromkeys(p for _, p in modes)
             if f"compiled:{p}" in columns and f"graphs:{p}" in columns]
    print("\n| K | " + " | ".join(f"{label[c.split(':')[0]]} {c.split(':')[1]} img/s"
                                  for c in columns)
          + "".join(f" | {a.replace(':', ' ')} / {b.replace(':', ' ')}" for a, b in ratio) + " |")
    print("|---" * (1 + len(columns) + len(ratio)) + "|")
    for k in ks:
        got = {c: rate.get((f"fused K={k}", *c.split(":")), float("nan")) for c in columns}
        print(f"| {k} | " + " | ".join(f"{got[c]:,.0f}" for c in columns)
              + "".join(f" | {got[a] / got[b]:.2f}x" for a, b in ratio) + " |")


def fixed_cost(args) -> None:
    """Seconds the training thread spends ending one trial's run, synchronously vs handed off."""
    from sweep.record import Tracker

    with tempfile.TemporaryDirectory(prefix="bench_fused-") as tmp:
        tracker = Tracker(f"sqlite:///{tmp}/mlflow.db")
        experiment = tracker.experiment_id("fixed_cost")
        parent = tracker.study_run(experiment, "fixed_cost", {}, None)
        steps = args.fixed_steps
        costs = {"synchronous end": [], "background end": []}
        for i in range(2 * args.fixed_trials):
            background = i % 2 == 1
            run = tracker.start_trial(experiment, parent, "fixed_cost", i, {"seed": i}, {})
            for first in range(0, steps, 10):  # what training logs: lr and train_loss each step
                run.on_steps(first, [0.1] * 10, [2.3] * 10)
            run.on_epoch_end(0, {"val_loss": 2.0, "val_acc": 0.3})
            began = time.perf_counter()
            run.finish("FINISHED", {"sweep.state": "COMPLETE"}, background=background)
            costs["background end" if background else "synchronous end"].append(
                time.perf_counter() - began)
        began = time.perf_counter()
        tracker.wait()
        drained = time.perf_counter() - began
    print(f"\n## fixed cost of ending a trial's MLflow run ({steps} steps of lr + train_loss, "
          f"SQLite store, {args.fixed_trials} runs each way, medians)")
    for name, values in costs.items():
        print(f"  {name:16} {1000 * statistics.median(values):8.2f} ms on the training thread")
    print(f"  (the background thread finished its queue {drained:.2f} s after the last hand-off; "
          f"the worker waits for it once, at exit)")


def tiled(data_dir: str, size: int, into: Path) -> str:
    """A CIFAR-10 folder whose training batches repeat the given ones up to ``size`` images:
    full-size epochs from the shared subset. For timing only: the pictures repeat, so the
    validation split overlaps the training split and accuracies mean nothing."""
    import numpy as np

    from sweep.training.data import TEST_FILE, TRAIN_FILES, locate

    src = locate(data_dir, download=False)
    parts = [pickle.load(open(src / n, "rb"), encoding="latin1") for n in TRAIN_FILES]
    data = np.concatenate([np.asarray(p["data"]) for p in parts])
    labels = np.concatenate([np.asarray(p["labels"]) for p in parts])
    reps = -(-size // len(labels))
    data, labels = np.tile(data, (reps, 1))[:size], np.tile(labels, reps)[:size]
    out = into / "cifar-10-batches-py"
    out.mkdir(parents=True)
    for i, name in enumerate(TRAIN_FILES):
        chunk = slice(i * size // 5, (i + 1) * size // 5)
        with open(out / name, "wb") as f:
            pickle.dump({"data": data[chunk], "labels": labels[chunk].tolist()}, f)
    shutil.copy(src / TEST_FILE, out / TEST_FILE)
    return str(into)


def study(args, data_dir: str) -> None:
    """Whole-study wall time through `sweep launch`, fused vs unfused."""
    import optuna
    from mlflow.tracking import MlflowClient

    sets = [a for kv in args.study_set for a in ("--set", kv) if not kv.startswith("trials=")]
    trials = [kv.split("=", 1)[1] for kv in args.study_set if kv.startswith("trials=")]
    base = [sys.executable, "-m", "sweep.cli", "launch", "--study", args.study, "--quiet",
            "--device", args.device, "--data-dir", data_dir, *sets,
            *(["--trials", trials[-1]] if trials else [])]
    variants = [(f"fused, fuse={args.fuse}", ["--set", f"train.fuse={args.fuse}"]),
                ("unfused, --workers 4", ["--workers", "4", "--set", "train.fuse=1"]),
                ("unfused, 1 worker", ["--set", "train.fuse=1"])]
    chosen = args.study_variants.split(",")
    variants = [v for v, key in zip(variants, ("fused", "workers4", "unfused")) if key in chosen]
    rows, table = [], ""
    for name, extra in variants:
        with tempfile.TemporaryDirectory(prefix="bench_fused-study-") as tmp:
            began = time.perf_counter()
            proc = subprocess.run(base + extra, cwd=tmp, capture_output=True, text=True,
                                  env={**os.environ, "PYTHONWARNINGS": "ignore"})
            seconds = time.perf_counter() - began
            if "where the time went" in proc.stdout:  # the launch's closing summary
                table = proc.stdout[proc.stdout.index("where the time went"):]
            if proc.returncode != 0:
                print(f"{name}: failed ({proc.returncode})\n{proc.stderr[-2000:]}", file=sys.stderr)
                continue
            url = f"sqlite:///{tmp}/sweep.db"
            st = optuna.load_study(study_name=optuna.get_all_study_names(url)[0], storage=url)
            done = [t for t in st.trials if t.state.is_finished()]
            client = MlflowClient(f"sqlite:///{tmp}/mlflow.db")
            steps = wasted = idle = 0
            for t in done:
                run_id = t.user_attrs.get("mlflow_run_id")
                if not run_id:
                    continue
                n = len(client.get_metric_history(run_id, "lr"))
                steps += n
                if t.state.name != "COMPLETE":
                    wasted += n
                    # A fused slot stopped mid-epoch idles (LR 0) until the epoch boundary,
                    # where its seat is refilled: PackStats.wasted_slot_steps counts those too.
                    per_epoch = int(client.get_run(run_id).data.params["steps_per_epoch"])
                    idle += -n % per_epoch if extra[-1] != "train.fuse=1" else 0
            best = st.best_value if any(t.state.name == "COMPLETE" for t in done) else float("nan")
            rows.append((name, seconds, len(done), wasted / max(steps, 1),
                         (wasted + idle) / max(steps + idle, 1), best))
            print(f"  ... {name}: {seconds:.1f} s", file=sys.stderr, flush=True)
    print(f"\n## whole study through `sweep launch --study {args.study}` "
          f"{' '.join(args.study_set)}, device {args.device} (each from fresh stores; includes "
          f"the process start, imports and loading the data)")
    print("| variant | wall time | trials | trials/hour | training steps spent on trials that were "
          "pruned/diverged/failed (fused: + idle seats to the epoch's end) | best value |")
    print("|---|---|---|---|---|---|")
    for name, seconds, n, wasted, with_idle, best in rows:
        share = f"{wasted:.0%}" + (f" ({with_idle:.0%})" if name.startswith("fused") else "")
        print(f"| {name} | {seconds:.1f} s | {n} | {n * 3600 / seconds:,.0f} | {share} | "
              f"{best:.4f} |")
    if table:
        print(f"\n## fused launch: {table.rstrip()}")
    if rows and rows[0][0].startswith("fused") and len(rows) > 1:
        print("wall time vs fused: " + ", ".join(f"{name} {s / rows[0][1]:.2f}x"
                                                 for name, s, *_ in rows[1:]))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--data-dir", default=DEFAULT_DATA)
    parser.add_argument("--what", default="throughput,fixed,study",
                        help="sections to run (comma-separated)")
    parser.add_argument("--model", default="resnet8")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--steps", type=int, default=20, help="timed steps per measurement")
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds (medians)")
    parser.add_argument("--ks", default=None, help="pack sizes (default 1,2,4 on CPU, "
                                                   "1,2,4,8,16,32 on CUDA)")
    parser.add_argument("--trial-images", type=int, default=30 * 48_000,
                        help="images per trial for trials/hour (default: warmup_vs_plateau)")
    parser.add_argument("--fixed-trials", type=int, default=5)
    parser.add_argument("--fixed-steps", type=int, default=400)
    parser.add_argument("--study", default="smoke")
    parser.add_argument("--study-set", action="append", default=None,
                        help="KEY=VALUE for the study launches (trials=N sets --trials)")
    parser.add_argument("--fuse", default="4", help="train.fuse of the fused study launch")
    parser.add_argument("--study-variants", default="fused,workers4,unfused",
                        help="which study launches: fused, workers4, unfused (comma-separated)")
    parser.add_argument("--modes", default=None,
                        help="pack steps to time, MODE:PRECISION comma-separated, MODE one of "
                             "eager, graphs, compiled, inductor (default eager:fp32 on the CPU; "
                             "eager:bf16,graphs:bf16,compiled:bf16 on CUDA)")
    parser.add_argument("--tile", type=int, default=0,
                        help="tile the data's training images up to this many (full-size epochs)")
    parser.add_argument("--threads", type=int)
    args = parser.parse_args()
    import torch

    from sweep.training.train import resolve_device

    device = resolve_device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    args.modes = args.modes or ("eager:fp32" if device.type != "cuda"
                                else "eager:bf16,graphs:bf16,compiled:bf16")
    args.ks = [int(k) for k in (args.ks or ("1,2,4,8,16,32" if device.type == "cuda"
                                            else "1,2,4")).split(",")]
    if args.study_set is None:
        args.study_set = (["trials=8", "data.train_size=1000", "train.epochs=2"]
                          if device.type == "cpu" else [])
    what = set(args.what.split(","))
    with tempfile.TemporaryDirectory(prefix="bench_fused-data-") as tmp:
        data_dir = tiled(args.data_dir, args.tile, Path(tmp)) if args.tile else args.data_dir
        if "throughput" in what:
            throughput(args, device)
        if "fixed" in what:
            fixed_cost(args)
        if "study" in what:
            study(args, data_dir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
