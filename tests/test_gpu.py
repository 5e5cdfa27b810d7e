"""CUDA path (bf16 autocast, channels_last, cudnn.benchmark, device-resident data): runs only
where CUDA exists; on the CPU-only CI machine these are skipped, not faked.

Equivalence tests run under deterministic algorithms (``deterministic`` fixture: cuDNN
deterministic, no autotuning, ``torch.use_deterministic_algorithms``, a fixed cuBLAS
workspace), where the same kernels must give the same bits: the CUDA-graph step is compared
with the eager step exactly. What runs other kernels (torch.compile's fused kernels, grouped vs
plain convolutions) is compared in float64, where summation order costs ~1e-16 relative and
``F64_TOL`` = 1e-9 holds on any card (an fp32 bound read off one run failed on an H100: late
loss gap 0.0268 > 0.02, cuDNN's nondeterministic reductions amplified by training)."""

from __future__ import annotations

import math
import os
from pathlib import Path

# cuBLAS reads this when it starts: before anything touches CUDA (torch.use_deterministic_
# algorithms requires it; ":4096:8" is the value the torch docs give)
os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")

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

F64_TOL = 1e-9


@pytest.fixture
def deterministic():
    before = (torch.are_deterministic_algorithms_enabled(), torch.backends.cudnn.deterministic,
              torch.backends.cudnn.benchmark)
    # warn_only: AdaptiveAvgPool2d's CUDA backward is flagged, but to a 1x1 output each input
    # element gets exactly one contribution, so it is deterministic here
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
    yield
    torch.use_deterministic_algorithms(before[0])
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = before[1], before[2]

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


# --- fused packs (issue 11): the CUDA-graph step against the eager step and against train() ---

FUSED_STUDY = """
trials: 1
data: {train_size: 150, val_size: 50, test_size: 40}
train: {model: resnet8, epochs: 2, batch_size: 15, sync_every_steps: 4, bf16: false, compile: false}
space:
  warmup_steps: 5
  base_lr: 0.05
  scheduler: {cosine: {}}
"""


def _fused_configs(k):
    import dataclasses

    spec = parse_study(FUSED_STUDY, "gpu.yaml", Path("gpu.yaml"))
    base = trial_config(optuna.trial.FixedTrial({}), spec)
    return spec, [dataclasses.replace(base, seed=10 + i, base_lr=0.02 * (i + 1)) for i in range(k)]


def _run_pack(cfgs, splits, capacity, graphs, stop_first=False, compile=False):
    from sweep.training.fused import SlotJob, train_pack

    class Stop(Record):
        def on_epoch_end(self, epoch, metrics):
            from sweep.training.train import StopTraining

            raise StopTraining("pruner", 0, epoch)

    records = [Stop() if stop_first and i == 0 else Record() for i in range(len(cfgs))]
    queue = iter([SlotJob(c, [r], key=i) for i, (c, r) in enumerate(zip(cfgs, records))])
    ends = {}
    stats = train_pack(lambda: next(queue, None), capacity, splits, torch.device("cuda"),
                       lambda end: ends.__setitem__(end.key, end), precision="fp32",
                       graphs=graphs, compile=compile)
    return records, ends, stats


@pytest.mark.usefixtures("deterministic")
@pytest.mark.parametrize("k", [1, 4])
def test_the_cuda_graph_step_equals_the_eager_step(tiny_cifar, k):
    """The same kernels, replayed: bit for bit (fp32, deterministic algorithms)."""
    spec, cfgs = _fused_configs(k)
    splits = load_splits(tiny_cifar, spec.data, torch.device("cuda"))
    eager, eager_ends, eager_stats = _run_pack(cfgs, splits, k, "off")
    graphed, graphed_ends, stats = _run_pack(cfgs, splits, k, "on")
    assert stats.graphs and not eager_stats.graphs and stats.capture_seconds > 0
    for i in range(k):
        assert graphed[i].lrs == eager[i].lrs and len(graphed[i].lrs) == spec.total_steps
        assert graphed[i].losses == eager[i].losses
        assert graphed_ends[i].result.test_acc == eager_ends[i].result.test_acc


@pytest.mark.usefixtures("deterministic", "float64")
def test_the_compiled_graphed_pack_equals_the_eager_pack_through_a_refill(tiny_cifar):
    """torch.compile then a CUDA graph against the eager step, float64: capacity 2, job 0
    pruned after epoch 0, job 2 refills its seat (written into the compiled graph's memory),
    then the pack shrinks and compiles its step once more, for K=1 (and nothing else)."""
    spec, cfgs = _fused_configs(3)
    splits = load_splits(tiny_cifar, spec.data, torch.device("cuda"))
    eager, eager_ends, _ = _run_pack(cfgs, splits, 2, "off", stop_first=True)
    compiled, ends, stats = _run_pack(cfgs, splits, 2, "on", stop_first=True, compile=True)
    assert stats.compiled and stats.compiles == 2 and stats.graphs and stats.compile_seconds > 0
    assert stats.refills == 1 and stats.shrinks == 1
    assert stats.recompiles == 0 and stats.graph_breaks == 0
    for i in range(3):
        assert compiled[i].lrs == eager[i].lrs
        _assert_losses_close(compiled[i].losses, eager[i].losses, F64_TOL)
    assert ends[2].result.test_acc == eager_ends[2].result.test_acc


@pytest.mark.usefixtures("deterministic", "float64")
def test_a_graphed_pack_refills_in_place_and_recaptures_when_it_shrinks(tiny_cifar):
    """Capacity 2, 3 jobs, job 0 pruned after epoch 0: job 2 is written into the captured
    graph's storages and must train as its unfused run does (float64: grouped vs plain
    kernels differ only in summation order); then the pack shrinks."""
    spec, cfgs = _fused_configs(3)
    device = torch.device("cuda")
    splits = load_splits(tiny_cifar, spec.data, device)
    reference = Record()
    train(cfgs[2], splits, device, [reference])
    records, ends, stats = _run_pack(cfgs, splits, 2, "on", stop_first=True)
    assert stats.graphs and stats.refills == 1 and stats.shrinks == 1
    assert ends[0].stop is not None and ends[2].result is not None
    assert records[2].lrs == reference.lrs
    _assert_losses_close(records[2].losses, reference.losses, F64_TOL)


def _assert_losses_close(got, want, tol):
    assert len(got) == len(want)
    gaps = [abs(a - b) for a, b in zip(got, want)]
    assert max(gaps) <= tol, gaps


@pytest.mark.usefixtures("deterministic", "float64")
def test_a_graphed_pack_keeps_an_empty_seat_rather_than_recapture(tiny_cifar):
    """Capacity 4, job 0 pruned after epoch 0 and no job left: under a CUDA graph the pack
    keeps the empty seat (3 of 4 live: a recapture would cost more than the seat), eagerly it
    shrinks; every other slot trains the same either way (float64)."""
    spec, cfgs = _fused_configs(4)
    splits = load_splits(tiny_cifar, spec.data, torch.device("cuda"))
    eager, eager_ends, eager_stats = _run_pack(cfgs, splits, 4, "off", stop_first=True)
    graphed, ends, stats = _run_pack(cfgs, splits, 4, "on", stop_first=True)
    assert eager_stats.shrinks == 1 and stats.shrinks == 0 and stats.graphs
    assert stats.empty_seat_steps == spec.steps_per_epoch and eager_stats.empty_seat_steps == 0
    for i in range(1, 4):
        assert graphed[i].lrs == eager[i].lrs
        _assert_losses_close(graphed[i].losses, eager[i].losses, F64_TOL)
        assert ends[i].result.test_acc == eager_ends[i].result.test_acc
