"""Fused trials in the study loop: up to K trials of a study train together as one grouped
network (``sweep.training.fused.train_pack``), each keeping all a trial has on its own.

Each slot of a pack is a whole trial, started and ended by the same two halves as an unfused
one (``objective.start_trial`` / ``objective.end_trial``): its own Optuna trial (states,
intermediate values through the same ``PruningListener``, user attributes), its own nested MLflow
run (per-step ``lr`` and ``train_loss``, per-epoch ``val_loss``/``val_acc``, ``test_acc``, the
LR-curve figure) and its own ``DivergenceMonitor``. The worker (``worker.run_worker``) owns the
rest of the study loop: asking trials within the budget, heartbeats, signals and telling Optuna;
this module only fills slots, tags them and ends them.

Tags on each slot's run: ``sweep.pack`` (an id shared by the trials of one pack),
``sweep.slot`` (the seat it took, 0..K-1; a seat freed by a pruned trial is taken by the next
trial at the following epoch boundary) and, when the run ends, ``sweep.pack_trials`` (the
numbers of every trial that trained beside it at some point, itself included).

A slot's run is ended through the process's one metric writer (``metric_writer``: its points,
then tags and status, in order; 0.25 s of the 0.36 s fixed cost per trial measured on the H200,
FACTS.md, when it was done on the training thread): the training thread only queues it and
tells Optuna, so the other slots are not held up by it.
"""

from __future__ import annotations

import sys
import time
import uuid
from dataclasses import dataclass, field
from typing import Callable

import optuna
import torch

from sweep.loop.objective import Outcome, StartedTrial, WorkerContext, end_trial, note, start_trial
from sweep.base.urls import mask_url
from sweep.study.model_ref import is_import_path
from sweep.study.specs import TrainSpec
from sweep.training.fused import PackStats, SlotEnd, SlotJob, fusion_problem, train_pack


#: ``scripts/bench_fused.py --what throughput`` on an H100 (FACTS.md; ResNet-20, batch 128 per
#: trial, bf16, CUDA graphs): training images/s summed over K slots. Re-measure and update.
MEASURED_THROUGHPUT = {1: 49.6e3, 8: 125.0e3, 16: 140.7e3, 32: 149.0e3}
KNEE_SHARE = 0.9  # the knee: the smallest K within 10% of the best measured throughput


def throughput_knee(throughput: dict[int, float], share: float = KNEE_SHARE) -> int:
    """The smallest K whose images/s reach ``share`` of the best K's."""
    best = max(throughput.values())
    return min(k for k, rate in throughput.items() if rate >= share * best)


def auto_fuse(device: torch.device, model: str, width: int, batch_size: int) -> int:
    """How many trials to fuse when a study says ``fuse: auto`` (before the budget bound).

    * CPU: 1. On this project's 2-core CPU (resnet8, batch 128, bench_fused.py) a fused pack
      trained fewer images/s in all than one unfused trial: K=2 0.78x, K=4 0.59x
      (docs/performance.md). The cores are already busy with one model; fusion only adds work.
    * CUDA: the knee of the measured throughput (``MEASURED_THROUGHPUT``): 16 on the H100,
      where K=32 trained only 6% more images/s than K=16 while a TPE study of 40 trials fused
      32 at a time would sample almost blind (half its budget proposed before any result).
      Memory did not bind (6.6 GB of 80 at K=16); it stays a cap for small GPUs: each slot
      needs about one model's training step, measured here, and at most half of the free
      memory goes to the pack.
    """
    if device.type != "cuda" or is_import_path(model):  # a model by path is never fused
        return 1
    want = throughput_knee(MEASURED_THROUGHPUT)
    per_slot = _step_bytes(device, model, width, batch_size)
    free, _ = torch.cuda.mem_get_info(device)
    return max(1, min(want, int(free * 0.5 // max(per_slot, 1))))


def _step_bytes(device: torch.device, model: str, width: int, batch_size: int) -> int:
    """Peak memory of one training step of one model (weights, activations, gradients)."""
    from sweep.training.models import build_model

    torch.cuda.synchronize(device)
    before = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    net = build_model(model, width).to(device, memory_format=torch.channels_last)
    x = torch.randn(batch_size, 3, 32, 32, device=device).contiguous(
        memory_format=torch.channels_last)
    net(x).float().sum().backward()
    peak = torch.cuda.max_memory_allocated(device) - before
    del net, x
    torch.cuda.empty_cache()
    return peak


def pack_capacity(t: TrainSpec, device: torch.device, remaining: int) -> int:
    """The K a worker fuses: ``train.fuse`` (``auto``: ``auto_fuse``), at most the ``remaining``
    trials of the budget; 1 (said once on stderr) when the study's model cannot be fused."""
    wanted = auto_fuse(device, t.model, t.width, t.batch_size) if t.fuse == "auto" else t.fuse
    capacity = max(1, min(wanted, remaining))
    if capacity > 1:
        problem = fusion_problem(t.model, t.width)
        if problem is not None:
            print(f"train.fuse={t.fuse}: {problem}; training one trial at a time",
                  file=sys.stderr, flush=True)
            return 1
    return capacity


def trains_as_pack(t: TrainSpec, device: torch.device, capacity: int) -> bool:
    """Whether trials go through ``run_pack``: when K > 1, and on CUDA also for K = 1, since the
    pack's step runs as one CUDA graph, compiled with ``train.compile`` (FACTS.md, H200: one
    ResNet-20 step 51k img/s captured against 21.5k eager); on the CPU one trial trains through
    ``train()`` (compiled there with ``train.compile: true``)."""
    return capacity > 1 or (device.type == "cuda" and fusion_problem(t.model, t.width) is None)


@dataclass
class _Slot:
    started: StartedTrial
    seat: int
    peers: set[int] = field(default_factory=set)  # trial numbers that trained beside it

    @property
    def trial(self) -> optuna.Trial:
        return self.started.trial


def run_pack(first: optuna.Trial, ask: Callable[[], optuna.Trial | None], ctx: WorkerContext,
             capacity: int, guard, began: Callable[[optuna.Trial], None],
             settle: Callable[[optuna.Trial, Outcome], None]) -> PackStats | None:
    """Train ``first`` and further trials from ``ask()`` (None: no more within the budget) as
    one pack of up to ``capacity`` slots, until no slot is live.

    The worker hears of each trial twice: ``began(trial)`` once its run is open (it beats the
    trial's heartbeat from then on) and ``settle(trial, outcome)`` once it has ended (it tells
    Optuna; the trial's run is already ended or queued to be). An interruption raised by
    ``guard`` ends every live slot's run as KILLED and propagates: the trials that got
    ``began`` and no ``settle`` are the worker's to fail and re-enqueue. Any other exception
    out of the pack fails every live slot with it; returns None then, else the pack's
    ``PackStats``."""
    pack_id = uuid.uuid4().hex[:12]
    stats = PackStats()
    waiting = [first]
    live: dict[int, _Slot] = {}
    free = list(range(capacity))

    spent = {"ask": 0.0, "start_trial": 0.0, "tell": 0.0}  # seconds, see time_table

    def timed(part: str, call: Callable, *args, **kwargs):
        began = time.perf_counter()
        try:
            return call(*args, **kwargs)
        finally:
            spent[part] += time.perf_counter() - began

    def next_job() -> SlotJob | None:
        while True:
            trial = waiting.pop() if waiting else timed("ask", ask)
            if trial is None:
                return None
            seat = min(free)
            started = timed("start_trial", start_trial, trial, ctx, row=1 + seat,
                            tags={"sweep.pack": pack_id, "sweep.slot": seat}, interrupt=guard)
            if isinstance(started, Outcome):  # its run could not be opened: it fails alone
                settle(trial, started)
                continue
            began(trial)
            free.remove(seat)
            slot = _Slot(started, seat, {trial.number})
            for other in live.values():
                other.peers.add(trial.number)
                slot.peers.add(other.trial.number)
            live[trial.number] = slot
            return SlotJob(started.cfg, started.listeners, key=slot,
                           checkpoint=started.save_later(on_written=stats.add_write_seconds),
                           resume=started.resume)

    def ended(slot: _Slot, **how) -> Outcome:
        live.pop(slot.trial.number, None)
        free.append(slot.seat)
        return end_trial(slot.started, background=True, **how,
                         tags={"sweep.pack_trials": ",".join(map(str, sorted(slot.peers)))})

    def on_end(end: SlotEnd) -> None:
        slot = end.key
        outcome = ended(slot, result=end.result, stop=end.stop, error=end.error)
        timed("tell", settle, slot.trial, outcome)

    t = ctx.spec.train
    try:
        train_pack(next_job, capacity, ctx.splits, ctx.device, on_end, guards=(guard,),
                   precision="auto" if t.bf16 else "fp32", graphs="auto", compile=t.compile,
                   stats=stats)
        _split_bookkeeping(stats, spent)
        return stats
    except BaseException as err:
        interrupted = not isinstance(err, Exception)
        for slot in list(live.values()):
            outcome = ended(slot, error=err)
            if not interrupted:
                settle(slot.trial, outcome)
        if interrupted:
            raise
        for trial in waiting:  # the pack failed before its first slot was filled
            message = mask_url(f"{type(err).__name__}: {err}")[:2000]
            note(trial, "error", message)
            settle(trial, Outcome(optuna.trial.TrialState.FAIL, detail=message))
        return None


#: The rows of ``time_table``: PackStats.time parts, in order, with what they hold.
TIME_PARTS = {
    "steps": "training steps",
    "evaluation": "evaluation (one fused pass per split)",
    "compile": "torch.compile",
    "capture": "CUDA graph capture",
    "listeners": "slot listeners (metrics, pruning, divergence)",
    "checkpoint": "checkpoints: copies off the device (training thread)",
    "ask": "sampler + storage: ask",
    "start_trial": "starting trials (storage attributes, MLflow runs)",
    "tell": "storage: tell",
    "ends": "ending trials (runs queued to end)",
    "fill": "filling seats (weights, state)",
    "other": "other",
}


def _split_bookkeeping(stats: PackStats, spent: dict) -> None:
    """PackStats.time counts the asking and starting of jobs in "start" and "refill", the
    ending in "ends"; split off what went to the sampler/storage and to MLflow."""
    time_ = stats.time
    filled = time_.pop("start", 0.0) + time_.pop("refill", 0.0)
    time_["ask"], time_["start_trial"] = spent["ask"], spent["start_trial"]
    time_["fill"] = max(0.0, filled - spent["ask"] - spent["start_trial"])
    time_["tell"] = spent["tell"]
    time_["ends"] = max(0.0, time_.get("ends", 0.0) - spent["tell"])


def time_table(packs: list) -> str:
    """Where the packs' wall time went: one row per part, seconds and share, one column per
    pack (``PackStats``; None for a pack that failed is skipped)."""
    packs = [p for p in packs if p is not None and p.seconds > 0]
    if not packs:
        return ""
    head = "where the time went".ljust(58) + "".join(
        f"  pack {i + 1} (K={p.capacity}, {p.jobs} trials)".rjust(26) for i, p in enumerate(packs))
    lines = [head]
    extra = sorted({k for p in packs for k in p.time} - set(TIME_PARTS))
    parts = list(TIME_PARTS)
    at = parts.index("listeners") + 1
    parts[at:at] = [k for k in extra if k.startswith("listener ")]
    parts += [k for k in extra if not k.startswith("listener ")]
    for part in parts:
        if not any(p.time.get(part) for p in packs):
            continue
        cells = "".join(f"{p.time.get(part, 0.0):10.1f} s {100 * p.time.get(part, 0.0) / p.seconds:5.1f}%"
                        .rjust(26) for p in packs)
        lines.append(f"  {_label(part)}".ljust(58) + cells)
    lines.append("  total".ljust(58) + "".join(f"{p.seconds:10.1f} s".rjust(26) for p in packs))
    if any(p.checkpoint_write_seconds for p in packs):  # on its own thread: not in the total
        lines.append("  checkpoints: writer thread (files, notes; not in the total)".ljust(58)
                     + "".join(f"{p.checkpoint_write_seconds:10.1f} s".rjust(26) for p in packs))
    for i, p in enumerate(packs):
        if p.epoch_seconds:
            lines.append(f"  pack {i + 1}: {_epochs(p.epoch_seconds)}")
        if p.recompiles or p.graph_breaks:  # its steps' share holds their time (dynamo's counts)
            lines.append(f"  pack {i + 1}: {p.recompiles} recompiles and {p.graph_breaks} graph "
                         f"breaks after its compilation (torch.compile; "
                         f"TORCH_LOGS=recompiles,graph_breaks says why)")
    return "\n".join(lines)


def _epochs(seconds: list[float]) -> str:
    """Pack epoch wall times in tenths: the first and the last, and the slowest: a pack whose
    later epochs slow down shows it here."""
    slowest = max(range(len(seconds)), key=seconds.__getitem__)
    n = min(5, len(seconds))
    return (f"{len(seconds)} epochs, first {n} " + " ".join(f"{s:.1f}" for s in seconds[:n])
            + f" s, last {n} " + " ".join(f"{s:.1f}" for s in seconds[-n:])
            + f" s, slowest {seconds[slowest]:.1f} s (epoch {slowest})")


def _label(part: str) -> str:
    if part.startswith("listener "):  # a share of "listeners": one listener type's calls
        return f"    of which {part.removeprefix('listener ')}"
    return TIME_PARTS.get(part, part)


def pack_time_metrics(packs: list) -> dict[str, float]:
    """The packs' time parts summed, as parent-run metrics ``pack_seconds_<part>``; with
    ``pack_seconds_checkpoint`` (the training thread's copies) and
    ``pack_seconds_checkpoint_writer`` (the writer thread's seconds, not a part of the total)."""
    total: dict[str, float] = {}
    for p in packs:
        if p is None:
            continue
        for part, seconds in [*p.time.items(), ("total", p.seconds),
                              ("checkpoint_writer", p.checkpoint_write_seconds)]:
            key = "pack_seconds_" + part.replace(" ", "_")
            total[key] = total.get(key, 0.0) + seconds
    return total


def log_pack_times(tracker, run_id: str | None, packs: list) -> None:
    """``pack_time_metrics`` on the study's parent run (best effort: a warning if it fails)."""
    metrics = pack_time_metrics(packs)
    if not metrics or run_id is None:
        return
    try:
        tracker.log_metrics(run_id, metrics)
    except Exception as err:
        print(f"warning: pack times not logged on parent run {run_id}: {type(err).__name__}",
              file=sys.stderr)
