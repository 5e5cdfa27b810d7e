"""Fused packs: up to K trials of one study train as ONE fused network (``fused_model``).

A slot is the same computation as ``train()`` with the same config: its initial weights are
built as train() builds them (``torch.manual_seed(seed); build_model(...)``); its batches and
augmentation come from its own generator in ``train_batches``' draw order; its LR comes from
its own ``LRSchedule`` (plateau fed its own validation loss); its loss is its own batch's mean
cross-entropy and the pack's backward runs on the SUM of the slot losses, so each slot's
gradient is exactly its unfused gradient; the optimizer (``fused_optim``) is torch's, per slot.
Only floating-point summation order differs (grouped vs plain kernels), which the equivalence
test measures.

Slots live on their own clocks (step and epoch counted from when the slot started), but all
share ``steps_per_epoch`` and start at a pack epoch boundary, so their epochs end together: the
pack evaluates, refills the slots freed during the epoch with ``next_job()`` (fresh weights,
BatchNorm statistics and optimizer state for that slot alone), and shrinks when no job is left.
A slot stopped mid-epoch (pruned, diverged, failed) gets LR 0 and no more listener calls at once,
and waits for the boundary (at once when every slot has ended); its weights may be NaN, which
cannot reach the other slots.

Knows nothing of Optuna or MLflow: jobs carry listeners, as train() takes them.
"""

from __future__ import annotations

import time
from typing import Callable, Sequence

import torch

from sweep.study.specs import TrainSpec
from sweep.training.data import Splits
from sweep.training.fused_model import fusion_problem
from sweep.training.fused_pack import Pack, PackStats
from sweep.training.pack_ends import SlotEnd, SlotJob
from sweep.training.train import Listener, compiles

__all__ = ["SlotJob", "SlotEnd", "PackStats", "train_pack", "fusion_problem", "SHARED_KEYS"]

#: ``train.*`` keys every job of a pack must share (the fused network and its step are one).
#: The rest are per slot: weight decay, momentum, nesterov, betas and label smoothing are
#: vectors in the optimizer and the loss (``SlotOptimizer.PER_SLOT``, ``Pack.label_smoothing``);
#: the warmup's shape and start factor live in each slot's own schedule.
SHARED_KEYS = ("model", "width", "epochs", "batch_size", "optimizer", "eval_batch_size",
               "sync_every_steps", "bf16")


def _mismatch(first: TrainSpec, other: TrainSpec) -> str | None:
    for key in SHARED_KEYS:
        if getattr(first, key) != getattr(other, key):
            return (f"train.{key} differs within a fused pack ({getattr(other, key)!r} vs "
                    f"{getattr(first, key)!r}); all jobs of a pack must share {', '.join(SHARED_KEYS)}")
    return None


class _Feeder:
    """``next_job`` with the pack's rule: a job that differs in a shared key, or that resumes a
    state trained in another precision than the pack's, ends at once with a ValueError saying
    so (reported through ``on_end``) and the next one is asked for. (The study loop never
    sends the latter: ``check_resumable`` restarts such a retry from step 0 first.)"""

    def __init__(self, next_job: Callable[[], SlotJob | None], on_end: Callable[[SlotEnd], None],
                 precision: str, cuda: bool):
        self.next_job, self.on_end, self.first = next_job, on_end, None
        self.requested, self.cuda = precision, cuda
        self.bf16 = False  # the pack's precision, set by its first job

    def __call__(self) -> SlotJob | None:
        while True:
            job = self.next_job()
            if job is None:
                return None
            if self.first is None:
                self.first = job.cfg.train
                self.bf16 = pack_bf16(self.requested, self.cuda, self.first.bf16)
            problem = _mismatch(self.first, job.cfg.train) or self._precision_problem(job)
            if problem is None:
                return job
            self.on_end(SlotEnd(job.key, error=ValueError(problem)))


    def _precision_problem(self, job: SlotJob) -> str | None:
        mine = "bf16" if self.bf16 else "fp32"
        saved = (job.resume or {}).get("precision", mine)
        if saved == mine:
            return None
        return (f"the job resumes a state trained in {saved} and the pack trains in {mine}; "
                f"restart it from step 0 or train it in a pack of its own precision")


def pack_bf16(precision: str, cuda: bool, bf16: bool) -> bool:
    """Whether a pack trains in bf16 autocast: never on the CPU; ``precision`` "bf16"/"fp32" as
    said; "auto": the jobs' ``train.bf16`` (``train.trial_precision``), whatever the pack's
    size and whoever joins it, so a trial's numerics never depend on how it was scheduled."""
    if not cuda:
        return False
    return bf16 if precision == "auto" else precision == "bf16"


def train_pack(next_job: Callable[[], SlotJob | None], capacity: int, splits: Splits,
               device: torch.device, on_end: Callable[[SlotEnd], None],
               guards: Sequence[Listener] = (), precision: str = "auto",
               graphs: str = "auto", compile: bool | str = "auto", *,
               stats: PackStats | None = None,
               _pack_hook: Callable | None = None) -> PackStats:
    """Train up to ``capacity`` trials as ONE fused network until ``next_job`` returns None and
    no slot is live (see the module docstring).

    ``next_job()`` fills each free slot: up to ``capacity`` times at the start, then at every
    epoch boundary once per slot freed during that epoch, until it returns None (then the
    pack shrinks to its live slots: under a CUDA graph once half its seats are empty,
    ``Pack.worth_shrinking``). ``on_end`` is called once per slot as it ends. ``guards``
    are pack-wide listeners called after every chunk and epoch with pack step/epoch numbers;
    whatever they raise propagates. A BaseException from a slot's listener propagates too;
    StopTraining or another Exception from it ends that slot alone.
    ``precision``: "auto" (the jobs' ``train.bf16``, ``pack_bf16``), "fp32", "bf16" (CUDA
    only; the CPU is always fp32); a resumed job trained in another precision is refused (ends
    with a ValueError). ``graphs``: "auto"/"on" capture the step as a CUDA
    graph on CUDA (eager with a warning if capture fails), "off" eager; the CPU is eager.
    ``compile`` (``train.compile``): True compiles the step and evaluation with torch.compile
    (inductor; on CUDA then captured as a graph), False does not, "auto" is ``train.compiles``'
    rule (CUDA only); a failed compilation falls back to the uncompiled step with a warning.
    See ``fused_pack`` for what compiles (the step once per K: at the start and at each
    shrink) and how any recompile is counted (``PackStats.recompiles``).
    ``stats``: the ``PackStats`` to fill (a new one by default; the caller's, when its
    callbacks add to it while the pack trains).
    ``_pack_hook(pack)`` is for tests (they inject faults into a slot's weights through it).
    """
    if capacity < 1:
        raise ValueError(f"capacity must be at least 1, got {capacity}")
    if precision not in ("auto", "fp32", "bf16"):
        raise ValueError(f"precision must be auto, fp32 or bf16, got {precision!r}")
    if graphs not in ("auto", "on", "off"):
        raise ValueError(f"graphs must be auto, on or off, got {graphs!r}")
    if compile not in (True, False, "auto"):
        raise ValueError(f"compile must be true, false or auto, got {compile!r}")
    began = time.perf_counter()
    stats = stats if stats is not None else PackStats()
    stats.capacity = capacity
    cuda = device.type == "cuda"
    feed = _Feeder(next_job, on_end, precision, cuda)
    jobs: list[SlotJob] = []
    while len(jobs) < capacity and (job := feed()) is not None:
        jobs.append(job)
    if not jobs:
        return stats
    t = jobs[0].cfg.train
    problem = fusion_problem(t.model, t.width)
    if problem:
        raise ValueError(f"{problem}; run it unfused")
    # decided once for the pack's life, by the jobs' configuration (``pack_bf16``)
    bf16 = feed.bf16
    stats.precision = "bf16" if bf16 else "fp32"
    if cuda:
        # autotuning picks kernels by timing: not under deterministic algorithms (tests)
        torch.backends.cudnn.benchmark = not torch.are_deterministic_algorithms_enabled()
    stats.add_time("start", time.perf_counter() - began)  # asking and starting the first jobs
    pack = Pack(t, splits, device, bf16, cuda and graphs != "off", on_end, stats,
                compile=compiles(compile, device))
    pack.start(jobs)
    if _pack_hook:
        _pack_hook(pack)
    epoch = 0
    while pack.slots:
        epoch_began = time.perf_counter()
        pack.run_epoch(guards, epoch * pack.steps_per_epoch)
        pack.end_epoch(epoch_began)
        for guard in guards:
            guard.on_epoch_end(epoch, {})
        free, epoch = pack.release(), epoch + 1
        refill_began = time.perf_counter()
        for n, index in enumerate(free):
            job = feed()
            if job is None:
                free = free[n:]
                break
            pack.fill(index, job)
            stats.refills += 1
        else:
            free = []
        stats.add_time("refill", time.perf_counter() - refill_began)
        stats.epoch_seconds.append(time.perf_counter() - epoch_began)
        keep = [k for k, s in enumerate(pack.slots) if not s.ended]
        if not keep:
            break
        if len(keep) < pack.k and pack.worth_shrinking(len(keep)):
            pack.shrink(keep)
    stats.graphs = pack.use_graphs
    stats.seconds = time.perf_counter() - began
    counted = sum(v for k, v in stats.time.items() if not k.startswith("listener "))  # not the
    stats.add_time("other", stats.seconds - counted)  # per-listener shares a second time
    return stats
