"""The machinery of a fused pack: the fused network, its per-slot optimizer and step (eager,
torch.compile'd, and/or a CUDA graph), the slots with their own generators, schedules and
clocks, per-slot evaluation. ``fused.train_pack`` drives it; see ``fused`` for why a slot
equals its unfused trial.

The step and its compilation: ``pack_step``; evaluation: ``pack_eval``; checkpoints:
``pack_state`` (mixins of ``Pack``, each reading the pack's net, optimizer, slots and stats)."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch
from torch import nn

from sweep.base.text import first_line
from sweep.study.schedules import LRSchedule
from sweep.study.specs import TrainSpec
from sweep.training.compiling import DynamoWatch
from sweep.training.data import Splits, augment_draws, crop_flip
from sweep.training.fused_model import copy_slots, decays, fuse, load_slot
from sweep.training.fused_optim import SlotOptimizer, build_slot_optimizer
from sweep.training.host_copy import HostBuffers
from sweep.training.models import build_model, memory_format
from sweep.training.pack_ends import PackEnds, SlotEnd, SlotJob
from sweep.training.pack_eval import PackEvaluation, StackedNormalizer
from sweep.training.pack_state import PackState
from sweep.training.pack_step import PackStep
from sweep.training.train import Listener, TrainResult


@dataclass
class PackStats:
    slot_steps: int = 0          # optimizer steps summed over live slots (useful or not)
    wasted_slot_steps: int = 0   # steps of slots that ended stopped or failed, including the
    #                              steps they then idled (LR 0) until the epoch boundary
    idle_slot_steps: int = 0     # of those, the idle ones
    empty_seat_steps: int = 0    # steps of seats left empty instead of a shrink (see worth_shrinking)
    images: int = 0              # training images of live slots (slot_steps x batch size)
    seconds: float = 0.0
    capacity: int = 0            # K asked for
    jobs: int = 0                # slots started
    refills: int = 0             # slots started at a boundary after the first epoch
    shrinks: int = 0
    precision: str = "fp32"
    graphs: bool = False         # the step ran as a CUDA graph
    compiled: bool = False       # the step (and evaluation) ran torch.compile'd (inductor)
    compiles: int = 0            # compilations of the step: 1 per pack and 1 per shrink (new K)
    recompiles: int = 0          # frames dynamo compiled outside those (recompiles): should be 0
    graph_breaks: int = 0        # graph breaks dynamo made in the pack's compiled functions: 0
    capture_seconds: float = 0.0
    compile_seconds: float = 0.0
    # Where the pack's wall time went (seconds; see ``TIME_PARTS``). The training layer fills
    # steps/evaluation/listeners/checkpoint/refill/ends/compile/capture; the orchestration splits refill
    # and ends into the sampler/storage calls and tracking it made in them.
    time: dict = field(default_factory=dict)
    # Seconds the process's checkpoint writer spent on this pack's checkpoints (cutting slots
    # from the copies, files, notes): on another thread, so not a part of ``seconds``; added
    # to by that thread, also after the pack returned.
    checkpoint_write_seconds: float = 0.0
    epoch_seconds: list = field(default_factory=list)  # each pack epoch, boundary work included

    def add_time(self, part: str, seconds: float) -> None:
        self.time[part] = self.time.get(part, 0.0) + seconds

    def add_write_seconds(self, seconds: float) -> None:
        self.checkpoint_write_seconds += seconds  # only the writer thread adds to it


@dataclass
class _Slot:
    job: SlotJob
    schedule: LRSchedule
    generator: torch.Generator
    history: list = field(default_factory=list)
    step: int = 0       # the slot's own optimizer steps so far
    epoch: int = 0      # the slot's own epoch in progress
    ended: bool = False  # stopped/failed/finished: idle until the boundary frees it
    released: bool = False  # freed at a boundary and not refilled: an empty seat (LR 0)
    wasted: bool = False
    steps_in_pack: int = 0
    order: torch.Tensor | None = None  # this epoch's permutation of the training split


class Pack(PackState, PackStep, PackEvaluation, PackEnds):
    """The fused network, its optimizer and step, and the slots; ``train_pack`` drives it."""

    def __init__(self, t: TrainSpec, splits: Splits, device: torch.device, bf16: bool,
                 graphs: bool, on_end: Callable[[SlotEnd], None], stats: PackStats,
                 compile: bool = False):
        self.t, self.splits, self.device, self.on_end, self.stats = t, splits, device, on_end, stats
        self.steps_per_epoch = splits.train_y.shape[0] // t.batch_size
        # cache_enabled=False: autocast's weight-cast cache must not outlive a graph capture
        self.autocast = lambda: torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16,
                                               cache_enabled=False)
        self.use_graphs, self.use_compile = graphs, compile
        self.precision = "bf16" if bf16 else "fp32"  # recorded in each slot's checkpoint
        self.layout = memory_format(t.channels_last)
        self.template = build_model(t.model, t.width, splits.num_classes)  # architecture only
        self.template_state = self.template.state_dict()  # shapes and dtypes, read by snapshots
        self.decay = decays(self.template)
        self.slots: list[_Slot] = []
        self.k = 0
        self._host_buffers = HostBuffers()  # the snapshots' copies, reused (see host_copy)
        self.watch = DynamoWatch()  # what dynamo compiles after the pack's own compilations

    # --- building --------------------------------------------------------------------------
    def _build(self, k: int) -> tuple[nn.Module, SlotOptimizer]:
        net = fuse(self.template, k, self.device, self.layout)
        params = [p for _, p in net.named_parameters()]
        decay = [self.decay[name] for name, _ in net.named_parameters()]
        optimizer = build_slot_optimizer(self.t.optimizer, params, decay, k)
        return net, optimizer

    def start(self, jobs: list[SlotJob]) -> None:
        self.k = len(jobs)
        self.net, self.optimizer = self._build(self.k)
        self.label_smoothing = torch.zeros(self.k, device=self.device)  # per slot, set by fill
        self.slots = [None] * self.k  # type: ignore[list-item]
        for index, job in enumerate(jobs):
            self.fill(index, job)
        self._make_step()

    def fill(self, index: int, job: SlotJob) -> None:
        """Slot ``index`` starts ``job``: weights as train() builds them, fresh BatchNorm
        statistics and optimizer state, its own generator and schedule; all in place."""
        cfg = job.cfg
        torch.manual_seed(cfg.seed)
        load_slot(self.net, self.k, index, build_model(cfg.train.model, cfg.train.width,
                                                       self.splits.num_classes))
        self.optimizer.reset_slot(index)
        self.optimizer.set_slot(index, cfg.train)
        self.label_smoothing[index] = cfg.train.label_smoothing
        self.slots[index] = _Slot(job, LRSchedule(cfg.schedule, self.steps_per_epoch,
                                                  cfg.train.epochs),
                                  torch.Generator(device=self.device).manual_seed(cfg.seed))
        self.stats.jobs += 1
        if job.resume is not None:
            try:
                self._resume(index, job.resume)
            except Exception as err:  # the caller checked it fits: still, one slot, never the pack
                self._end(self.slots[index], SlotEnd(job.key, error=ValueError(
                    f"its checkpoint does not fit ({first_line(err)})")), wasted=True)

    def shrink(self, keep: list[int]) -> None:
        """Rebuild with slots ``keep`` only (their weights, statistics and optimizer state)."""
        net, optimizer = self._build(len(keep))
        copy_slots(net, self.net, self.k, keep)
        optimizer.take_slots(self.optimizer, keep)
        self.label_smoothing = self.label_smoothing[torch.tensor(keep, device=self.device)]
        self.net, self.optimizer, self.k = net, optimizer, len(keep)
        self._host_buffers = HostBuffers()  # other sizes now: the old ones go with their copies
        self.slots = [self.slots[i] for i in keep]
        self.stats.shrinks += 1
        self._make_step()

    def _batch(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Batch ``i`` of the epoch for every slot, stacked: x [B, K*3, H, W], y [B, K]. The
        random draws come from each slot's generator (as ``train_batches``); the gather, crop,
        flip and normalisation run once for all slots."""
        b, k = self.t.batch_size, self.k
        idx = torch.stack([s.order[i * b: (i + 1) * b] for s in self.slots])  # [K, B]
        dy, dx, flip = (torch.cat(d) for d in zip(*(augment_draws(b, s.generator)
                                                    for s in self.slots)))
        images = crop_flip(self.splits.train_x[idx.flatten()], dy, dx, flip)
        x = images.view(k, b, *images.shape[1:]).transpose(0, 1).reshape(b, -1, *images.shape[2:])
        # y with the strides of a fresh [B, K] tensor, as the compilation's and the graph's
        # static y: a transposed y made dynamo recompile the loss at the first step of every
        # pack without a graph (not ``contiguous()``: a transposed [B, 1] counts as contiguous)
        return self.normalize(x), self.splits.train_y[idx].t().clone(
            memory_format=torch.contiguous_format)

    # --- an epoch ----------------------------------------------------------------------------
    def run_epoch(self, guards: Sequence[Listener], pack_step: int) -> None:
        """One epoch of every slot, listeners called every ``sync_every_steps``."""
        began, listening = time.perf_counter(), self.stats.time.get("listeners", 0.0)
        try:
            self._run_epoch(guards, pack_step)
        finally:  # the steps' share: the epoch less the slots' listeners called within it
            listened = self.stats.time.get("listeners", 0.0) - listening
            self.stats.add_time("steps", time.perf_counter() - began - listened)
            self._note_recompiles()

    def _run_epoch(self, guards: Sequence[Listener], pack_step: int) -> None:
        self.normalize = StackedNormalizer(self.device, self.k, self.layout, self.splits.dataset)
        n = self.splits.train_y.shape[0]
        for s in self.slots:  # as train_batches: a permutation per epoch from the slot's generator
            s.order = torch.randperm(n, generator=s.generator, device=self.device)
        losses = torch.zeros(self.t.sync_every_steps, self.k, device=self.device)
        done = 0
        while done < self.steps_per_epoch:
            chunk = min(self.t.sync_every_steps, self.steps_per_epoch - done)
            active = [not s.ended for s in self.slots]
            if not any(active):  # every slot ended: nothing to keep aligned, refill now
                break
            # The chunk's LRs are known ahead (plateau only moves at epoch ends): one upload.
            lrs = [[s.schedule.lr_at(s.step + j, s.job.cfg.base_lr) if live else 0.0
                    for s, live in zip(self.slots, active)] for j in range(chunk)]
            lr_rows = torch.tensor(lrs, dtype=self.optimizer.lr.dtype)
            if self.device.type == "cuda":
                lr_rows = lr_rows.pin_memory()
            lr_rows = lr_rows.to(self.device, non_blocking=True)
            for j in range(chunk):
                x, y = self._batch(done + j)
                self.optimizer.lr.copy_(lr_rows[j])
                losses[j] = self.step(x, y)
            host = losses[:chunk].tolist()  # the one host sync per chunk
            for k, (s, live) in enumerate(zip(self.slots, active)):
                s.steps_in_pack += chunk
                if live:
                    self.stats.slot_steps += chunk
                    self.stats.images += chunk * self.t.batch_size
                    first = s.step
                    self._notify(s, lambda lst: lst.on_steps(first, [r[k] for r in lrs],
                                                             [r[k] for r in host]))
                elif s.released:
                    self.stats.empty_seat_steps += chunk
                else:
                    self.stats.idle_slot_steps += chunk
                s.step += chunk
            done += chunk
            for guard in guards:
                guard.on_steps(pack_step + done - chunk, [], [])

    def end_epoch(self, began: float) -> None:
        """Validation for every live slot, plateau, epoch listeners; test for finished slots."""
        active = [s for s in self.slots if not s.ended]
        if not active:
            return
        val_loss, val_acc = self.evaluate(self.splits.val_x, self.splits.val_y)
        seconds = time.perf_counter() - began
        live = [k for k, s in enumerate(self.slots) if not s.ended]
        for k in live:
            s = self.slots[k]
            metrics = {"val_loss": val_loss[k], "val_acc": val_acc[k], "epoch_seconds": seconds}
            if math.isfinite(val_loss[k]):
                metrics["lr_reduced"] = s.schedule.end_of_epoch(s.epoch, val_loss[k])
            s.history.append(metrics)
        self.checkpoint_slots(live)  # before the listeners: a stop at this epoch's end keeps it
        for k in live:
            s = self.slots[k]
            self._notify(s, lambda lst: lst.on_epoch_end(s.epoch, s.history[-1]))
            s.epoch += 1
        finished = [k for k, s in enumerate(self.slots)
                    if not s.ended and s.epoch == s.job.cfg.train.epochs]
        if finished:
            _, test_acc = self.evaluate(self.splits.test_x, self.splits.test_y)
            for k in finished:
                s = self.slots[k]
                result = TrainResult(history=s.history, test_acc=test_acc[k], steps=s.step)
                self._end(s, SlotEnd(s.job.key, result=result))

    def release(self) -> list[int]:
        """Count the slots that ended this epoch; return their indices (free for refilling)."""
        free = [k for k, s in enumerate(self.slots) if s.ended and not s.released]
        for k in free:
            self.slots[k].released = True
            if self.slots[k].wasted:
                self.stats.wasted_slot_steps += self.slots[k].steps_in_pack
        return free

    def worth_shrinking(self, live: int) -> bool:
        """Whether to rebuild for ``live`` slots now that seats stay empty. Eagerly at once
        (a rebuild costs nothing). Under a CUDA graph each shrink recaptures (with cuDNN
        autotuning the new shapes: ~1 s on an H100, 13.9 s of a 196 s pack whose tail shrank
        one seat at a time), and a compiled step compiles again for the new K, while a step's
        time falls only in proportion to K: so only once half the seats or more are empty (at
        most log2 K recaptures and compilations); until then they idle at LR 0."""
        return not (self.use_graphs or self.use_compile) or live <= self.k // 2


