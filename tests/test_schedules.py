"""sweep.study.schedules against torch's own scheduler classes and Hugging Face transformers'
own schedule functions.

The torch reference for a warmup W and a main scheduler is built the way ``SequentialLR`` would
run it: for t < W a ``LinearLR`` on a one-parameter-per-group SGD stepped t times; for t >= W a
fresh optimizer at the base LRs whose main scheduler was stepped t - W times (per-epoch
schedulers: floor((t - W) / S) times). Every step is compared, 1e-9 relative.
"""

from __future__ import annotations

import io
from pathlib import Path

import optuna
import pytest
import torch
import transformers
from torch.optim import lr_scheduler as tl

from helpers import torch_lr_reference
from sweep.errors import StudyFileError
from sweep.study.schedules import (SCHEDULERS, LRSchedule, ScheduleConfig, check_schedule, lr_curve,
                             resolve_params)

S, E = 7, 6
T = S * E  # 42 steps
WARMUPS = [0, 5, T - 1]  # none; odd and not a multiple of S; the longest allowed (T - 1)
BASE_LRS = [(0.4,), (0.4, 0.03)]  # one group; two groups with different base LRs
F0 = 0.01  # torch LinearLR needs start_factor > 0
VAL_LOSSES = [2.0, 1.5, 1.6, 1.55, 1.2, 1.3]  # one per epoch: improvements and plateaus
REL = 1e-9


def _optimizer(base_lrs) -> torch.optim.SGD:
    groups = [{"params": [torch.nn.Parameter(torch.zeros(1))], "lr": lr} for lr in base_lrs]
    return torch.optim.SGD(groups, lr=base_lrs[0])


def _lrs(opt) -> list[float]:
    return [float(g["lr"]) for g in opt.param_groups]


def torch_reference(main, base_lrs, warmup, f0=F0, per_epoch=False, val_losses=None):
    """``curve[t][g]`` from torch classes over this module's S x E steps (helpers.torch_lr_reference)."""
    return torch_lr_reference(main, base_lrs, warmup, S, T, f0, per_epoch, val_losses)


def sweep_curve(name, params, base_lrs, warmup, f0=F0, shape="linear", val_losses=None):
    resolved = resolve_params(name, params, E)
    cfg = ScheduleConfig(name, warmup, shape, f0, resolved)
    for base in base_lrs:
        check_schedule(cfg, S, E, base)
    per_group = [lr_curve(cfg, base, S, E, val_losses) for base in base_lrs]
    return [list(step) for step in zip(*per_group)]


def assert_curves_equal(ours, ref):
    assert len(ours) == len(ref) == T
    for t, (a, b) in enumerate(zip(ours, ref)):
        assert a == pytest.approx(b, rel=REL, abs=0), f"step {t}: sweep {a} vs reference {b}"


# name, sweep params, torch main-scheduler factory (opt, N) -> scheduler, stepped per epoch
TORCH_CASES = {
    "constant": ({}, lambda o, n: tl.LambdaLR(o, lambda k: 1.0), False),
    "step": ({"gamma": 0.5, "step_size_epochs": 2},
             lambda o, n: tl.StepLR(o, step_size=2 * S, gamma=0.5), False),
    "step_per_epoch": ({"gamma": 0.7, "step_size_epochs": 1},
                       lambda o, n: tl.StepLR(o, step_size=1, gamma=0.7), True),
    "multistep": ({"gamma": 0.1, "milestones_epochs": [1, 4]},
                  lambda o, n: tl.MultiStepLR(o, milestones=[S, 4 * S], gamma=0.1), False),
    "multistep_fraction": ({"gamma": 0.2, "milestones_fraction": [0.3, 0.7]},  # epochs 1 and 4
                           lambda o, n: tl.MultiStepLR(o, milestones=[1, 4], gamma=0.2), True),
    "exponential": ({"gamma": 0.8}, lambda o, n: tl.ExponentialLR(o, gamma=0.8), True),
    "cosine": ({}, lambda o, n: tl.CosineAnnealingLR(o, T_max=n), False),
    "cosine_min_lr": ({"min_lr": 0.002},
                      lambda o, n: tl.CosineAnnealingLR(o, T_max=n, eta_min=0.002), False),
    "cosine_restarts": ({"t0_epochs": 1, "t_mult": 2, "min_lr": 0.001},
                        lambda o, n: tl.CosineAnnealingWarmRestarts(o, T_0=S, T_mult=2,
                                                                    eta_min=0.001), False),
    "cosine_restarts_flat": ({"t0_epochs": 2},
                             lambda o, n: tl.CosineAnnealingWarmRestarts(o, T_0=2 * S), False),
    "linear": ({}, lambda o, n: tl.LinearLR(o, start_factor=1.0, end_factor=0.0, total_iters=n),
               False),
    "polynomial": ({"power": 2.0}, lambda o, n: tl.PolynomialLR(o, total_iters=n, power=2.0),
                   False),
    "polynomial_sqrt": ({"power": 0.5}, lambda o, n: tl.PolynomialLR(o, total_iters=n, power=0.5),
                        False),
}


def _scheduler_name(case: str) -> str:
    return next(name for name in sorted(SCHEDULERS, key=len, reverse=True) if case.startswith(name))


@pytest.mark.parametrize("base_lrs", BASE_LRS, ids=["1group", "2groups"])
@pytest.mark.parametrize("warmup", WARMUPS, ids=lambda w: f"W{w}")
@pytest.mark.parametrize("case", TORCH_CASES)
def test_matches_torch_class(case, warmup, base_lrs):
    params, factory, per_epoch = TORCH_CASES[case]
    ours = sweep_curve(_scheduler_name(case), params, base_lrs, warmup)
    assert_curves_equal(ours, torch_reference(factory, base_lrs, warmup, per_epoch=per_epoch))


@pytest.mark.parametrize("base_lrs", BASE_LRS, ids=["1group", "2groups"])
@pytest.mark.parametrize("pct_start", [0.3, 0.25, 0.5])
def test_onecycle_matches_torch(pct_start, base_lrs):
    params = {"pct_start": pct_start, "div_factor": 10.0, "final_div_factor": 100.0}
    ours = sweep_curve("onecycle", params, base_lrs, 0)
    ref = torch_reference(lambda o, n: tl.OneCycleLR(
        o, max_lr=list(base_lrs), total_steps=T, pct_start=pct_start, anneal_strategy="cos",
        cycle_momentum=False, div_factor=10.0, final_div_factor=100.0, three_phase=False),
        base_lrs, 0)
    assert_curves_equal(ours, ref)
    assert max(row[0] for row in ours) == pytest.approx(base_lrs[0], rel=0.01)


PLATEAU_CASES = {
    "patience0": {"gamma": 0.5, "patience_epochs": 0},
    "patience1_cooldown_min_lr": {"gamma": 0.3, "patience_epochs": 1, "threshold": 0.1,
                                  "cooldown_epochs": 1, "min_lr": 0.02},
}


@pytest.mark.parametrize("base_lrs", BASE_LRS, ids=["1group", "2groups"])
@pytest.mark.parametrize("warmup", WARMUPS, ids=lambda w: f"W{w}")
@pytest.mark.parametrize("case", PLATEAU_CASES)
def test_plateau_matches_torch(case, warmup, base_lrs):
    p = resolve_params("plateau", PLATEAU_CASES[case], E)
    ours = sweep_curve("plateau", PLATEAU_CASES[case], base_lrs, warmup, val_losses=VAL_LOSSES)
    ref = torch_reference(lambda o, n: tl.ReduceLROnPlateau(
        o, mode="min", factor=p["gamma"], patience=p["patience_epochs"], threshold=p["threshold"],
        threshold_mode="rel", cooldown=p["cooldown_epochs"], min_lr=p["min_lr"]),
        base_lrs, warmup, val_losses=VAL_LOSSES)
    assert_curves_equal(ours, ref)


def test_plateau_reductions_happen_and_skip_tiny_ones_like_torch():
    """The fixture must reduce; and torch skips a reduction smaller than eps = 1e-8, per group."""
    base_lrs = (0.4, 3e-8)  # the second group can be reduced once (1.5e-8 > eps), then no more
    params = {"gamma": 0.5, "patience_epochs": 0}
    ours = sweep_curve("plateau", params, base_lrs, 0, val_losses=VAL_LOSSES)
    ref = torch_reference(lambda o, n: tl.ReduceLROnPlateau(o, factor=0.5, patience=0),
                          base_lrs, 0, val_losses=VAL_LOSSES)
    assert_curves_equal(ours, ref)
    assert ours[-1][0] == pytest.approx(0.4 * 0.5 ** 2, rel=1e-15)  # reduced after epochs 2, 3
    assert ours[-1][1] == 1.5e-8


# --- Hugging Face transformers' own schedule functions ---------------------------------------
# (transformers is a test dependency; its schedules need only torch.) Each reference curve is the
# LR of a one-parameter-per-group SGD driven by the real ``transformers`` scheduler, stepped once
# per optimizer step, exactly as a training loop with it would.


def hf_curve(make, base_lrs) -> list[list[float]]:
    opt = _optimizer(base_lrs)
    scheduler = make(opt)
    curve = []
    for _ in range(T):
        curve.append(_lrs(opt))
        opt.step()
        scheduler.step()
    return curve


@pytest.mark.parametrize("base_lrs", BASE_LRS, ids=["1group", "2groups"])
@pytest.mark.parametrize("warmup", WARMUPS, ids=lambda w: f"W{w}")
def test_matches_hugging_face(warmup, base_lrs):
    """HF warmups ramp from 0, i.e. warmup_start_factor 0 with the linear shape."""
    w, hf = warmup, transformers
    cases = [
        ("linear", {}, lambda o: hf.get_linear_schedule_with_warmup(o, w, T)),
        ("cosine", {}, lambda o: hf.get_cosine_schedule_with_warmup(o, w, T)),
        ("inverse_sqrt", {}, lambda o: hf.get_inverse_sqrt_schedule(o, w)),
        ("inverse_sqrt", {"timescale_steps": 3}, lambda o: hf.get_inverse_sqrt_schedule(o, w, 3)),
        ("polynomial", {"power": 2.0, "min_lr": 1e-7},
         lambda o: hf.get_polynomial_decay_schedule_with_warmup(o, w, T, lr_end=1e-7, power=2.0)),
    ]
    for name, params, make in cases:
        if name == "polynomial" and len(base_lrs) > 1:
            continue  # HF's lr_end is absolute but applied as a ratio of the first group's LR
        ours = sweep_curve(name, params, base_lrs, warmup, f0=0.0)
        assert_curves_equal(ours, hf_curve(make, base_lrs))


# decay_fraction x T = 42 is a whole number of steps here (21 and 6), so the number of decay steps
# HF is given needs no rounding rule; warmups leave room for the decay (W + decay <= T).
@pytest.mark.parametrize("warmup", [0, 5], ids=lambda w: f"W{w}")
@pytest.mark.parametrize("fraction, decay", [(0.5, 21), (1 / 7, 6)], ids=["half", "seventh"])
@pytest.mark.parametrize("shape", ["linear", "1-sqrt", "cosine"])
@pytest.mark.parametrize("min_lr_ratio", [0.0, 0.05])
def test_wsd_matches_hugging_face(shape, warmup, fraction, decay, min_lr_ratio):
    """HF's WSD warms up from min_lr_ratio and decays to it: f0 = ratio, min_lr = ratio * base."""
    base = 0.4
    params = {"decay_fraction": fraction, "decay_shape": shape, "min_lr": min_lr_ratio * base}
    ours = sweep_curve("wsd", params, (base,), warmup, f0=min_lr_ratio)
    ref = hf_curve(lambda o: transformers.get_wsd_schedule(
        o, warmup, decay, num_training_steps=T, decay_type=shape, min_lr_ratio=min_lr_ratio),
        (base,))
    assert_curves_equal(ours, ref)


def test_cosine_with_min_lr_matches_hugging_face():
    base, rate = 0.4, 0.1
    ours = sweep_curve("cosine", {"min_lr": rate * base}, (base,), 5, f0=0.0)
    ref = hf_curve(lambda o: transformers.get_cosine_with_min_lr_schedule_with_warmup(
        o, 5, T, min_lr_rate=rate), (base,))
    assert_curves_equal(ours, ref)


# --- warmup shapes: one implementation composed with every main schedule ---------------------

@pytest.mark.parametrize("name", SCHEDULERS)
@pytest.mark.parametrize("shape", ["exponential", "constant"])
def test_warmup_shapes_compose_with_every_schedule(name, shape):
    """Warmup shapes differ only before W; from W on every shape gives the same curve."""
    params = dict(RESUME_CASES[name])
    w = 0 if name == "onecycle" else 11
    f0 = 0.05
    linear = sweep_curve(name, params, (0.4,), w, f0, "linear", VAL_LOSSES)
    other = sweep_curve(name, params, (0.4,), w, f0, shape, VAL_LOSSES)
    assert other[w:] == linear[w:]
    # Derived from the definitions, not the implementation's formula: the exponential ramp is a
    # geometric sequence that starts at f0 x base and grows by the same ratio r each step so that
    # W steps reach base (r ** W = 1 / f0); the constant one holds f0 x base until W.
    ratio = (1 / f0) ** (1 / w) if w else 1.0
    lr = 0.4 * f0
    for t in range(w):
        assert other[t][0] == pytest.approx(lr if shape == "exponential" else 0.4 * f0, rel=1e-12)
        lr *= ratio
    if w and shape == "exponential":
        assert lr == pytest.approx(0.4, rel=1e-12)  # the ramp lands on base_lr at step W


def test_linear_warmup_from_zero_reaches_base_lr_at_w():
    cfg = ScheduleConfig("constant", 4, "linear", 0.0, {})
    assert lr_curve(cfg, 0.2, 2, 3) == pytest.approx([0.0, 0.05, 0.1, 0.15, 0.2, 0.2], rel=1e-15)


# --- resume -----------------------------------------------------------------------------------

RESUME_CASES = {
    "constant": {},
    "step": {"gamma": 0.5, "step_size_epochs": 2},
    "multistep": {"gamma": 0.1, "milestones_epochs": [1, 4]},
    "exponential": {"gamma": 0.8},
    "cosine": {"min_lr": 0.001},
    "cosine_restarts": {"t0_epochs": 1, "t_mult": 2},
    "plateau": {"gamma": 0.5, "patience_epochs": 0, "cooldown_epochs": 1},
    "onecycle": {"pct_start": 0.25},
    "linear": {"min_lr": 0.01},
    "polynomial": {"power": 2.0},
    "inverse_sqrt": {},
    "wsd": {"decay_fraction": 0.3, "decay_shape": "1-sqrt"},
}
assert set(RESUME_CASES) == set(SCHEDULERS)


def _run(schedule: LRSchedule, start: int, stop: int, base: float) -> list[float]:
    """Steps start..stop-1 as the trainer drives them: lr_at, and end_of_epoch after an epoch."""
    out = []
    for t in range(start, stop):
        out.append(schedule.lr_at(t, base))
        if (t + 1) % S == 0:
            schedule.end_of_epoch(t // S, VAL_LOSSES[t // S])
    return out


@pytest.mark.parametrize("name", SCHEDULERS)
def test_resume_after_any_step_gives_the_same_sequence(name):
    warmup = 0 if name == "onecycle" else 5
    cfg = ScheduleConfig(name, warmup, "linear", F0, resolve_params(name, RESUME_CASES[name], E))
    full = _run(LRSchedule(cfg, S, E), 0, T, 0.4)
    assert len(set(full)) > 2  # the case really changes the LR (plateau included)
    for k in range(T + 1):
        first = LRSchedule(cfg, S, E)
        head = _run(first, 0, k, 0.4)
        buffer = io.BytesIO()
        torch.save(first.state_dict(), buffer)  # the same path as train.py's checkpoint
        buffer.seek(0)
        second = LRSchedule(cfg, S, E)
        second.load_state_dict(torch.load(buffer, weights_only=True))
        assert head + _run(second, k, T, 0.4) == full, f"interrupted after {k} steps"


def test_loading_another_schedules_state_is_refused():
    cosine = LRSchedule(ScheduleConfig("cosine", 5, params={"min_lr": 0.0}), S, E)
    other = LRSchedule(ScheduleConfig("cosine", 6, params={"min_lr": 0.0}), S, E)
    with pytest.raises(ValueError, match="not of"):
        other.load_state_dict(cosine.state_dict())


# --- validation at study load -----------------------------------------------------------------

def _study(scheduler_yaml: str, warmup: str = "0", base_lr: str = "0.1", train: str = "",
           epochs: int = 3) -> str:
    return f"""
name: v
trials: 1
data: {{train_size: 1000, val_size: 100}}
train: {{epochs: {epochs}, batch_size: 100{', ' + train if train else ''}}}
space:
  warmup_steps: {warmup}
  base_lr: {base_lr}
  scheduler:
    {scheduler_yaml}
"""


def _load(text: str):
    from sweep.study.spec import parse_study

    return parse_study(text, "v.yaml", Path("v.yaml"))


BAD_STUDIES = [  # (scheduler yaml, warmup, base_lr, train extras, key path, words in the message)
    ("step: {gamma: 0, step_size_epochs: 1}", "0", "0.1", "",
     "space.scheduler.step.gamma", ["(0, 1]", "got 0"]),
    ("exponential: {gamma: 1.5}", "0", "0.1", "", "space.scheduler.exponential.gamma", ["(0, 1]"]),
    ("exponential: {gamma: {type: float, low: -0.1, high: 0.9}}", "0", "0.1", "",
     "space.scheduler.exponential.gamma", ["(0, 1]", "-0.1"]),
    ("plateau: {gamma: 1.0, patience_epochs: 1}", "0", "0.1", "",
     "space.scheduler.plateau.gamma", ["(0, 1)"]),
    ("multistep: {gamma: 0.1, milestones_epochs: [2, 1]}", "0", "0.1", "",
     "space.scheduler.multistep.milestones_epochs", ["strictly increasing"]),
    ("multistep: {gamma: 0.1, milestones_epochs: [1, 3]}", "0", "0.1", "",
     "space.scheduler.multistep.milestones_epochs", ["[1, 2]", "epochs=3"]),
    ("multistep: {gamma: 0.1, milestones_epochs: [0, 2]}", "0", "0.1", "",
     "space.scheduler.multistep.milestones_epochs", ["[1, inf]"]),
    ("cosine: {min_lr: 0.5}", "0", "0.1", "", "space.scheduler.cosine.min_lr",
     ["[0, base_lr]", "0.1"]),
    ("linear: {min_lr: 0.05}", "0", "{type: float, low: 0.01, high: 0.1, log: true}", "",
     "space.scheduler.linear.min_lr", ["[0, base_lr]", "0.01"]),
    ("cosine: {}", "30", "0.1", "", "space.warmup_steps", ["[0, 29]"]),
    ("cosine: {}", "{type: int, low: 0, high: 40}", "0.1", "", "space.warmup_steps", ["[0, 29]"]),
    ("onecycle: {}", "5", "0.1", "", "space.warmup_steps", ["onecycle", "must be 0"]),
    ("cosine: {}", "5", "0.1", "warmup_shape: exponential, warmup_start_factor: 0",
     "train.warmup_start_factor", ["(0, 1]", "exponential"]),
    ("cosine: {}", "5", "0.1", "warmup_start_factor: 1.5", "train.warmup_start_factor",
     ["[0, 1]"]),
    ("wsd: {decay_shape: exp}", "0", "0.1", "", "space.scheduler.wsd.decay_shape",
     ["linear, 1-sqrt, cosine"]),
    ("onecycle: {pct_start: 0.01}", "0", "0.1", "", "space.scheduler.onecycle.pct_start",
     ["more than one"]),
]


@pytest.mark.parametrize("sched,warmup,base_lr,train,key,words", BAD_STUDIES,
                         ids=[f"{b[4].split('.')[-1]}-{i}" for i, b in enumerate(BAD_STUDIES)])
def test_nonsense_is_rejected_at_load_naming_the_key(sched, warmup, base_lr, train, key, words):
    with pytest.raises(StudyFileError) as info:
        _load(_study(sched, warmup, base_lr, train))
    message = str(info.value)
    assert message.startswith(f"v.yaml: {key} (line ") and "\n" not in message
    for word in words:
        assert word in message


def test_every_type_loads_and_resolves_through_trial_config():
    from sweep.study.space import trial_config

    lines = "\n    ".join(f"{name}: {_yaml_map(RESUME_CASES[name])}" for name in SCHEDULERS)
    spec = _load(_study(lines, "0", "0.1", "warmup_start_factor: 0", epochs=E))
    assert list(spec.space.scheduler) == list(SCHEDULERS)
    for number, name in enumerate(SCHEDULERS):
        cfg = trial_config(optuna.trial.FixedTrial({"scheduler": name}, number), spec)
        assert cfg.schedule.name == name and cfg.schedule.warmup_start_factor == 0.0
        assert len(lr_curve(cfg.schedule, cfg.base_lr, spec.steps_per_epoch, E)) == 10 * E


def _yaml_map(params: dict) -> str:
    return "{" + ", ".join(f"{k}: {v}" for k, v in params.items()) + "}"


def test_milestones_fraction_resolves_to_floored_epochs():
    assert resolve_params("multistep", {"gamma": 0.1, "milestones_fraction": [0.3, 0.7]}, 6) == {
        "gamma": 0.1, "milestones_epochs": [1, 4]}


@pytest.mark.parametrize("fractions,epochs,expected", [
    ([0.5, 0.75], 2, [1]),        # both floor to 1: one milestone, gamma applied once
    ([0.5, 0.75], 3, [1, 2]),
    ([0.1, 0.5], 3, [1]),         # 0.1 floors to 0: clamped to 1, then merged with 0.5 -> 1
    ([0.1, 0.95], 4, [1, 3]),     # floors 0 and 3: clamped / kept
    ([0.5, 0.75], 1, []),         # no epoch can hold a milestone: constant after warmup
    ([0.5, 0.75], 40, [20, 30]),
])
def test_milestones_fraction_clamps_and_merges(fractions, epochs, expected):
    got = resolve_params("multistep", {"gamma": 0.1, "milestones_fraction": fractions}, epochs)
    assert got["milestones_epochs"] == expected
    # gamma once per distinct milestone: the LR at the end is 0.1 ** (number of milestones)
    cfg = ScheduleConfig("multistep", 0, params=got)
    assert lr_curve(cfg, 1.0, 1, epochs)[-1] == pytest.approx(0.1 ** len(expected))


def test_explicit_milestones_epochs_stay_strict():
    with pytest.raises(ValueError, match=r"strictly increasing in \[1, 1\] \(epochs=2\)"):
        resolve_params("multistep", {"gamma": 0.1, "milestones_epochs": [1, 2]}, 2)


# --- resume in real training ------------------------------------------------------------------

class _Recorder:
    """Collects the LR of every step and stops training at the end of ``stop_after`` epoch."""

    def __init__(self, stop_after: int | None = None):
        self.lrs: dict[int, float] = {}
        self.stop_after = stop_after

    def on_steps(self, first_step, lrs, losses):
        self.lrs.update(enumerate(lrs, start=first_step))

    def on_epoch_end(self, epoch, metrics):
        from sweep.training.train import StopTraining

        if epoch == self.stop_after:
            raise StopTraining("test", (epoch + 1) * 6 - 1, epoch)


@pytest.mark.slow
def test_training_resumed_from_checkpoint_follows_the_same_lr_sequence(tiny_cifar, tmp_path):
    """Plateau with warmup W = 5 (S = 6): the reduction decided at the end of epoch 1 is in the
    checkpoint written before the listener stops training there."""
    from sweep.training.data import load_splits
    from sweep.study.space import TrialConfig
    from sweep.study.specs import DataSpec, TrainSpec
    from sweep.training.checkpoint import read, write_atomic
    from sweep.training.train import StopTraining, train

    data = DataSpec(train_size=120, val_size=40, test_size=40)
    params = resolve_params("plateau", {"gamma": 0.5, "patience_epochs": 0, "threshold": 0.9}, 3)
    cfg = TrialConfig(base_lr=0.2, schedule=ScheduleConfig("plateau", 5, "linear", 0.1, params),
                      train=TrainSpec(model="resnet8", width=1, epochs=3, batch_size=20,
                                      sync_every_steps=4, bf16=False),
                      data=data, seed=3, sampled={})
    device = torch.device("cpu")
    splits = load_splits(tiny_cifar, data, device, download=False)

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny model: 2 threads only spin against each other (10x slower
    try:                      # when other processes load the cores)
        whole = _Recorder()
        reference = train(cfg, splits, device, [whole])
        checkpoint = tmp_path / "trial.pt"
        first = _Recorder(stop_after=1)
        with pytest.raises(StopTraining):
            train(cfg, splits, device, [first],
                  checkpoint=lambda take: write_atomic(checkpoint, take()))
        assert checkpoint.is_file() and sorted(first.lrs) == list(range(12))
        second = _Recorder()
        resumed = train(cfg, splits, device, [second], resume=read(checkpoint))
    finally:
        torch.set_num_threads(threads)

    assert sorted(second.lrs) == list(range(12, 18))  # only epoch 2 ran again
    assert {**first.lrs, **second.lrs} == whole.lrs
    assert whole.lrs[17] == pytest.approx(0.1, rel=1e-15)  # warmup, then one reduction
    assert [h["lr_reduced"] for h in reference.history] == [False, True, True]
    for key in ("val_loss", "val_acc"):
        assert resumed.history[-1][key] == reference.history[-1][key]
    assert resumed.test_acc == reference.test_acc
