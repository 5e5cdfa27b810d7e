"""The compiled pack (torch.compile, inductor) on the CPU against the eager pack, for SGD and
AdamW, with dynamo's own counters showing what was compiled (once per K: at the start and at
the shrink, nothing at refills and evaluations, no graph break); a recompile counted and warned
once; a failing compilation falling back to eager in train() and in a pack; and the pack's
one-pass evaluation against ``train.evaluate`` of each slot's model on its own.

The compiled tests are few and small because each compilation costs tens of CPU seconds here.

Both in float64 (the same code: ``test_fused`` says why): inductor's fused kernels sum in
another order than eager torch, which in float64 is ~1e-16 relative, so ``F64_TOL`` holds on
any machine and is still far below a wrong LR, a lost update or another slot's data."""

from __future__ import annotations

import dataclasses
import math
import warnings

import pytest
import torch

from torch._dynamo.utils import counters

from sweep.study.specs import DivergenceSpec
from sweep.training.data import Normalizer
from sweep.training.divergence import DivergenceMonitor
from sweep.training.fused import SlotJob, train_pack
from sweep.training.fused_model import slot_rows
from sweep.training.fused_pack import Pack, PackStats
from sweep.training.models import build_model, memory_format
from sweep.loop.pack_times import time_table
from sweep.training.train import evaluate, train
from test_fused import (CPU, EPOCHS, F64_TOL, STEPS, InjectNaN, Record, StopAtEpochEnd,
                        configs, data, make_spec)  # noqa: F401 (data: a fixture)


def _pack(jobs, capacity, splits, compile, hook=None, guards=()):
    queue, ends = iter(jobs), {}
    stats = train_pack(lambda: next(queue, None), capacity, splits, CPU,
                       lambda end: ends.__setitem__(end.key, end), guards=guards,
                       compile=compile, _pack_hook=hook)
    return stats, ends


def frames() -> int:
    """Frames dynamo has compiled in this process (a recompile and a graph break's continuation
    each count one): dynamo's own counter, not the pack's."""
    return counters["frames"]["total"]


@pytest.fixture
def fresh_dynamo():
    """Dynamo as in a fresh process (``torch.compiler.reset``: no cached compilations, so this
    test's counts are its own), raising on any recompile (``error_on_recompile``: only the pack's
    planned compilation for a new K lifts it)."""
    torch.compiler.reset()
    with torch._dynamo.config.patch(error_on_recompile=True):
        yield


class FrameLog:
    """A pack guard: dynamo's frame count at every chunk and epoch end of the pack."""

    def __init__(self):
        self.seen = []

    def on_steps(self, first_step, lrs, losses):
        self.seen.append(("steps", frames()))

    def on_epoch_end(self, epoch, metrics):
        self.seen.append(("epoch end", frames()))


@pytest.mark.slow
@pytest.mark.usefixtures("float64", "fresh_dynamo")
@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
def test_the_compiled_pack_equals_the_eager_pack(data, optimizer):
    """Capacity 2, four jobs: job 1 is poisoned with NaN after step 1 (diverges), job 0 is
    pruned at its first epoch's end; jobs 2 and 3 refill both seats in place; job 3 is pruned
    after its first epoch and the pack shrinks to job 2 alone, compiled once more for K=1.
    Every slot must equal the eager pack's, and dynamo (its own counters) compiled the step and
    the evaluation twice, once per K, and nothing else: no recompile at the refills, the
    evaluations or after the shrink, no graph break."""
    _, splits = data
    cfgs = configs(make_spec(optimizer=optimizer))
    cfgs.append(dataclasses.replace(cfgs[0], seed=14, base_lr=0.02))
    if optimizer == "adamw":  # AdamW's step is ~lr whatever the gradient: LRs of its range
        cfgs = [dataclasses.replace(c, base_lr=c.base_lr / 10) for c in cfgs]

    def run(compile, guards=(), hook=lambda p: None):
        records = [Record() for _ in cfgs]
        injector = InjectNaN(1, at_step=1)
        monitor = DivergenceMonitor(DivergenceSpec(), cfgs[1].schedule.warmup_steps, STEPS)
        listeners = [[records[0], StopAtEpochEnd(0)], [records[1], monitor, injector],
                     [records[2]], [records[3], StopAtEpochEnd(0)]]
        jobs = [SlotJob(c, lst, key=i) for i, (c, lst) in enumerate(zip(cfgs, listeners))]
        stats, ends = _pack(jobs, 2, splits, compile, guards=guards,
                            hook=lambda p: (setattr(injector, "pack", p), hook(p)))
        return records, stats, ends

    eager, eager_stats, eager_ends = run(False)
    before, log, started = frames(), FrameLog(), []
    breaks_before = sum(counters["graph_break"].values())
    compiled, stats, ends = run(True, guards=[log], hook=lambda p: started.append(frames()))
    assert not eager_stats.compiled and stats.compiled
    assert stats.refills == 2 and stats.shrinks == 1
    # dynamo: the first compilation (the loss with its backward, the update, the evaluation
    # forward: one frame each), the same again for K=1 at the shrink, nothing in between
    first = started[0] - before
    assert first == 3, first
    assert frames() - before == 2 * first
    assert counters["frames"]["ok"] == counters["frames"]["total"]
    assert sum(counters["graph_break"].values()) == breaks_before
    shrink_at = [i for i, (kind, _) in enumerate(log.seen) if kind == "epoch end"][1] + 1
    assert [n for _, n in log.seen] == \
        [before + first] * shrink_at + [before + 2 * first] * (len(log.seen) - shrink_at)
    # the pack's own record agrees
    assert stats.compiles == 2 and stats.recompiles == 0 and stats.graph_breaks == 0
    assert stats.compile_seconds > 0 and stats.time["compile"] > 0
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


def _lr_strided(pack, step: int) -> None:
    """The optimizer's LR vector, same values, in a tensor ``step`` elements apart: the compiled
    update was specialised to its strides, so dynamo recompiles it (one frame) at its next
    call. A stand-in for what the pack must notice: any recompile after its compilation."""
    lr = torch.zeros(pack.k * step, dtype=pack.optimizer.lr.dtype)[::step]
    lr.copy_(pack.optimizer.lr)
    pack.optimizer.lr = lr


@pytest.mark.slow
@pytest.mark.usefixtures("float64")
def test_a_recompile_is_counted_in_the_time_table_and_warned_once(data):
    """A compiled pack whose update dynamo has to recompile, twice: PackStats counts both (as
    many as dynamo's own frame counter grew), the time table shows them, one warning line."""
    _, splits = data
    cfgs = configs(make_spec(optimizer="adamw"))[:1]  # K=1 AdamW: the shapes the test above
    t = cfgs[0].train                                  # compiled last (nothing new to compile)
    pack = Pack(t, splits, CPU, bf16=False, graphs=False, on_end=lambda end: None,
                stats=PackStats(capacity=1), compile=True)
    pack.start([SlotJob(c, [], key=i) for i, c in enumerate(cfgs)])
    assert pack.stats.compiles == 1 and pack.stats.recompiles == 0
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        before = frames()
        for epoch, step in enumerate((2, 3)):
            _lr_strided(pack, step)
            pack.run_epoch((), epoch * pack.steps_per_epoch)
            pack.end_epoch(0.0)
    assert frames() - before == 2 and pack.stats.recompiles == 2
    ours = [str(w.message) for w in caught if "torch.compile" in str(w.message)]
    assert len(ours) == 1 and "\n" not in ours[0] and "1 recompile(s)" in ours[0], ours
    pack.stats.seconds = 1.0
    assert "pack 1: 2 recompiles and 0 graph breaks after its compilation" in time_table(
        [pack.stats])


def refuse(graph, example_inputs):
    """A torch.compile backend (the extension point ``set_stance(force_backend=...)`` takes)
    that fails, as inductor does without a C++ compiler or a Triton build."""
    raise RuntimeError("this backend compiles nothing")


@pytest.mark.slow
@pytest.mark.usefixtures("float64")
def test_a_compilation_that_fails_falls_back_to_eager_with_one_warning_line(data):
    """train() with compile on and a pack with compile on, when the compilation fails: one
    warning line each, naming the failure, and the trial trains eagerly to exactly the
    numbers of a run with compile off (the failed warm-up left no trace in its weights or
    BatchNorm statistics)."""
    _, splits = data
    cfg = configs(make_spec(epochs=1))[1]
    compiled_cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, compile=True))
    eager = Record()
    eager_result = train(cfg, splits, CPU, [eager])
    fell_back = Record()
    with warnings.catch_warnings(record=True) as caught, \
            torch.compiler.set_stance(force_backend=refuse):
        warnings.simplefilter("always")
        result = train(compiled_cfg, splits, CPU, [fell_back])
        stats, ends = _pack([SlotJob(compiled_cfg, [Record()], key=0),
                             SlotJob(dataclasses.replace(compiled_cfg, seed=5), [], key=1)],
                            2, splits, True)
    ours = [str(w.message) for w in caught if "/sweep/" in w.filename]
    assert ours == [
        "torch.compile of the model failed (BackendCompilerFailed: backend='refuse' raised: "
        "RuntimeError: this backend compiles nothing); this trial trains eagerly",
        "torch.compile of the pack step failed (BackendCompilerFailed: backend='refuse' "
        "raised: RuntimeError: this backend compiles nothing); this pack trains with the "
        "eager step"], ours
    assert result.compile_seconds == 0 and result.test_acc == eager_result.test_acc
    assert fell_back.losses == eager.losses and fell_back.lrs == eager.lrs
    assert [m["val_loss"] for m in fell_back.metrics] == [m["val_loss"] for m in eager.metrics]
    assert not stats.compiled and stats.compiles == 0
    assert ends[0].result is not None and ends[1].result is not None
