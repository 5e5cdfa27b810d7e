"""CUDA path (bf16 autocast, channels_last, cudnn.benchmark, device-resident data): runs only
where CUDA exists; on the CPU-only CI machine these are skipped, not faked."""

from __future__ import annotations

import math
from pathlib import Path

import optuna
import pytest
import torch

from sweep.training.data import load_splits
from sweep.study.schedules import LRSchedule
from sweep.study.space import trial_config
from sweep.study.spec import parse_study
from sweep.training.train import train

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

STUDY = """
trials: 1
data: {train_size: 150, val_size: 50, test_size: 40}
train: {model: resnet8, epochs: 2, batch_size: 15, sync_every_steps: 4}
space:
  warmup_steps: 5
  base_lr: 0.1
  scheduler: {cosine: {}}
"""


class Record:
    def __init__(self):
        self.lrs, self.losses = [], []

    def on_steps(self, first_step, lrs, losses):
        assert first_step == len(self.lrs)
        self.lrs += list(lrs)
        self.losses += list(losses)

    def on_epoch_end(self, epoch, metrics):
        pass


@pytest.mark.parametrize("compile_model", [False, True])
def test_a_trial_trains_on_cuda_with_bf16(tiny_cifar, compile_model):
    spec = parse_study(STUDY.replace("sync_every_steps: 4", f"sync_every_steps: 4, compile: {str(compile_model).lower()}"),
                       "gpu.yaml", Path("gpu.yaml"))
    device = torch.device("cuda")
    splits = load_splits(tiny_cifar, spec.data, device)
    assert splits.train_x.is_cuda and splits.train_x.dtype == torch.uint8
    cfg = trial_config(optuna.trial.FixedTrial({}), spec)
    record = Record()
    result = train(cfg, splits, device, [record])
    schedule = LRSchedule(cfg.schedule, spec.steps_per_epoch, spec.train.epochs)
    assert record.lrs == [schedule.lr_at(t, 0.1) for t in range(spec.total_steps)]
    assert all(math.isfinite(x) for x in record.losses)
    assert 0.0 <= result.test_acc <= 1.0
    assert (result.compile_seconds > 0) == compile_model
