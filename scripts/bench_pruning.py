#!/usr/bin/env python3
"""How much compute pruning saves: the same study run twice through sweep, side by side.

* off: no pruner and no excess-loss divergence rule (a non-finite loss still ends a trial:
  training on NaN weights is impossible, so this only makes the baseline cheaper);
* on:  the study file's pruner and divergence rule.

Both runs use the same sampler seed and trial budget; with the study's random sampler they
train the very same configurations with the same seeds, so any difference in the best
validation accuracy is the pruner's doing. Epochs are counted from the optimizer steps each
trial really ran (its MLflow ``lr`` series), in units of full epochs.

Target (issue 4): the pruned run trains <= 40% of the epochs of the unpruned run, and its best
validation accuracy is within 1 point of the unpruned best.

    python scripts/bench_pruning.py [--study pruning_bench] [--data-dir DIR] [--json FILE]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
DEFAULT_DATA = os.environ.get("SWEEP_DATA_DIR", str(REPO.parent / "shared/data/cifar10-subset"))


def run_study(spec, mode: str, data_dir: str, device: str, workdir: Path) -> dict:
    """Run ``spec`` to its budget in fresh stores; return per-trial facts and the wall time."""
    import optuna
    from mlflow.tracking import MlflowClient

    from sweep.commands.launch import LaunchOptions, open_study_stores
    from sweep.study.specs import PrunerSpec
    from sweep.loop.worker import run_worker

    if mode == "off":
        spec = dataclasses.replace(spec, pruner=PrunerSpec("none"),
                                   divergence=dataclasses.replace(spec.divergence, enabled=False))
    opts = LaunchOptions(f"sqlite:///{workdir}/{mode}-optuna.db",
                         f"sqlite:///{workdir}/{mode}-mlflow.db", data_dir, device)
    stores = open_study_stores(spec, opts)
    study, ctx = stores.study, stores.worker_context(spec)
    began = time.perf_counter()
    run_worker(study, ctx, spec.trials)
    wall = time.perf_counter() - began
    client = MlflowClient(opts.tracking_uri)
    trials = []
    for t in study.get_trials():
        steps = len(client.get_metric_history(t.user_attrs["mlflow_run_id"], "lr"))
        trials.append({
            "number": t.number, "state": t.state.name, "params": t.params, "steps": steps,
            "value": t.value, "curve": [t.intermediate_values[k] for k in sorted(t.intermediate_values)],
            "prune_reason": t.user_attrs.get("prune_reason"), "prune_step": t.user_attrs.get("prune_step"),
            "prune_epoch": t.user_attrs.get("prune_epoch"), "prune_cause": t.user_attrs.get("prune_cause")})
    assert all(t["state"] != optuna.trial.TrialState.FAIL.name for t in trials), trials
    return {"mode": mode, "wall_s": wall, "trials": trials, "steps_per_epoch": spec.steps_per_epoch}


def summarize(run: dict) -> dict:
    S = run["steps_per_epoch"]
    done = [t for t in run["trials"] if t["state"] == "COMPLETE"]
    diverged = [t for t in run["trials"] if t["prune_reason"] == "diverged"]
    return {"epochs": sum(t["steps"] for t in run["trials"]) / S,
            "best": max((t["value"] for t in done), default=float("nan")),
            "best_trial": max(done, key=lambda t: t["value"])["number"] if done else None,
            "complete": len(done), "pruned": sum(t["prune_reason"] == "pruner" for t in run["trials"]),
            "diverged": len(diverged), "diverged_steps": [t["prune_step"] for t in diverged],
            "wall_s": run["wall_s"]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--study", default="pruning_bench")
    parser.add_argument("--data-dir", default=DEFAULT_DATA)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--json", help="also write every trial's curve and outcome here")
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's choice); "
                        "1 on a machine shared with other jobs, where 2 spinning OpenMP "
                        "threads per process slow training 10-20x")
    args = parser.parse_args()

    import optuna
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)

    from sweep.study.pruning import describe_pruner
    from sweep.study.spec import load_study

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    spec = load_study(args.study, args.overrides)
    print(f"study {spec.name}: {spec.trials} trials x {spec.train.epochs} epochs of "
          f"{spec.steps_per_epoch} steps, {spec.train.model}, sampler {spec.sampler.type} "
          f"seed {spec.seed}, pruner {describe_pruner(spec.pruner)} {dict(spec.pruner.params)}; "
          f"device {args.device}, torch threads {torch.get_num_threads()}", flush=True)
    runs = {}
    with tempfile.TemporaryDirectory(prefix="bench_pruning-") as tmp:
        for mode in ("off", "on"):
            runs[mode] = run_study(spec, mode, args.data_dir, args.device, Path(tmp))
            print(f"  {mode}: {runs[mode]['wall_s']:.0f} s", flush=True)
    off, on = summarize(runs["off"]), summarize(runs["on"])
    S = spec.steps_per_epoch
    print(f"\n{'':28}{'pruning off':>14}{'pruning on':>14}")
    print(f"{'epochs trained':28}{off['epochs']:>14.1f}{on['epochs']:>14.1f}")
    print(f"{'wall time (s)':28}{off['wall_s']:>14.0f}{on['wall_s']:>14.0f}")
    print(f"{'best val_acc':28}{off['best']:>14.4f}{on['best']:>14.4f}")
    print(f"{'best trial':28}{off['best_trial']!s:>14}{on['best_trial']!s:>14}")
    print(f"{'complete / pruned / diverged':28}"
          f"{'%d / %d / %d' % (off['complete'], off['pruned'], off['diverged']):>14}"
          f"{'%d / %d / %d' % (on['complete'], on['pruned'], on['diverged']):>14}")
    ratio = on["epochs"] / off["epochs"]
    gap = (off["best"] - on["best"]) * 100
    print(f"\nepochs ratio (on / off): {ratio:.3f}  (target <= 0.40: "
          f"{'met' if ratio <= 0.40 else 'NOT met'})")
    print(f"best val_acc gap: {gap:+.2f} points  (target within 1 point: "
          f"{'met' if abs(gap) <= 1.0 else 'NOT met'})")
    steps = on["diverged_steps"]
    if steps:
        print(f"diverged trials (pruning on): {len(steps)}, stopped at steps {sorted(steps)} "
              f"(epoch 1 = steps 0..{S - 1}; median {sorted(steps)[len(steps) // 2]}); "
              f"wall-time ratio {on['wall_s'] / off['wall_s']:.3f}")
    else:
        print("diverged trials (pruning on): 0")
    if args.json:
        Path(args.json).write_text(json.dumps(runs, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
