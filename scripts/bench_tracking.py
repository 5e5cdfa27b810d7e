#!/usr/bin/env python3
"""What MLflow logging costs a trial: a SQLite file vs a tracking server over HTTP.

Each trial goes through sweep's own tracking code (``Tracker.start_trial``, the ``TrialRun``
listener fed by a simulated training loop, ``TrialRun.finish``) with no model: ``--steps``
optimizer steps of ``--step-ms`` each (a sleep standing in for training), ``lr`` and
``train_loss`` handed over every ``--sync-every`` steps as the trainer does, ``val_*`` per
epoch, ``test_acc`` at the end, the LR-curve figure after. Per trial it separates:

* trial thread: run start + params; the listener calls during training (queueing only);
  ``finish`` (waiting for the last batch to be sent, one tags batch, the run's end);
* background: ``log_batch`` calls of the metrics thread (``TrialRun.logging_seconds``) and the
  LR-curve figure's thread (drawn and uploaded after ``finish`` returns).

The server is ``mlflow server`` started here (``sweep.views.ui.mlflow_server``: its own
SQLite backend, artifacts uploaded over HTTP). Rounds alternate (sqlite, http, http, sqlite,
...) so background load hits both alike; medians over rounds are compared.

    python scripts/bench_tracking.py [--trials 5] [--steps 400] [--step-ms 5]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

PARTS = ("start", "listener", "finish", "metrics_bg", "figure_bg")


def one_trial(tracker, experiment_id: str, parent: str, number: int, args) -> dict[str, float]:
    """Seconds per part of one simulated trial."""
    params = {"base_lr": 0.1, "warmup_steps": 10, "scheduler": "cosine", "epochs": args.epochs}
    began = time.perf_counter()
    run = tracker.start_trial(experiment_id, parent, "bench", number, params, {"sweep.host": "x"})
    start = time.perf_counter() - began
    listener = 0.0
    steps_per_epoch = args.steps // args.epochs
    for first in range(0, args.steps, args.sync_every):
        count = min(args.sync_every, args.steps - first)
        time.sleep(count * args.step_ms / 1000)  # training
        lrs = [0.1 * (1 - (first + i) / args.steps) for i in range(count)]
        losses = [2.3 - (first + i) / args.steps for i in range(count)]
        began = time.perf_counter()
        run.on_steps(first, lrs, losses)
        if (first + count) % steps_per_epoch == 0:
            run.on_epoch_end((first + count) // steps_per_epoch - 1,
                             {"val_loss": 1.5, "val_acc": 0.4})
        listener += time.perf_counter() - began
    began = time.perf_counter()
    run.log_metric("test_acc", 0.4)
    run.finish("FINISHED", {"sweep.state": "COMPLETE"})
    finish = time.perf_counter() - began
    began = time.perf_counter()
    tracker.wait()  # the LR-curve figure's thread
    figure = time.perf_counter() - began
    assert run.metrics_logged == 2 * args.steps + 2 * args.epochs + 1, run.metrics_logged
    return {"start": start, "listener": listener, "finish": finish,
            "metrics_bg": run.logging_seconds, "figure_bg": figure}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trials", type=int, default=5, help="trials per store per round")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--steps", type=int, default=400, help="optimizer steps per trial")
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--step-ms", type=float, default=5.0, help="simulated training per step")
    parser.add_argument("--sync-every", type=int, default=10, help="steps per listener call")
    args = parser.parse_args()

    from sweep.orchestration.tracking import Tracker
    from sweep.views.ui import mlflow_server

    with tempfile.TemporaryDirectory() as tmp, \
            mlflow_server(f"sqlite:///{tmp}/server.db",
                          artifacts_destination=f"{tmp}/served") as (_, url):
        trackers = {"sqlite": Tracker(f"sqlite:///{tmp}/mlflow.db"), "http": Tracker(url)}
        setup = {}
        for name, tracker in trackers.items():
            experiment_id = tracker.experiment_id("bench")
            setup[name] = (experiment_id, tracker.study_run(experiment_id, "bench", {}, None))
            one_trial(tracker, *setup[name], -1, args)  # warm-up: connections, matplotlib
        per_trial: dict[str, list[dict[str, float]]] = {name: [] for name in trackers}
        order = []
        for r in range(args.rounds):
            order += ["sqlite", "http"] if r % 2 == 0 else ["http", "sqlite"]
        number = 0
        for name in order:
            for _ in range(args.trials):
                per_trial[name].append(one_trial(trackers[name], *setup[name], number, args))
                number += 1

    metrics = 2 * args.steps + 2 * args.epochs + 1
    print(f"{args.trials * args.rounds} trials per store; each {args.steps} steps "
          f"({args.step_ms:g} ms simulated training per step, listener every {args.sync_every} "
          f"steps), {metrics} metrics, one LR-curve figure. Medians, seconds per trial:")
    print(f"  {'store':7} {'trial thread: start':>20} {'listener':>9} {'finish':>7} "
          f"{'= total':>8}   {'background: metrics':>20} {'figure':>7}")
    med = {}
    for name, rows in per_trial.items():
        med[name] = {part: statistics.median(row[part] for row in rows) for part in PARTS}
        med[name]["thread"] = statistics.median(row["start"] + row["listener"] + row["finish"]
                                                for row in rows)
        m = med[name]
        print(f"  {name:7} {m['start']:20.4f} {m['listener']:9.4f} {m['finish']:7.4f} "
              f"{m['thread']:8.4f}   {m['metrics_bg']:20.4f} {m['figure_bg']:7.4f}")
    ratio = {k: med["http"][k] / med["sqlite"][k] for k in ("thread", "metrics_bg", "figure_bg")}
    print(f"http / sqlite: trial thread {ratio['thread']:.2f}x, background metrics "
          f"{ratio['metrics_bg']:.2f}x, figure {ratio['figure_bg']:.2f}x")
    training = args.steps * args.step_ms / 1000
    print(f"trial thread over HTTP: {med['http']['thread']:.3f} s per trial "
          f"({100 * med['http']['thread'] / training:.1f}% of {training:.1f} s of training); "
          f"listener calls {1e6 * med['http']['listener'] / args.steps:.1f} us per step")


if __name__ == "__main__":
    main()
