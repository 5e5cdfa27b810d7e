"""Issue 18 on the CPU: the compiled pack (torch.compile, inductor) against the eager pack, and
the pack's one-pass evaluation against ``train.evaluate`` of each slot's model on its own.

Both in float64 (the same code: ``test_fused`` says why): inductor's fused kernels sum in
another order than eager torch, which in float64 is ~1e-16 relative, so ``F64_TOL`` holds on
any machine and is still far below a wrong LR, a lost update or another slot's data."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from sweep.study.spec import DivergenceSpec
from sweep.training.data import Normalizer
from sweep.training.divergence import DivergenceMonitor
from sweep.training.fused import SlotJob, train_pack
from sweep.training.fused_model import slot_rows
from sweep.training.fused_pack import Pack, PackStats
from sweep.training.models import build_model, memory_format
from sweep.training.train import evaluate
from test_fused import (CPU, EPOCHS, F64_TOL, STEPS, InjectNaN, Record, StopAtEpochEnd,
                        configs, data)  # noqa: F401 (data: a fixture)


def _pack(jobs, capacity, splits, compile, hook=None):
    queue, ends = iter(jobs), {}
    stats = train_pack(lambda: next(queue, None), capacity, splits, CPU,
                       lambda end: ends.__setitem__(end.key, end), compile=compile,
                       _pack_hook=hook)
    return stats, ends


@pytest.mark.slow
@pytest.mark.usefixtures("float64")
def test_the_compiled_pack_equals_the_eager_pack(data):
    """Capacity 2, four jobs: job 1 is poisoned with NaN after step 1 (diverges), job 0 is
    pruned at its first epoch's end; jobs 2 and 3 refill both seats in place (no
    recompilation); job 3 is pruned after its first epoch and the pack shrinks to job 2 alone
    (uncompiled: still no recompilation). Every slot must equal the eager pack's."""
    spec, splits = data
    cfgs = configs(spec)
    cfgs.append(dataclasses.replace(cfgs[0], seed=14, base_lr=0.02))

    def run(compile):
        records = [Record() for _ in cfgs]
        injector = InjectNaN(1, at_step=1)
        monitor = DivergenceMonitor(DivergenceSpec(), cfgs[1].schedule.warmup_steps, STEPS)
        listeners = [[records[0], StopAtEpochEnd(0)], [records[1], monitor, injector],
                     [records[2]], [records[3], StopAtEpochEnd(0)]]
        jobs = [SlotJob(c, lst, key=i) for i, (c, lst) in enumerate(zip(cfgs, listeners))]
        stats, ends = _pack(jobs, 2, splits, compile,
                            hook=lambda p: setattr(injector, "pack", p))
        return records, stats, ends

    eager, eager_stats, eager_ends = run(False)
    compiled, stats, ends = run(True)
    assert not eager_stats.compiled and stats.compiled
    assert stats.compiles == 1 and stats.compile_seconds > 0 and stats.time["compile"] > 0
    assert stats.refills == 2 and stats.shrinks == 1
    assert ends[1].stop.reason == "diverged" and ends[0].stop.reason == "pruner"
    assert ends[2].result is not None and ends[3].stop.reason == "pruner"
    for i in range(len(cfgs)):
        assert compiled[i].lrs == eager[i].lrs
        got, want = compiled[i].losses, eager[i].losses
        assert len(got) == len(want)
        for a, b in zip(got, want):  # NaN where the eager slot had NaN, nowhere else
            assert (math.isnan(a) and math.isnan(b)) or abs(a - b) <= F64_TOL, (i, got, want)
        for m, n in zip(compiled[i].metrics, eager[i].metrics):
            assert abs(m["val_loss"] - n["val_loss"]) <= F64_TOL and m["val_acc"] == n["val_acc"]
    assert math.isnan(compiled[1].losses[3]) and not any(map(math.isnan, compiled[0].losses))
    assert len(compiled[2].lrs) == EPOCHS * STEPS
    assert ends[2].result.test_acc == eager_ends[2].result.test_acc


@pytest.mark.usefixtures("float64")
def test_a_pack_evaluates_every_slot_in_one_pass_as_train_evaluates_each_model(data):
    """The fused network over a split (each image repeated for the K slots, one pass) gives
    each slot the (loss, accuracy) that ``train.evaluate`` gives that slot's model alone:
    the models are taken out of the pack after some training (BatchNorm statistics moved),
    and the split's last batch is short (eval_batch_size 64 over 100 images)."""
    spec, splits = data
    cfgs = configs(spec)
    t = dataclasses.replace(cfgs[0].train, eval_batch_size=64)
    pack = Pack(t, splits, CPU, bf16=False, graphs=False, on_end=lambda end: None,
                stats=PackStats())
    pack.start([SlotJob(c, [], key=i) for i, c in enumerate(cfgs)])
    pack.run_epoch((), 0)  # one epoch of training: weights and running statistics differ
    losses, accuracies = pack.evaluate(splits.val_x, splits.val_y)
    assert pack.stats.time["evaluation"] > 0
    normalize = Normalizer(CPU, memory_format() == torch.channels_last)
    state = dict(pack.net.state_dict())
    for k, cfg in enumerate(cfgs):
        model = build_model(cfg.train.model, cfg.train.width)  # slot k's model, taken out
        with torch.no_grad():
            for name, want in model.state_dict().items():
                if want.dim():
                    want.copy_(slot_rows(state[name], len(cfgs))[k].reshape(want.shape))
        loss, accuracy = evaluate(model, splits.val_x, splits.val_y, normalize, 64,
                                  lambda: torch.autocast("cpu", enabled=False))
        assert abs(losses[k] - loss) <= F64_TOL and accuracies[k] == accuracy, (k, loss)
    assert len(set(losses)) == len(cfgs)  # the slots really differ
