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

A slot's run is ended on the tracker's background thread (flush, tags, status, LR-curve figure;
0.25 s of the 0.36 s fixed cost per trial measured on the H200, FACTS.md): the training thread
only queues it and tells Optuna, so the other slots are not held up by it.
"""

from __future__ import annotations

import sys
import uuid
from dataclasses import dataclass, field
from typing import Callable

import optuna
import torch

from sweep.orchestration.objective import (Outcome, StartedTrial, WorkerContext, end_trial,
                                           note, start_trial)
from sweep.orchestration.storage import mask_url
from sweep.study.spec import TrainSpec
from sweep.training.fused import PackStats, SlotEnd, SlotJob, fusion_problem, train_pack


def auto_fuse(device: torch.device, model: str, width: int, batch_size: int) -> int:
    """How many trials to fuse when a study says ``fuse: auto`` (before the budget bound).

    The rule, from measurements (re-measure with ``scripts/bench_fused.py``):

    * CPU: 1. On this project's 2-core CPU (resnet8, batch 128, bench_fused.py) a fused pack
      trained fewer images/s in all than one unfused trial: K=2 0.78x, K=4 0.59x (README
      "Fused trials"). The cores are already busy with one model; fusion only adds work.
    * CUDA: 16, fewer when GPU memory is short. On an H200 (FACTS.md, bare ResNet-20 step,
      batch 128 per model, bf16 + CUDA graphs) 8 fused models reached 187k img/s and 32 reached
      221k, against 51k for one model under CUDA graphs and 21.5k eager: the step is
      launch-bound and fusion fills the GPU. 16 lies between the two measured points: most of
      32's throughput, while a sampler still sees results between proposals (a TPE study of 40
      trials fused 32 at a time would sample almost blind). Memory: each slot needs about the
      activations of one model's training step, measured here with one forward/backward; at
      most half of the free memory goes to the pack.
    """
    if device.type != "cuda":
        return 1
    want = 16
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
    trials of the budget; 1 (said once on stderr) when the study's model cannot be fused, and 1
    with ``train.compile`` (the spec refuses a fixed K > 1 with it)."""
    if t.compile:
        return 1
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
    pack's step runs as one CUDA graph (FACTS.md, H200: one ResNet-20 step 51k img/s captured
    against 21.5k eager); on the CPU, and with ``train.compile`` (torch.compile's own graphs),
    one trial trains through ``train()``."""
    return capacity > 1 or (device.type == "cuda" and not t.compile
                            and fusion_problem(t.model, t.width) is None)


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
    waiting = [first]
    live: dict[int, _Slot] = {}
    free = list(range(capacity))

    def next_job() -> SlotJob | None:
        while True:
            trial = waiting.pop() if waiting else ask()
            if trial is None:
                return None
            seat = min(free)
            started = start_trial(trial, ctx, row=1 + seat,
                                  tags={"sweep.pack": pack_id, "sweep.slot": seat})
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
            return SlotJob(started.cfg, started.listeners, key=slot, checkpoint=started.save,
                           resume=started.resume)

    def ended(slot: _Slot, **how) -> Outcome:
        live.pop(slot.trial.number, None)
        free.append(slot.seat)
        return end_trial(slot.started, background=True, **how,
                         tags={"sweep.pack_trials": ",".join(map(str, sorted(slot.peers)))})

    def on_end(end: SlotEnd) -> None:
        slot = end.key
        settle(slot.trial, ended(slot, result=end.result, stop=end.stop, error=end.error))

    t = ctx.spec.train
    try:
        return train_pack(next_job, capacity, ctx.splits, ctx.device, on_end, guards=(guard,),
                          precision="auto" if t.bf16 else "fp32", graphs="auto")
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
