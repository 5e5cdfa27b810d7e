#!/usr/bin/env python3
"""Does every point reach MLflow at GPU speed? K trial runs fed as a fused pack feeds them.

One thread (the "training thread") drives K runs of sweep's own tracking code (``Tracker``,
``TrialRun``: the process's one metric writer behind them), each at ``--rate`` optimizer steps
per second (an H100 pack of 16 ResNet-20s: about 60), handing ``lr`` and ``train_loss`` over
every ``--sync-every`` steps as the pack does, ``val_loss``/``val_acc`` every ``--epoch-steps``,
for ``--seconds``; then every run ends in the background at once (``finish(background=True)``,
as a pack's slots end) and the tracker drains. Per store and K it prints:

* sustained points/s: points stored / (feed time + drain time), which is the offered load
  when the writer keeps up; and the writer's capacity: points stored / wall seconds it spent
  writing (what it could sustain were it never idle);
* lag from enqueue to stored: median and p99 over every point;
* training-thread cost per point (the listener calls only), and that cost for the 2K points
  of one pack step as a share of the step (1/``--rate`` s; the issue's bound: < 1%);
* for a server: the CPU time its processes spent per point stored (what caps it on a machine it
  shares, and what ``--workers`` has to divide across free cores);
* missing/duplicated: every run is read back (``lr`` and ``train_loss`` histories: one row per
  step, steps 0..n-1); the exit status is 1 when any point is missing or doubled.

Stores: ``sqlite`` (an embedded SQLite file), ``server`` (a real ``mlflow server`` subprocess,
SQLite behind it, over HTTP), ``server-pg`` (the same server with PostgreSQL behind it, as a
team's server runs), ``postgres`` (a throwaway PostgreSQL via scripts/start_postgres.sh; needs
root and the server binaries, skipped otherwise). ``--server-workers N`` starts the server with
N processes (``mlflow server --workers``).

    python scripts/bench_tracking.py [--runs 8 16 32] [--stores sqlite server server-pg postgres]
                                     [--seconds 10] [--server-workers 1]

``--slow-store F`` (the backlog bound): a SQLite store throttled to take only F of the offered
points/s while K runs feed for ``--seconds``, side by side without a cap on the writer's backlog
and with ``SWEEP_BACKLOG_POINTS`` = ``--cap`` (each case in a fresh process): the process's
resident memory sampled every 2 s (reported from 10 s on, after start-up),
the backlog and the spooled points at the feed's end; then the store takes its full rate, the
spool is replayed and every run is read back (nothing may be missing or doubled).

    python scripts/bench_tracking.py --slow-store 0.5 --runs 32 --seconds 60 --cap 0 20000
"""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


@dataclass
class FeedResult:
    runs: list  # TrialRun
    steps: list[int]  # steps fed per run
    epochs: list[int]
    feed_s: float
    drain_s: float
    listener_s: float  # training thread inside listener calls
    points: int  # points handed over
    lags_ms: list = field(default_factory=list)


def feed(tracker, experiment_id: str, parent: str, k: int, rate: float, seconds: float,
         sync_every: int = 10, epoch_steps: int = 200, study: str = "bench",
         number0: int = 0, lags: list | None = None, stop_early: dict | None = None) -> FeedResult:
    """Feed ``k`` runs at ``rate`` steps/s each for ``seconds`` from this one thread, then end
    them all in the background and drain. ``stop_early``: {run index: step} ends that run
    (KILLED) after that many steps, as a pruned slot. ``lags`` collects enqueue->stored ms."""
    runs = [tracker.start_trial(experiment_id, parent, study, number0 + i, {"slot": i}, {})
            for i in range(k)]
    if lags is not None:
        tracker.writer.on_stored = lambda chunk, now: lags.extend(now - ts for _, _, ts, _ in chunk)
    stop_early = stop_early or {}
    steps, epochs = [0] * k, [0] * k
    live = set(range(k))
    listener = 0.0
    began = time.perf_counter()
    tick = sync_every / rate
    n = 0
    while live and time.perf_counter() - began < seconds:
        target = began + (n + 1) * tick
        time.sleep(max(0.0, target - time.perf_counter()))  # "training"
        n += 1
        t0 = time.perf_counter()
        for i in sorted(live):
            first = steps[i]
            lrs = [0.1 * (1 + (first + j) % 97) / 97 for j in range(sync_every)]
            losses = [2.3 / (1 + 0.001 * (first + j)) for j in range(sync_every)]
            runs[i].on_steps(first, lrs, losses)
            steps[i] += sync_every
            if steps[i] % epoch_steps == 0:
                runs[i].on_epoch_end(epochs[i], {"val_loss": 1.0 + i, "val_acc": 0.5})
                epochs[i] += 1
            if i in stop_early and steps[i] >= stop_early[i]:
                runs[i].finish("KILLED", {"sweep.state": "PRUNED"}, curve_png=False,
                               background=True)
                live.discard(i)
        listener += time.perf_counter() - t0
    feed_s = time.perf_counter() - began
    t0 = time.perf_counter()
    for i in sorted(live):
        runs[i].log_metric("test_acc", 0.5)
        runs[i].finish("FINISHED", {"sweep.state": "COMPLETE"}, curve_png=False, background=True)
    listener += time.perf_counter() - t0
    t0 = time.perf_counter()
    tracker.wait()
    drain_s = time.perf_counter() - t0
    points = sum(sum(r.expected.values()) for r in runs)
    return FeedResult(runs, steps, epochs, feed_s, drain_s, listener, points, lags or [])


def check_stored(client, result: FeedResult) -> list[str]:
    """One line per run whose stored ``lr``/``train_loss``/``val_acc`` differ from what was fed
    (missing or doubled points), read back through ``client``."""
    problems = []
    for run, steps, epochs in zip(result.runs, result.steps, result.epochs):
        for key, want in (("lr", list(range(steps))), ("train_loss", list(range(steps))),
                          ("val_acc", list(range(epochs)))):
            got = sorted(m.step for m in client.get_metric_history(run.run_id, key))
            if got != want:
                problems.append(f"run {run.run_id} {key}: {len(got)} points stored, "
                                f"{len(want)} fed, {len(set(got))} distinct steps")
    return problems


@contextlib.contextmanager
def store(kind: str, tmp: Path, server_workers: int = 1):
    """(tracking URI of ``kind``, the server's pid or None), alive inside the block."""
    if kind == "sqlite":
        yield f"sqlite:///{tmp}/mlflow.db", None
    elif kind in ("server", "server-pg"):
        from sweep.views.ui import mlflow_server

        with contextlib.ExitStack() as stack:
            backend = (stack.enter_context(postgres()) if kind == "server-pg"
                       else f"sqlite:///{tmp}/server.db")
            proc, url = stack.enter_context(mlflow_server(
                backend, artifacts_destination=f"{tmp}/served", workers=server_workers))
            yield url, proc.pid
    elif kind == "postgres":
        with postgres() as url:
            yield url, None
    else:
        raise SystemExit(f"unknown store {kind!r}")


def _stat_fields(pid: int) -> list[str] | None:
    """The fields of /proc/PID/stat after the command name (state, ppid, ...), None if gone."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


def descendants(pid: int) -> list[int]:
    """Every live process below ``pid``, from /proc (no psutil here)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").glob("[0-9]*"):
        fields = _stat_fields(int(entry.name))
        if fields is not None:
            children.setdefault(int(fields[1]), []).append(int(entry.name))
    out, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def tree_cpu_s(pid: int) -> float:
    """CPU seconds (user + system) of ``pid`` and every live process below it (mlflow ->
    uvicorn -> its workers): the server's own cost, which on a shared machine caps what it can
    take."""
    total = 0.0
    for member in [pid, *descendants(pid)]:
        fields = _stat_fields(member)
        if fields is not None:
            total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return total


@contextlib.contextmanager
def postgres():
    script = REPO / "scripts" / "start_postgres.sh"
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = subprocess.run(["bash", str(script), "start", str(port), "bench-pw"],
                         capture_output=True, text=True, timeout=120, check=True).stdout.split()
    folder, _, mlflow_url = out[-3:]
    try:
        yield mlflow_url
    finally:
        subprocess.run(["bash", str(script), "stop", folder], capture_output=True, timeout=60)


def percentile(values, q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


def rss_mb() -> float:
    """This process's resident memory, MB (/proc/self/status)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


class Throttle:
    """A store's ``send`` that takes at most ``points_per_s`` (a slow store: the real insert,
    then a sleep); ``points_per_s = None`` lifts the limit."""

    def __init__(self, send, points_per_s: float | None):
        self.send, self.points_per_s = send, points_per_s
        self.began, self.taken = time.perf_counter(), 0

    def __call__(self, run_id: str, points) -> None:
        self.send(run_id, points)
        self.taken += len(points)
        if self.points_per_s:
            due = self.began + self.taken / self.points_per_s
            time.sleep(max(0.0, due - time.perf_counter()))


def slow_store(args) -> int:
    """The ``--slow-store`` benchmark (module docstring): with and without a backlog cap."""
    import threading

    from mlflow.tracking import MlflowClient

    from sweep.record import MetricWriter
    from sweep.record import SpoolWriter, replay, spool_dir
    from sweep.record import bulk_sender
    from sweep.record import Tracker

    if len(args.runs) > 1 or len(args.cap) > 1:  # each case in a fresh process, side by side
        failed = False
        for k in args.runs:
            offered = 2 * k * args.rate
            print(f"K={k}: offered {offered:.0f} points/s, store takes "
                  f"{args.slow_store * offered:.0f} points/s for {args.seconds:g} s")
            print(f"{'backlog cap':>12} {'RSS at 10 s MB':>14} {'RSS max MB':>10} "
                  f"{'RSS end MB':>10} {'queued at end':>13} {'spooled':>8} {'points':>8}  missing",
                  flush=True)
            for cap in args.cap:
                done = subprocess.run([sys.executable, __file__, "--slow-store",
                                       str(args.slow_store), "--runs", str(k), "--seconds",
                                       str(args.seconds), "--rate", str(args.rate), "--cap",
                                       str(cap), "--sync-every", str(args.sync_every)],
                                      capture_output=True, text=True)
                print(done.stdout.strip().splitlines()[-1] if done.stdout.strip() else
                      done.stderr[-2000:], flush=True)
                failed |= done.returncode != 0
        return 1 if failed else 0
    failed = False
    for k in args.runs:
        offered = 2 * k * args.rate
        for cap in args.cap:
            os.environ["SWEEP_BACKLOG_POINTS"] = str(cap or 10**12)
            with tempfile.TemporaryDirectory() as tmp:
                uri = f"sqlite:///{tmp}/mlflow.db"
                tracker = Tracker(uri)
                throttle = Throttle(bulk_sender(tracker.client), args.slow_store * offered)
                tracker.writer = MetricWriter(tracker.client, SpoolWriter(spool_dir(uri), uri),
                                               send=throttle)
                experiment_id = tracker.experiment_id(f"slow-{k}")
                parent = tracker.study_run(experiment_id, f"slow-{k}", {}, None)
                samples, stop = [rss_mb()], threading.Event()

                def sample():
                    while not stop.wait(2.0):
                        samples.append(rss_mb())

                sampler = threading.Thread(target=sample, daemon=True)
                sampler.start()
                writer = tracker.writer
                # the feed ends its runs and drains: lift the limit as its feed time ends
                lift = threading.Timer(args.seconds, lambda: setattr(throttle, "points_per_s", None))
                lift.start()
                queued = []
                probe = threading.Timer(args.seconds - 0.5, lambda: queued.append(
                    writer.queued))
                probe.start()
                throttle.began, throttle.taken = time.perf_counter(), 0  # the feed's clock
                result = feed(tracker, experiment_id, parent, k, args.rate, args.seconds,
                              args.sync_every)
                stop.set()
                sampler.join()
                spooled = writer.spooled
                tracker.close()
                replay(uri, MlflowClient(uri))
                problems = check_stored(MlflowClient(uri), result)
                failed |= bool(problems)
                warm = samples[min(5, len(samples) - 1)]  # at 10 s: imports and first allocations done
                print(f"{cap or 'none':>12} {warm:14.0f} {max(samples):10.0f} "
                      f"{samples[-1]:10.0f} {queued[0] if queued else -1:13d} {spooled:8d} "
                      f"{result.points:8d}  {len(problems) or 'none'}", flush=True)
    return 1 if failed else 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, nargs="+", default=[8, 16, 32])
    parser.add_argument("--stores", nargs="+", default=["sqlite", "server", "postgres"])
    parser.add_argument("--seconds", type=float, default=10.0, help="feed time per row")
    parser.add_argument("--rate", type=float, default=60.0, help="steps/s per run")
    parser.add_argument("--server-workers", type=int, default=1,
                        help="processes of the mlflow server (server, server-pg)")
    parser.add_argument("--sync-every", type=int, default=10, help="steps per listener call")
    parser.add_argument("--slow-store", type=float, default=None, metavar="F",
                        help="the backlog benchmark: a store taking F of the offered rate")
    parser.add_argument("--cap", type=int, nargs="+", default=[0, 20_000],
                        help="SWEEP_BACKLOG_POINTS values to compare, 0: no cap (--slow-store)")
    args = parser.parse_args()
    if args.slow_store is not None:
        print(f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, Python "
              f"{platform.python_version()}; listener every {args.sync_every} steps")
        return slow_store(args)

    from mlflow.tracking import MlflowClient

    from sweep.record import Tracker

    stores = list(args.stores)
    no_postgres = os.geteuid() != 0 or not list(Path("/usr/lib/postgresql").glob("*/bin/initdb"))
    for kind in ("postgres", "server-pg"):
        if kind in stores and no_postgres:
            print(f"{kind}: skipped (needs root and PostgreSQL server binaries)")
            stores.remove(kind)
    print(f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, Python "
          f"{platform.python_version()}; {args.seconds:g} s feed per row, {args.rate:g} steps/s "
          f"per run, lr + train_loss per step, listener every {args.sync_every} steps")
    print(f"{'store':9} {'K':>3} {'offered/s':>9} {'points':>8} {'stored/s':>9} {'drain s':>7} "
          f"{'capacity/s':>10} {'lag med s':>9} {'lag p99 s':>9} {'us/point':>8} {'% of step':>9} "
          f"{'server CPU us/pt':>16}  missing")
    failed = False
    for kind in stores:
        with tempfile.TemporaryDirectory() as tmp, store(kind, Path(tmp), args.server_workers) as (uri, server_pid):
            for k in args.runs:
                tracker = Tracker(uri)
                experiment_id = tracker.experiment_id(f"bench-{k}")
                parent = tracker.study_run(experiment_id, f"bench-{k}", {}, None)
                lags: list = []
                server_cpu = tree_cpu_s(server_pid) if server_pid else 0.0
                result = feed(tracker, experiment_id, parent, k, args.rate, args.seconds,
                              args.sync_every, lags=lags)
                busy = tracker.writer.busy_s
                tracker.close()
                server_us = (f"{1e6 * (tree_cpu_s(server_pid) - server_cpu) / result.points:16.0f}"
                             if server_pid else f"{'-':>16}")
                problems = check_stored(MlflowClient(uri), result)
                failed |= bool(problems)
                per_point = result.listener_s / max(result.points, 1)
                step_s = 1.0 / args.rate
                print(f"{kind:9} {k:3d} {2 * k * args.rate:9.0f} {result.points:8d} "
                      f"{result.points / (result.feed_s + result.drain_s):9.0f} "
                      f"{result.drain_s:7.2f} {result.points / max(busy, 1e-9):10.0f} "
                      f"{statistics.median(lags) / 1000:9.2f} "
                      f"{percentile(lags, 0.99) / 1000:9.2f} {1e6 * per_point:8.2f} "
                      f"{100 * per_point * 2 * k / step_s:9.4f} {server_us}  "
                      f"{len(problems) or 'none'}", flush=True)
                for line in problems[:5]:
                    print("   ", line)
                spool = Path(tmp) / "mlflow.db.spool"
                if spool.exists():
                    shutil.rmtree(spool)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
