#!/usr/bin/env python3
"""What the harness costs a trial, side by side in one process.

* sweep: one trial through the real worker loop (``sweep.loop.worker.run_worker``): Optuna ask /
  tell on a SQLite storage, a nested MLflow run on a SQLite store, ``lr`` and ``train_loss``
  logged at every optimizer step (batched, background thread), ``val_loss``/``val_acc`` per
  epoch, the pruner asked every epoch, divergence checks on every step, the LR-curve figure
  and the run's end. Per-worker costs (imports, loading the data, creating the stores) are
  paid once before timing, as a worker pays them once for all its trials.
* bare: the same model, data, batches, optimizer, LR schedule, epochs and evaluation in a
  plain loop written here, with no Optuna, no MLflow and one host sync per epoch.

Rounds alternate (sweep, bare, bare, sweep, ...) so that background load hits both alike; the
medians are compared. Target (issue 5): sweep / bare <= 1.05 on the CPU (resnet20, shared
CIFAR-10 subset); on CUDA, within 10%.

    python scripts/bench_overhead.py [--device cpu|cuda] [--rounds 3] [--epochs 2]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
DEFAULT_DATA = os.environ.get("SWEEP_DATA_DIR", str(REPO.parent / "shared/data/cifar10-subset"))

STUDY = """
name: overhead
seed: 0
trials: 1000
sampler: {{type: random}}
pruner: {{type: median, n_startup_trials: 1000, n_warmup_steps: 0}}   # asked, never prunes
data: {{train_size: {train_size}, val_size: 500, test_size: 500}}
train: {{model: {model}, epochs: {epochs}, batch_size: 128}}
space: {{warmup_steps: 10, base_lr: 0.2, scheduler: {{cosine: {{}}}}}}
"""


def bare_trial(cfg, splits, device) -> float:
    """The hand-written loop: returns the final test accuracy (so the work cannot be skipped)."""
    import torch
    from torch import nn

    from sweep.training.data import Normalizer, train_batches
    from sweep.training.models import build_model
    from sweep.study.schedules import LRSchedule

    t = cfg.train
    torch.manual_seed(cfg.seed)
    generator = torch.Generator(device=device).manual_seed(cfg.seed)
    model = build_model(t.model, t.width).to(device, memory_format=torch.channels_last)
    decay = [p for p in model.parameters() if p.ndim > 1]
    rest = [p for p in model.parameters() if p.ndim <= 1]
    opt = torch.optim.SGD([{"params": decay, "weight_decay": t.weight_decay},
                           {"params": rest, "weight_decay": 0.0}], lr=cfg.base_lr,
                          momentum=t.momentum, nesterov=t.nesterov)
    steps_per_epoch = splits.train_y.shape[0] // t.batch_size
    schedule = LRSchedule(cfg.schedule, steps_per_epoch, t.epochs)
    normalize = Normalizer(device, channels_last=True)
    autocast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if (
        device.type == "cuda" and t.bf16) else (lambda: torch.autocast(device.type, enabled=False))

    @torch.no_grad()
    def accuracy(x_u8, y):
        model.eval()
        correct = torch.zeros((), device=device, dtype=torch.long)
        for s in range(0, y.shape[0], t.eval_batch_size):
            with autocast():
                out = model(normalize(x_u8[s: s + t.eval_batch_size]))
            correct += (out.argmax(1) == y[s: s + t.eval_batch_size]).sum()
        model.train()
        return correct.item() / y.shape[0]

    step = 0
    for epoch in range(t.epochs):
        loss_sum = torch.zeros((), device=device)
        for x, y in train_batches(splits, t.batch_size, generator, normalize):
            lr = schedule.lr_at(step, cfg.base_lr)
            for group in opt.param_groups:
                group["lr"] = lr
            with autocast():
                loss = nn.functional.cross_entropy(model(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            loss_sum += loss.detach()
            step += 1
        accuracy(splits.val_x, splits.val_y)
        schedule.end_of_epoch(epoch, loss_sum.item() / steps_per_epoch)
    return accuracy(splits.test_x, splits.test_y)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-dir", default=DEFAULT_DATA)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--model", default="resnet20")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--train-size", type=int, default=4585)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's choice)")
    args = parser.parse_args()

    import optuna
    import torch

    from sweep.commands.launch import LaunchOptions, open_study_stores
    from sweep.study.space import trial_config
    from sweep.study.spec import parse_study
    from sweep.loop.budget import budget_used
    from sweep.loop.worker import run_worker

    if args.threads:
        torch.set_num_threads(args.threads)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    with tempfile.TemporaryDirectory(prefix="bench_overhead-") as tmp:
        path = Path(tmp) / "overhead.yaml"
        path.write_text(STUDY.format(train_size=args.train_size, model=args.model,
                                     epochs=args.epochs))
        spec = parse_study(path.read_text(), str(path), path)
        opts = LaunchOptions(f"sqlite:///{tmp}/optuna.db", f"sqlite:///{tmp}/mlflow.db",
                             args.data_dir, args.device)
        stores = open_study_stores(spec, opts)
        study, ctx = stores.study, stores.worker_context(spec)  # per worker: data on the device, stores, imports
        runs = []
        start_trial = ctx.tracker.start_trial

        def capture(*a, **k):  # keep each TrialRun to read its logging cost
            began = time.perf_counter()
            run = start_trial(*a, **k)
            run.start_seconds = time.perf_counter() - began
            finish = run.finish

            def timed_finish(*fa, **fk):  # flush, tags, LR-curve figure, end of the run
                began = time.perf_counter()
                try:
                    return finish(*fa, **fk)
                finally:
                    run.finish_seconds = time.perf_counter() - began

            run.finish = timed_finish
            runs.append(run)
            return run

        ctx.tracker.start_trial = capture
        cfg = trial_config(optuna.trial.FixedTrial({}, number=0), spec)

        def sweep_once() -> float:
            began = time.perf_counter()
            report = run_worker(study, ctx, budget_used(study) + 1)
            assert report.ran[-1].state.name == "COMPLETE", report.ran[-1]
            return time.perf_counter() - began

        def bare_once() -> float:
            began = time.perf_counter()
            bare_trial(cfg, ctx.splits, ctx.device)
            if ctx.device.type == "cuda":
                torch.cuda.synchronize()
            return time.perf_counter() - began

        sweep_once(), bare_once()  # warm-up: first-use costs (matplotlib, allocator, kernels)
        times = {"sweep": [], "bare": []}
        for r in range(args.rounds):
            order = (("sweep", sweep_once), ("bare", bare_once))
            for name, fn in (order if r % 2 == 0 else order[::-1]):
                times[name].append(fn())
        timed = runs[1:]  # the warm-up trial excluded
        steps = spec.total_steps
    med = {k: statistics.median(v) for k, v in times.items()}
    ratio = med["sweep"] / med["bare"]
    print(f"{args.model}, {args.epochs} epochs x {spec.steps_per_epoch} steps of "
          f"{spec.train.batch_size} ({args.train_size} images) + eval of 500 val / 500 test per "
          f"trial; device {ctx.device}, torch threads {torch.get_num_threads()}, "
          f"{args.rounds} alternating rounds")
    for name in ("sweep", "bare"):
        print(f"  {name:6} median {med[name]:7.2f} s/trial   (rounds: "
              f"{', '.join(f'{v:.2f}' for v in times[name])})")
    print(f"sweep / bare = {ratio:.3f}  (target <= 1.05 on CPU: "
          f"{'met' if ratio <= 1.05 else 'NOT met'}); harness cost "
          f"{med['sweep'] - med['bare']:+.2f} s per trial")
    logged = statistics.median(r.metrics_logged for r in timed)
    seconds = statistics.median(r.logging_seconds for r in timed)
    start = statistics.median(r.start_seconds for r in timed)
    finish = statistics.median(r.finish_seconds for r in timed)
    print(f"of the harness cost, on the trial's thread: MLflow run start + params {start:.2f} s, "
          f"run end (flush, tags, lr_curve.png, status) {finish:.2f} s; the rest is Optuna "
          f"(ask, report + should_prune per epoch, tell) and the listeners")
    print(f"MLflow per trial: {logged:.0f} metrics ({steps} steps x lr + train_loss, val_*, "
          f"test_acc, epoch_seconds) in {seconds:.3f} s of log_batch calls on the background "
          f"thread ({1000 * seconds / max(logged, 1):.2f} ms per metric)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
