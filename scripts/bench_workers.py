#!/usr/bin/env python3
"""Trials per minute of 1, 2 and 4 local workers on one study, for each Optuna storage, with
no training at all: what is left is sweep's per-trial bookkeeping.

Each trial does what a real worker does around its training: the stale-trial check and budget
count, ``ask`` + 3 suggests, the heartbeat thread, an MLflow child run (create, params, one
``log_batch`` of 60 metrics, end; no LR-curve figure, which adds ~55 ms), 5 x
``report`` + ``should_prune``, ``tell``. Workers are separate processes (imports done before the
clock starts); the store, study, experiment and parent run are created first, as
``sweep launch --workers`` does. MLflow uses a SQLite store, or PostgreSQL next to a PostgreSQL
storage (the cluster setup).

    python scripts/bench_workers.py [--trials 24] [--workers 1 2 4] [--storages sqlite journal postgresql]

PostgreSQL: ``--postgres-url postgresql://...`` (a database you can drop tables in; MLflow
gets the same server's ``mlflow`` database), else a throwaway server is started with
scripts/start_postgres.sh when its binaries are installed (needs root), else skipped.
Prints a table; absolute numbers depend on the machine, ratios between rows much less.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
STUDY = REPO / "tests" / "studies" / "tiny.yaml"


def child(args) -> None:
    """One worker: wait for the go file, then run trials until the study's budget is used."""
    warnings.filterwarnings("ignore")
    import optuna
    from mlflow.entities import Metric

    from sweep.study.spec import load_study
    from sweep.loop.budget import FINISHED, counted, over_budget
    from sweep.loop.reconcile import fail_dead_trials
    from sweep.stores.storage import open_storage
    from sweep.record import Tracker
    from sweep.loop.study import open_study
    from sweep.stores.heartbeat import Heartbeat

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    spec = load_study(STUDY)
    study = open_study(spec, open_storage(args.storage))
    study.sampler.reseed_rng()
    tracker = Tracker(args.tracking)
    experiment_id = tracker.experiment_id(spec.name)
    parent = tracker.study_run(experiment_id, spec.name, {}, None)
    Path(args.out + ".ready").touch()
    while not Path(args.go).exists():
        time.sleep(0.01)
    times, mlflow_times = [], []
    while True:
        began = time.perf_counter()
        fail_dead_trials(study)
        if len(counted(study.get_trials(deepcopy=False))) >= args.budget:
            break
        trial = study.ask()
        if over_budget(study, trial, args.budget):
            continue
        beat = Heartbeat(study._storage, trial._trial_id)
        params = {"base_lr": trial.suggest_float("base_lr", 0.01, 0.5, log=True),
                  "warmup_steps": trial.suggest_int("warmup_steps", 0, 1),
                  "scheduler": trial.suggest_categorical("scheduler", ["cosine", "step"])}
        tracked = time.perf_counter()
        run = tracker.start_trial(experiment_id, parent, spec.name, trial.number, params, {})
        now = int(time.time() * 1000)
        tracker.client.log_batch(run.run_id, metrics=[
            Metric(key, 0.5, now, step) for step in range(30) for key in ("lr", "train_loss")])
        mlflow_s = time.perf_counter() - tracked
        for epoch in range(5):
            trial.report(0.1 * epoch, epoch)
            trial.should_prune()
        tracked = time.perf_counter()
        run.finish("FINISHED", {"sweep.state": "COMPLETE"}, curve_png=False)
        mlflow_times.append(mlflow_s + time.perf_counter() - tracked)
        beat.stop()
        study.tell(trial, 0.5)
        times.append(time.perf_counter() - began)
    done = len([t for t in study.get_trials(deepcopy=False) if t.state in FINISHED])
    Path(args.out).write_text(json.dumps({"times": times, "mlflow": mlflow_times,
                                          "finished": done}))


def create(args) -> None:
    """Create storage, study, MLflow store, experiment and parent run (in its own process:
    MLflow caches a store per URI, which would outlive the tables dropped between runs)."""
    warnings.filterwarnings("ignore")
    from sweep.study.spec import load_study
    from sweep.stores.storage import open_storage
    from sweep.record import Tracker
    from sweep.loop.study import open_study

    spec = load_study(STUDY)
    open_study(spec, open_storage(args.storage))
    tracker = Tracker(args.tracking)
    tracker.study_run(tracker.experiment_id(spec.name), spec.name, {}, None)


def run_config(storage: str, tracking: str, workers: int, budget: int, folder: Path) -> dict:
    """Create the stores, start ``workers`` children, time them from 'go' to the last exit."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    subprocess.run([sys.executable, __file__, "--create", "--storage", storage, "--tracking",
                    tracking], env=env, check=True)
    go = folder / "go"
    outs = [folder / f"w{i}.json" for i in range(workers)]
    procs = [subprocess.Popen([sys.executable, __file__, "--child", "--storage", storage,
                               "--tracking", tracking, "--budget", str(budget), "--go", str(go),
                               "--out", str(out)], env=env) for out in outs]
    while not all(Path(str(o) + ".ready").exists() for o in outs):
        if any(p.poll() not in (None, 0) for p in procs):
            raise SystemExit("a bench worker failed")
        time.sleep(0.05)
    began = time.perf_counter()
    go.touch()
    codes = [p.wait() for p in procs]
    wall = time.perf_counter() - began
    assert codes == [0] * workers, codes
    results = [json.loads(o.read_text()) for o in outs]
    times = [t for r in results for t in r["times"]]
    mlflow = [t for r in results for t in r["mlflow"]]
    finished = max(r["finished"] for r in results)
    return {"wall": wall, "finished": finished, "per_trial_ms": 1000 * statistics.median(times),
            "mlflow_ms": 1000 * statistics.median(mlflow),
            "trials_per_min": 60 * finished / wall}


def start_postgres() -> tuple[str | None, str | None, str | None]:
    script = REPO / "scripts" / "start_postgres.sh"
    if os.geteuid() != 0 or not list(Path("/usr/lib/postgresql").glob("*/bin/initdb")):
        return None, None, None
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    done = subprocess.run([str(script), "start", str(port)], capture_output=True, text=True)
    if done.returncode != 0:
        print(f"(PostgreSQL did not start: {done.stderr.strip()[:200]})")
        return None, None, None
    folder, optuna_url, mlflow_url = done.stdout.split()
    return folder, optuna_url, mlflow_url


def reset_postgres(url: str) -> None:
    """Drop every table so each configuration starts from an empty database."""
    import sqlalchemy

    engine = sqlalchemy.create_engine(url)
    with engine.begin() as conn:
        conn.exec_driver_sql("DROP SCHEMA public CASCADE; CREATE SCHEMA public")
    engine.dispose()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trials", type=int, default=24, help="study budget per configuration")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--storages", nargs="+", default=["sqlite", "journal", "postgresql"])
    parser.add_argument("--postgres-url")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--create", action="store_true", help=argparse.SUPPRESS)
    for hidden in ("--storage", "--tracking", "--go", "--out"):
        parser.add_argument(hidden, help=argparse.SUPPRESS)
    parser.add_argument("--budget", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args)
    if args.create:
        return create(args)

    pg_folder = None
    pg_optuna = pg_mlflow = args.postgres_url
    if args.postgres_url:
        pg_mlflow = args.postgres_url.rsplit("/", 1)[0] + "/mlflow"
    elif "postgresql" in args.storages:
        pg_folder, pg_optuna, pg_mlflow = start_postgres()
    print(f"{os.cpu_count()} CPUs; budget {args.trials} trials per configuration; "
          f"no training (bookkeeping only)")
    print(f"{'storage':<11} {'workers':>7} {'trials/min':>11} {'per-trial ms':>13} "
          f"{'of it MLflow':>13} {'wall s':>7}")
    try:
        for kind in args.storages:
            for workers in args.workers:
                with tempfile.TemporaryDirectory(prefix="bench-workers-") as tmp:
                    folder = Path(tmp)
                    tracking = f"sqlite:///{folder}/mlflow.db"
                    if kind == "sqlite":
                        storage = f"sqlite:///{folder}/optuna.db"
                    elif kind == "journal":
                        storage = f"journal:///{folder}/optuna.log"
                    else:
                        if not pg_optuna:
                            print(f"{kind:<11} skipped: no PostgreSQL (--postgres-url or install it)")
                            break
                        reset_postgres(pg_optuna)
                        reset_postgres(pg_mlflow)
                        storage, tracking = pg_optuna, pg_mlflow
                    r = run_config(storage, tracking, workers, args.trials, folder)
                    print(f"{kind:<11} {workers:>7} {r['trials_per_min']:>11.0f} "
                          f"{r['per_trial_ms']:>13.0f} {r['mlflow_ms']:>13.0f} "
                          f"{r['wall']:>7.1f}", flush=True)
    finally:
        if pg_folder:
            subprocess.run([str(REPO / "scripts" / "start_postgres.sh"), "stop", pg_folder])


if __name__ == "__main__":
    main()
