"""Training throughput of a fused pack against one unfused trial, for scripts/bench_fused.py.

Both are timed through the real code paths (``train_pack`` and ``train()``) on synthetic data
resident on the device: from the host sync that ends the first ``warmup`` steps (so cuDNN's
autotuning, a CUDA-graph capture and the allocator's warm-up are excluded) to the sync after
the last step. Data preparation (permutation, crop/flip, normalisation) is included, as it
is part of every step; evaluation is not.
"""

from __future__ import annotations

import time

import torch

from sweep.study.schedules import ScheduleConfig
from sweep.study.space import TrialConfig
from sweep.study.specs import DataSpec, TrainSpec
from sweep.training.data import Splits
from sweep.training.fused import SlotJob, train_pack
from sweep.training.train import train


class _ChunkTimes:
    """A listener (or pack guard) noting the time of every chunk's end, after its host sync."""

    def __init__(self):
        self.times: list[float] = []

    def on_steps(self, first_step, lrs, losses) -> None:
        self.times.append(time.perf_counter())

    def on_epoch_end(self, epoch, metrics) -> None:
        pass


def step_throughput(model: str, width: int, k: int, batch: int, device: torch.device,
                    precision: str = "auto", graphs: str = "auto", steps: int = 20,
                    warmup: int = 5, fused: bool = True, compile: bool | str = False) -> float:
    """Training images per second summed over ``k`` slots of a fused pack (``fused=False``:
    one unfused ``train()``, ``k`` must be 1; ``precision`` "bf16" turns its autocast on,
    anything else is fp32, and ``graphs`` does not apply; ``compile`` is ``train.compile``, its
    compilation excluded from the timing as the capture is)."""
    if not fused and k != 1:
        raise ValueError(f"an unfused run is one trial: k must be 1, got {k}")
    n = batch * (warmup + steps)
    gen = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=gen).to(device)
    labels = torch.randint(0, 10, (n,), generator=gen).to(device)
    splits = Splits(images, labels, images[:batch], labels[:batch], images[:batch],
                    labels[:batch], source="synthetic")
    t = TrainSpec(model=model, width=width, epochs=1, batch_size=batch, sync_every_steps=warmup,
                  eval_batch_size=batch, bf16=precision == "bf16" or (fused and precision == "auto"),
                  compile=compile)
    cfgs = [TrialConfig(base_lr=0.05, schedule=ScheduleConfig("constant"), train=t,
                        data=DataSpec(train_size=n, val_size=batch, test_size=batch),
                        seed=slot, sampled={}) for slot in range(k)]
    clock = _ChunkTimes()
    if fused:
        jobs = iter([SlotJob(cfg, []) for cfg in cfgs])
        train_pack(lambda: next(jobs, None), k, splits, device, lambda end: None, [clock],
                   precision=precision, graphs=graphs, compile=compile)
    else:
        train(cfgs[0], splits, device, [clock])
    return k * batch * steps / (clock.times[-1] - clock.times[0])
