"""Fused packs (issue 11) on the CPU, against the unfused references: ``train()`` for a whole
trial, each model's own forward for the fused network, torch.optim for the per-slot optimizers.
Real torch on a slice of the shared CIFAR-10 subset.

The tests that compare numbers run in float64 (``torch.set_default_dtype``: the same code;
models, batches, optimizer state and losses follow the default dtype). A fused slot differs from its unfused run
only in the order of floating-point sums (grouped vs plain convolution kernels), and in fp32
that noise, amplified by training, depends on the CPU: a bound read off one machine (1e-5 over
the first steps) failed on another (2.19e-5, AMD EPYC). In float64 the same noise is ~1e-16
relative; measured here the largest loss gap over whole trials was 9e-16 (and the unfused run
against itself with 1 vs 2 threads 2.7e-15), while fp32 training amplified its noise ~2e4-fold
over these 16 steps. ``F64_TOL`` = 1e-9 leaves a 1e6 margin over that noise and is still 1e5
below any real difference (a wrong LR, a missed update, another slot's data)."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import optuna
import pytest
import torch
from torch import nn

from sweep.study.schedules import ScheduleConfig, resolve_params
from sweep.study.space import trial_config
from sweep.study.specs import DivergenceSpec
from sweep.study.spec import parse_study
from sweep.training.data import load_splits
from sweep.training.divergence import DivergenceMonitor
from sweep.training.fused import SlotJob, train_pack
from sweep.training.fused_pack import Pack, PackStats
from sweep.training.fused_model import (fuse, fusion_problem, load_slot, module_problem,
                                        slot_rows)
from sweep.training.fused_optim import SlotAdamW, SlotSGD
from sweep.training.models import build_model, memory_format
from sweep.training.train import StopTraining, build_optimizer, train

CPU = torch.device("cpu")
EPOCHS, STEPS, BATCH = 2, 8, 16  # 128 training images
F64_TOL = 1e-9  # see the module docstring


def make_spec(model="resnet8", width=1, train_size=STEPS * BATCH, epochs=EPOCHS, optimizer="sgd",
              val_size=100):
    path = Path("fused.yaml")
    return parse_study(f"""
name: fused
trials: 1
data: {{train_size: {train_size}, val_size: {val_size}, test_size: 100}}
train: {{model: {model}, width: {width}, epochs: {epochs}, batch_size: {BATCH}, sync_every_steps: 3,
        eval_batch_size: 500, optimizer: {optimizer}}}
space: {{warmup_steps: 0, base_lr: 0.1, scheduler: {{constant: {{}}}}}}
""", str(path), path)


@pytest.fixture(scope="module")
def data(shared_cifar):
    spec = make_spec()
    return spec, load_splits(shared_cifar, spec.data, CPU, download=False)


def schedule(name, warmup=0, epochs=EPOCHS, **params):
    return ScheduleConfig(name, warmup, "linear", 0.01, resolve_params(name, params, epochs))


def configs(spec):
    """Three trials that differ in everything a slot owns: seed, base LR, schedule (a warmup,
    and a plateau whose threshold 0.5 makes it reduce after epoch 1 whatever the noise)."""
    base = trial_config(optuna.trial.FixedTrial({}), spec)
    return [dataclasses.replace(base, seed=11, base_lr=0.015,
                                schedule=schedule("cosine", warmup=5)),
            dataclasses.replace(base, seed=12, base_lr=0.03,
                                schedule=schedule("plateau", gamma=0.5, patience_epochs=0,
                                                  threshold=0.5)),
            dataclasses.replace(base, seed=13, base_lr=0.006,
                                schedule=schedule("step", gamma=0.3, step_size_epochs=1))]


class Record:
    def __init__(self):
        self.lrs, self.losses, self.metrics = [], [], []

    def on_steps(self, first_step, lrs, losses):
        assert first_step == len(self.lrs)  # every step once, in order, on the slot's clock
        self.lrs += list(lrs)
        self.losses += list(losses)

    def on_epoch_end(self, epoch, metrics):
        assert epoch == len(self.metrics)
        self.metrics.append(metrics)


def unfused(cfg, splits):
    record = Record()
    return record, train(cfg, splits, CPU, [record])


def run_pack(jobs, capacity, splits, **kwargs):
    queue, ends = iter(jobs), []
    stats = train_pack(lambda: next(queue, None), capacity, splits, CPU, ends.append, **kwargs)
    return stats, {end.key: end for end in ends}


def assert_same_trial(reference: Record, ref_result, fused: Record, end):
    assert end.result is not None, end
    assert fused.lrs == reference.lrs  # exact: the same floats from the same schedule
    assert len(fused.losses) == len(reference.losses)
    gaps = [abs(a - b) for a, b in zip(fused.losses, reference.losses)]
    assert max(gaps) <= F64_TOL, gaps
    assert [m.get("lr_reduced") for m in fused.metrics] == \
           [m.get("lr_reduced") for m in reference.metrics]
    for got, want in zip(fused.metrics, reference.metrics):
        assert abs(got["val_loss"] - want["val_loss"]) <= F64_TOL
        assert got["val_acc"] == want["val_acc"]
    assert end.result.test_acc == ref_result.test_acc
    assert end.result.steps == ref_result.steps
    assert [sorted(m) for m in end.result.history] == [sorted(m) for m in ref_result.history]


def assert_pack_equals_unfused(cfgs, splits):
    """One pack of all ``cfgs`` against one unfused train() per config; returns
    (PackStats, the unfused Records)."""
    references = [unfused(cfg, splits) for cfg in cfgs]
    records = [Record() for _ in cfgs]
    stats, ends = run_pack([SlotJob(c, [r], key=i) for i, (c, r) in enumerate(zip(cfgs, records))],
                           len(cfgs), splits)
    for i, ((reference, result), record) in enumerate(zip(references, records)):
        assert_same_trial(reference, result, record, ends[i])
    return stats, [reference for reference, _ in references]


@pytest.mark.usefixtures("float64")
def test_a_fused_pack_of_three_equals_three_unfused_trials(data):
    spec, splits = data
    stats, references = assert_pack_equals_unfused(configs(spec), splits)
    assert references[1].metrics[-1]["lr_reduced"]  # the plateau slot did reduce
    assert stats.slot_steps == 3 * EPOCHS * STEPS and stats.wasted_slot_steps == 0
    assert stats.images == stats.slot_steps * BATCH and stats.precision == "fp32"


@pytest.mark.usefixtures("float64")
@pytest.mark.parametrize("model,width", [("resnet8", 2), ("resnet14", 1)])
def test_wider_and_deeper_resnets_fuse_too(shared_cifar, model, width):
    spec = make_spec(model, width, train_size=4 * BATCH, epochs=1)
    splits = load_splits(shared_cifar, spec.data, CPU, download=False)
    base = trial_config(optuna.trial.FixedTrial({}), spec)
    cfgs = [dataclasses.replace(base, seed=s, base_lr=lr) for s, lr in ((5, 0.01), (6, 0.02))]
    assert_pack_equals_unfused(cfgs, splits)


@pytest.mark.usefixtures("float64")
@pytest.mark.parametrize("model", ["resnet18", "resnet8"])
def test_the_fused_forward_is_each_models_forward(model):
    """resnet18 trains too slowly on this CPU: its forward (train and eval mode) and its
    gradients are checked instead; training adds nothing model-specific."""
    k = 3
    models = []
    for seed in range(k):
        torch.manual_seed(seed)
        models.append(build_model(model).to(memory_format=memory_format()))
    net = fuse(models[0], k, CPU)
    for slot, m in enumerate(models):
        load_slot(net, k, slot, m)
    torch.manual_seed(99)
    xs = [torch.randn(4, 3, 32, 32).contiguous(memory_format=memory_format())
          for _ in range(k)]
    stacked = torch.cat(xs, 1).contiguous(memory_format=memory_format())
    for train_mode in (True, False):
        net.train(train_mode)
        for m in models:
            m.train(train_mode)
        out = net(stacked)
        assert out.shape == (4, k, 10)
        wants = [m(x) for m, x in zip(models, xs)]
        for slot, want in enumerate(wants):
            torch.testing.assert_close(out[:, slot], want, rtol=F64_TOL, atol=F64_TOL)
        if train_mode:  # the gradient of the summed losses is each model's own gradient
            sum(o.square().mean() for o in out.unbind(1)).backward()
            sum(w.square().mean() for w in wants).backward()
            fused_grads = dict(net.named_parameters())
            for slot, m in enumerate(models):
                for name, p in m.named_parameters():
                    got = slot_rows(fused_grads[name].grad, k)[slot].reshape(p.shape)
                    torch.testing.assert_close(got, p.grad, rtol=F64_TOL, atol=F64_TOL)
    # BatchNorm running statistics moved per slot, as each model's did
    stats = dict(net.named_buffers())
    for slot, m in enumerate(models):
        for name, b in m.named_buffers():
            if b.dim():
                torch.testing.assert_close(slot_rows(stats[name], k)[slot].reshape(b.shape), b,
                                           rtol=F64_TOL, atol=F64_TOL)


# Per-slot hyperparameters: four slots that differ in every one of them (nesterov with momentum
# 0 included: torch then runs plain SGD), and a fifth set that a refilled slot takes.
SGD_SLOTS = [dict(weight_decay=5e-4, momentum=0.9, nesterov=True, label_smoothing=0.0),
             dict(weight_decay=0.0, momentum=0.5, nesterov=False, label_smoothing=0.1),
             dict(weight_decay=1e-2, momentum=0.0, nesterov=True, label_smoothing=0.3),
             dict(weight_decay=2e-3, momentum=0.95, nesterov=False, label_smoothing=0.05)]
SGD_REFILL = dict(weight_decay=3e-3, momentum=0.7, nesterov=True, label_smoothing=0.2)
ADAMW_SLOTS = [dict(weight_decay=5e-4, beta1=0.9, beta2=0.999, label_smoothing=0.0),
               dict(weight_decay=0.0, beta1=0.8, beta2=0.99, label_smoothing=0.1),
               dict(weight_decay=1e-1, beta1=0.0, beta2=0.9, label_smoothing=0.3),
               dict(weight_decay=2e-2, beta1=0.95, beta2=0.9999, label_smoothing=0.05)]
ADAMW_REFILL = dict(weight_decay=5e-2, beta1=0.7, beta2=0.95, label_smoothing=0.2)
PER_SLOT = {"sgd": (SGD_SLOTS, SGD_REFILL), "adamw": (ADAMW_SLOTS, ADAMW_REFILL)}


def with_train(cfg, **values):
    return dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, **values))


@pytest.mark.usefixtures("float64")
@pytest.mark.parametrize("kind", ["sgd", "adamw"])
def test_the_slot_optimizers_are_torch_optim_per_slot(kind):
    """Slot k of the vector optimizer follows torch.optim built by build_optimizer with slot k's
    hyperparameters (LR, weight decay, momentum and nesterov or betas: different per slot, the LR
    changed every step), decay only on ndim > 1; a slot reset mid-run with other
    hyperparameters (a refill) follows a fresh torch.optim with those from there (AdamW's bias
    correction restarts at step 1 for that slot alone)."""
    spec = make_spec(optimizer=kind)
    slots, refill = PER_SLOT[kind]
    lrs = [0.1, 0.03, 0.5, 0.2]
    k = len(slots)
    models = []
    for seed in range(k):
        torch.manual_seed(seed)
        models.append(nn.Sequential(nn.Conv2d(3, 4, 3, bias=False), nn.BatchNorm2d(4),
                                    nn.Flatten(), nn.Linear(4 * 4 * 4, 3)))
    net = fuse(models[0], k, CPU)
    for slot, m in enumerate(models):
        load_slot(net, k, slot, m)
    names = [n for n, _ in net.named_parameters()]
    decay = [dict(models[0].named_parameters())[n].ndim > 1 for n in names]
    params = [p for _, p in net.named_parameters()]
    ours = SlotSGD(params, decay, k) if kind == "sgd" else SlotAdamW(params, decay, k)
    base = trial_config(optuna.trial.FixedTrial({}), spec)
    cfgs = [with_train(dataclasses.replace(base, base_lr=lr), **values)
            for lr, values in zip(lrs, slots)]
    theirs = [build_optimizer(m, cfg) for m, cfg in zip(models, cfgs)]
    for slot, cfg in enumerate(cfgs):
        ours.set_slot(slot, cfg.train)
    for opt in theirs:
        assert isinstance(opt, torch.optim.AdamW if kind == "adamw" else torch.optim.SGD)
    gen = torch.Generator().manual_seed(0)
    for step in range(7):
        if step == 3:  # slot 1 is refilled with a trial of other values
            cfgs[1] = with_train(cfgs[1], **refill)
            ours.reset_slot(1)
            ours.set_slot(1, cfgs[1].train)
            theirs[1] = build_optimizer(models[1], cfgs[1])
        factor = 1.0 / (1 + step)  # a new LR every step, as a schedule writes it
        ours.lr.copy_(torch.tensor([lr * factor for lr in lrs]))
        for slot, (m, opt) in enumerate(zip(models, theirs)):
            for group in opt.param_groups:
                group["lr"] = lrs[slot] * factor
            for p in m.parameters():
                p.grad = torch.randn(p.shape, generator=gen)
            opt.step()
        for name, p in net.named_parameters():  # the same gradients, stacked
            row_shape = slot_rows(p, k).shape[1:]
            p.grad.copy_(torch.stack([dict(m.named_parameters())[name].grad.reshape(row_shape)
                                      for m in models]).reshape(p.shape))
        ours.step()
        for slot, m in enumerate(models):
            for name, p in m.named_parameters():
                got = slot_rows(dict(net.named_parameters())[name], k)[slot].reshape(p.shape)
                torch.testing.assert_close(got, p.detach(), rtol=F64_TOL, atol=F64_TOL)


@pytest.mark.usefixtures("float64")
@pytest.mark.parametrize("kind", ["sgd", "adamw"])
def test_a_pack_of_four_with_different_hyperparameters_equals_four_unfused_trials(shared_cifar,
                                                                                   kind):
    """Four slots that differ in weight decay, momentum and nesterov (SGD) or betas (AdamW),
    and label smoothing; slot 0 is stopped after its first epoch and refilled with a fifth
    trial of yet other values. Every slot that trains to the end equals its unfused train()."""
    spec = make_spec(optimizer=kind, train_size=2 * BATCH, val_size=32)  # 2 steps per epoch
    splits = load_splits(shared_cifar, spec.data, CPU, download=False)
    slots, refill = PER_SLOT[kind]
    base = trial_config(optuna.trial.FixedTrial({}), spec)
    lrs = [0.02, 0.05, 0.01, 0.03, 0.04] if kind == "sgd" else [2e-3, 5e-3, 1e-3, 3e-3, 4e-3]
    cfgs = [with_train(dataclasses.replace(base, seed=20 + i, base_lr=lr,
                                           schedule=schedule("cosine", warmup=2)), **values)
            for i, (lr, values) in enumerate(zip(lrs, slots + [refill]))]
    references = {i: unfused(cfgs[i], splits) for i in (1, 2, 3, 4)}
    records = [Record() for _ in cfgs]
    listeners = [[r] for r in records]
    listeners[0].append(StopAtEpochEnd(0))
    stats, ends = run_pack([SlotJob(c, lst, key=i) for i, (c, lst) in
                            enumerate(zip(cfgs, listeners))], 4, splits)
    assert stats.refills == 1 and ends[0].stop is not None
    for i, (reference, result) in references.items():
        assert_same_trial(reference, result, records[i], ends[i])


class Exotic(nn.Module):
    def __init__(self, layer):
        super().__init__()
        self.conv, self.layer, self.head = nn.Conv2d(3, 4, 3), layer, nn.Linear(4, 2)

    def forward(self, x):
        x = self.layer(self.conv(x))
        return self.head(x.mean((2, 3)))


class MixesChannels(Exotic):
    def forward(self, x):  # a channel roll: slot k would read slot k+1's features
        x = torch.roll(self.conv(x), 1, dims=1)
        return self.head(x.mean((2, 3)))


def test_fusion_problem_names_what_cannot_be_fused():
    for model in ("resnet8", "resnet20", "resnet18"):
        assert fusion_problem(model, 1) is None
    assert fusion_problem("resnet8", 2) is None
    assert "6n+2" in fusion_problem("resnet9", 1)
    assert module_problem(Exotic(nn.GroupNorm(2, 4)), Exotic(nn.GroupNorm(2, 4))) == \
        "layer layer is a GroupNorm, which fusion does not know"
    assert "not the head" in module_problem(Exotic(nn.Linear(4, 4)), Exotic(nn.Linear(4, 4)))
    assert module_problem(MixesChannels(nn.Identity()), MixesChannels(nn.Identity())) == \
        "its forward mixes the slots' channels"
    assert module_problem(Exotic(nn.ReLU()), Exotic(nn.ReLU())) is None


class InjectNaN:
    """A slot listener that writes NaN into its own slot's first convolution after step
    ``at_step`` (the pack is handed over by train_pack's test hook)."""

    def __init__(self, key, at_step):
        self.key, self.at_step, self.pack, self.done = key, at_step, None, False

    def on_steps(self, first_step, lrs, losses):
        if not self.done and first_step + len(lrs) > self.at_step:
            slot = [s.job.key for s in self.pack.slots].index(self.key)
            weight = next(self.pack.net.parameters())
            with torch.no_grad():
                slot_rows(weight, self.pack.k)[slot].fill_(math.nan)
            self.done = True

    def on_epoch_end(self, epoch, metrics):
        pass


@pytest.mark.usefixtures("float64")
def test_a_diverging_slot_does_not_touch_the_others(data):
    spec, splits = data
    cfgs = configs(spec)

    def pack(inject: bool):
        records = [Record() for _ in cfgs]
        monitor = DivergenceMonitor(DivergenceSpec(), cfgs[1].schedule.warmup_steps, STEPS)
        injector = InjectNaN(1, at_step=1)
        listeners = [[records[0]], [records[1], monitor] + ([injector] if inject else []),
                     [records[2]]]
        jobs = [SlotJob(c, lst, key=i) for i, (c, lst) in enumerate(zip(cfgs, listeners))]
        hook = (lambda p: setattr(injector, "pack", p)) if inject else None
        stats, ends = run_pack(jobs, 3, splits, _pack_hook=hook)
        return records, stats, ends

    clean, _, clean_ends = pack(inject=False)
    hurt, stats, ends = pack(inject=True)
    stop = ends[1].stop
    assert stop is not None and stop.reason == "diverged" and ends[1].result is None
    # injected after step 2 (the first chunk, steps 0-2): step 3 is the first NaN loss
    assert stop.step == 3 and stop.detail["loss"] == "nan"
    assert hurt[1].losses[:3] == clean[1].losses[:3] and math.isnan(hurt[1].losses[3])
    assert len(hurt[1].lrs) == 6  # no listener call after the chunk that stopped it
    for i in (0, 2):
        assert hurt[i].lrs == clean[i].lrs
        # Within epoch 0 the pack is the same: bit for bit. From epoch 1 the hurt pack has
        # shrunk to 2 slots (grouped kernels for 2 groups, not 3): summation order only.
        assert hurt[i].losses[:STEPS] == clean[i].losses[:STEPS]
        gaps = [abs(a - b) for a, b in zip(hurt[i].losses, clean[i].losses)]
        assert max(gaps) <= F64_TOL, gaps
        assert ends[i].result.test_acc == clean_ends[i].result.test_acc
    assert stats.shrinks == 1 and stats.wasted_slot_steps == STEPS
    assert stats.idle_slot_steps == STEPS - 6  # LR 0 until the epoch's end
    assert stats.slot_steps == 2 * EPOCHS * STEPS + 6


class StopAtEpochEnd:
    def __init__(self, epoch):
        self.epoch = epoch

    def on_steps(self, first_step, lrs, losses):
        pass

    def on_epoch_end(self, epoch, metrics):
        if epoch == self.epoch:
            raise StopTraining("pruner", (epoch + 1) * STEPS - 1, epoch)


@pytest.mark.usefixtures("float64")
def test_a_stopped_slot_is_refilled_and_the_last_pack_shrinks(data):
    spec, splits = data
    cfgs = configs(spec)
    reference, ref_result = unfused(cfgs[2], splits)
    records = [Record() for _ in cfgs]
    listeners = [[records[0], StopAtEpochEnd(0)], [records[1]], [records[2]]]
    queue = iter([SlotJob(c, lst, key=i) for i, (c, lst) in enumerate(zip(cfgs, listeners))])
    calls, ends = [], []

    def next_job():
        calls.append(1)
        return next(queue, None)

    stats = train_pack(next_job, 2, splits, CPU, ends.append)
    assert [e.key for e in ends] == [0, 1, 2]
    assert ends[0].stop.reason == "pruner" and len(records[0].metrics) == 1
    assert ends[1].result is not None and ends[2].result is not None
    # job 2 started at the pack's epoch 1 on its own clock (steps and epochs from 0), shared
    # the pack with job 1, then trained its last epoch alone after the shrink: as unfused
    assert_same_trial(reference, ref_result, records[2], ends[2])
    assert len(calls) == 2 + 1 + 1 + 1  # start; refill; None (shrink); None (all done)
    assert stats.jobs == 3 and stats.refills == 1 and stats.shrinks == 1
    assert stats.wasted_slot_steps == STEPS and stats.idle_slot_steps == 0
    assert stats.slot_steps == 5 * STEPS


class Raises:
    def __init__(self, error):
        self.error = error

    def on_steps(self, first_step, lrs, losses):
        raise self.error

    def on_epoch_end(self, epoch, metrics):
        pass


def test_a_failing_listener_fails_its_slot_alone_and_base_exceptions_propagate(data):
    spec, splits = data
    cfgs = configs(spec)
    other = dataclasses.replace(cfgs[2], train=dataclasses.replace(cfgs[2].train, batch_size=BATCH // 2))
    records = [Record(), Record()]
    jobs = [SlotJob(cfgs[0], [Raises(RuntimeError("listener broke"))], key="bad"),
            SlotJob(other, [], key="other"),  # differs in a shared key: ends at once
            SlotJob(cfgs[1], [records[1]], key="good")]
    stats, ends = run_pack(jobs, 2, splits)
    assert str(ends["bad"].error) == "listener broke"
    assert "train.batch_size differs" in str(ends["other"].error)
    assert ends["good"].result is not None and len(records[1].lrs) == EPOCHS * STEPS
    assert stats.wasted_slot_steps == STEPS
    with pytest.raises(KeyboardInterrupt):
        run_pack([SlotJob(cfgs[0], [Raises(KeyboardInterrupt())], key=0)], 1, splits)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine where capture fails")
def test_a_failed_graph_capture_says_so_and_the_pack_trains_eagerly(data):
    spec, splits = data
    cfg = configs(spec)[0]
    ends, record = [], Record()
    pack = Pack(cfg.train, splits, CPU, bf16=False, graphs=True, on_end=ends.append,
                stats=PackStats())
    with pytest.warns(UserWarning, match="CUDA graph capture failed .*; this pack trains eagerly"):
        pack.start([SlotJob(cfg, [record], key=0)])
    assert not pack.use_graphs
    pack.run_epoch((), 0)
    assert len(record.lrs) == STEPS and all(math.isfinite(x) for x in record.losses)


def test_when_every_slot_has_ended_the_pack_refills_without_finishing_the_epoch(data):
    spec, splits = data
    cfgs = configs(spec)
    broke = [SlotJob(c, [Raises(RuntimeError("x"))], key=i) for i, c in enumerate(cfgs[:2])]
    record = Record()
    stats, ends = run_pack(broke + [SlotJob(cfgs[2], [record], key=2)], 2, splits)
    assert all(ends[i].error for i in (0, 1)) and ends[2].result is not None
    # both ended after their first chunk (3 steps): no idle steps to the epoch's end
    assert stats.idle_slot_steps == 0 and stats.wasted_slot_steps == 2 * 3
    assert len(record.lrs) == EPOCHS * STEPS and stats.shrinks == 1


class _Steps:
    """A listener that keeps the first step of each chunk it hears (a resumed slot's clock
    starts at its checkpoint's step)."""

    def __init__(self):
        self.first: list[int] = []

    def on_steps(self, first_step, lrs, losses):
        if not self.first or first_step % STEPS == 0 and first_step > self.first[-1]:
            self.first.append(first_step)

    def on_epoch_end(self, epoch, metrics):
        pass


@pytest.mark.slow
@pytest.mark.usefixtures("float64")
def test_a_trial_beside_a_resumed_slot_trains_as_it_does_alone(data):
    """A trial's numerics are its configuration's, never its pack's: config A trained alone (a
    pack of one) and in a pack beside a slot that resumes config B's epoch-1 state gives the
    same curve (the same LRs; losses and metrics within F64_TOL in float64); both packs train
    in the study's precision. A job resuming a state trained in another precision is refused
    in one line, and the pack trains on."""
    spec, splits = data
    a, b, _ = configs(spec)
    states = []
    train(b, splits, CPU, [Record()], checkpoint=lambda take: states.append(take()))
    resumed = states[0]
    assert resumed["epochs"] == 1 and resumed["precision"] == "fp32"

    alone = Record()
    stats_alone, ends_alone = run_pack([SlotJob(a, [alone], key="a")], 1, splits)
    beside, other = Record(), _Steps()
    stats, ends = run_pack([SlotJob(b, [other], key="b", resume=resumed),
                            SlotJob(a, [beside], key="a")], 2, splits)
    assert stats_alone.precision == stats.precision == "fp32"
    assert ends["b"].result is not None and other.first == [STEPS]  # its last epoch only
    assert_same_trial(alone, ends_alone["a"].result, beside, ends["a"])

    refused = _Steps()  # alone: the pack ends it before training anything
    stats, ends = run_pack([SlotJob(b, [refused], key="b",
                                    resume={**resumed, "precision": "bf16"})], 1, splits)
    assert refused.first == [] and stats.slot_steps == 0
    assert str(ends["b"].error) == ("the job resumes a state trained in bf16 and the pack trains "
                                    "in fp32; restart it from step 0 or train it in a pack of "
                                    "its own precision")
