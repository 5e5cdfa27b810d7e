"""Learning-rate schedules as functions of the optimizer step.

Contract (the one thing every caller must get right):

* ``t`` counts optimizer steps from 0. ``LRSchedule.lr_at(t, base_lr)`` is the LR that the
  t-th ``optimizer.step()`` must use; write it into every param group *before* that step.
* ``LRSchedule.end_of_epoch(epoch, val_loss)`` is called once after each epoch's evaluation.
  Only ``plateau`` listens; its reductions apply from the next step on.

Warmup is written once (``_warmup_factor``) and composed with every main schedule: for
``t < W`` the LR is ``base_lr * warmup_factor(t)``; from ``t = W`` on, the main schedule runs on
its own clock ``tau = t - W`` starting from ``base_lr`` (torch ``SequentialLR`` semantics). The
main schedules are closed forms of ``tau`` (no recursion), so the LR of any step can be computed
without replaying the earlier ones, and a resumed trial needs only the plateau state.

Units are in the names: ``*_steps`` are optimizer steps, ``*_epochs`` are epochs (converted to
steps with ``steps_per_epoch``), ``min_lr`` is an absolute LR.
"""

from __future__ import annotations

import bisect
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

from sweep.errors import FieldError

WARMUP_SHAPES = ("linear", "exponential", "constant")
PLATEAU_EPS = 1e-8  # torch ReduceLROnPlateau's default eps: smaller reductions are not applied


@dataclass(frozen=True)
class ParamRule:
    """What one scheduler parameter accepts. ``low``/``high`` are inclusive unless ``*_open``."""

    kind: str  # "int", "float", "choice", "int_list", "float_list"
    default: Any = None
    required: bool = False
    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    choices: tuple = ()
    doc: str = ""

    def allowed(self) -> str:
        """Human-readable allowed range, for error messages."""
        if self.kind == "choice":
            return "one of " + ", ".join(map(str, self.choices))
        lo = "(" if self.low_open else "["
        hi = ")" if self.high_open else "]"
        low = "-inf" if self.low is None else f"{self.low:g}"
        high = "inf" if self.high is None else f"{self.high:g}"
        what = {"int_list": "a list of ints in ", "float_list": "a list of numbers in "}.get(
            self.kind, ("an integer in " if self.kind == "int" else "a number in ")
        )
        return f"{what}{lo}{low}, {high}{hi}"

    def problem(self, value: Any) -> str | None:
        """Return why ``value`` is not accepted, or None when it is."""
        if self.kind == "choice":
            return None if value in self.choices else f"must be {self.allowed()}, got {value!r}"
        if self.kind.endswith("_list"):
            if not isinstance(value, (list, tuple)) or not value:
                return f"must be {self.allowed()}, got {value!r}"
            for item in value:
                bad = self._scalar_problem(item, self.kind[: -len("_list")])
                if bad:
                    return bad
            if list(value) != sorted(set(value)):
                return f"must be strictly increasing, got {list(value)!r}"
            return None
        return self._scalar_problem(value, self.kind)

    def _scalar_problem(self, value: Any, kind: str) -> str | None:
        ok_type = isinstance(value, int) if kind == "int" else isinstance(value, (int, float))
        if isinstance(value, bool) or not ok_type:
            return f"must be {self.allowed()}, got {value!r}"
        if isinstance(value, float) and not math.isfinite(value):
            return f"must be {self.allowed()}, got {value!r}"
        too_low = self.low is not None and (value <= self.low if self.low_open else value < self.low)
        too_high = self.high is not None and (
            value >= self.high if self.high_open else value > self.high
        )
        if too_low or too_high:
            return f"must be {self.allowed()}, got {value!r}"
        return None


_DECAY_GAMMA = ParamRule("float", required=True, low=0.0, high=1.0, low_open=True,
                         doc="multiplicative decay factor")
_MIN_LR = ParamRule("float", default=0.0, low=0.0, doc="absolute LR at the end of the decay")

#: scheduler name -> its parameters. The study file may set (or sample) exactly these.
SCHEDULER_PARAMS: dict[str, dict[str, ParamRule]] = {
    "constant": {},
    "step": {
        "gamma": _DECAY_GAMMA,
        "step_size_epochs": ParamRule("int", required=True, low=1, doc="epochs between decays"),
    },
    "multistep": {
        "gamma": _DECAY_GAMMA,
        "milestones_epochs": ParamRule("int_list", low=1,
                                       doc="epochs (after warmup) at which LR is multiplied by gamma"),
        "milestones_fraction": ParamRule("float_list", low=0.0, high=1.0, low_open=True,
                                         high_open=True,
                                         doc="milestones as fractions of the epochs, floored"),
    },
    "exponential": {"gamma": _DECAY_GAMMA},
    "cosine": {"min_lr": _MIN_LR},
    "cosine_restarts": {
        "t0_epochs": ParamRule("int", required=True, low=1, doc="length of the first cycle"),
        "t_mult": ParamRule("int", default=1, low=1, doc="cycle length multiplier"),
        "min_lr": _MIN_LR,
    },
    "plateau": {
        "gamma": ParamRule("float", required=True, low=0.0, high=1.0, low_open=True,
                           high_open=True, doc="reduction factor"),
        "patience_epochs": ParamRule("int", required=True, low=0,
                                     doc="epochs without improvement before a reduction"),
        "threshold": ParamRule("float", default=1e-4, low=0.0, doc="relative improvement"),
        "cooldown_epochs": ParamRule("int", default=0, low=0),
        "min_lr": _MIN_LR,
    },
    "onecycle": {
        "pct_start": ParamRule("float", default=0.3, low=0.0, high=1.0, low_open=True,
                               high_open=True, doc="fraction of steps spent ramping up"),
        "div_factor": ParamRule("float", default=25.0, low=0.0, low_open=True),
        "final_div_factor": ParamRule("float", default=1e4, low=0.0, low_open=True),
    },
    "linear": {"min_lr": _MIN_LR},
    "polynomial": {
        "power": ParamRule("float", default=1.0, low=0.0, low_open=True),
        "min_lr": _MIN_LR,
    },
    "inverse_sqrt": {
        "timescale_steps": ParamRule("int", default=None, low=1,
                                     doc="defaults to warmup_steps, or 10000 without warmup"),
    },
    "wsd": {
        "decay_fraction": ParamRule("float", default=0.2, low=0.0, high=1.0, low_open=True,
                                    doc="share of the T steps spent decaying, at the end"),
        "decay_shape": ParamRule("choice", default="linear", choices=("linear", "1-sqrt", "cosine")),
        "min_lr": _MIN_LR,
    },
}

SCHEDULERS = tuple(SCHEDULER_PARAMS)


@dataclass(frozen=True)
class ScheduleConfig:
    """Everything that determines a trial's LR curve besides ``base_lr`` and the step counts."""

    name: str
    warmup_steps: int = 0
    warmup_shape: str = "linear"
    warmup_start_factor: float = 0.01
    params: Mapping[str, Any] = field(default_factory=dict)


def resolve_params(name: str, given: Mapping[str, Any], epochs: int) -> dict[str, Any]:
    """Fill defaults and convert derived units (``milestones_fraction`` -> ``milestones_epochs``).

    Raises FieldError naming the key for anything unknown or out of range.
    """
    if name not in SCHEDULER_PARAMS:
        raise FieldError("scheduler", f"unknown scheduler {name!r}; choose one of "
                                      f"{', '.join(SCHEDULERS)}")
    rules = SCHEDULER_PARAMS[name]
    for key, value in given.items():
        if key not in rules:
            valid = ", ".join(rules) or "none"
            raise FieldError(key, f"not a parameter of scheduler {name!r} (its parameters: "
                                  f"{valid})")
        problem = rules[key].problem(value)
        if problem:
            raise FieldError(key, problem)
    resolved = {k: given.get(k, rule.default) for k, rule in rules.items()}
    for key, rule in rules.items():
        if rule.required and resolved[key] is None:
            raise FieldError(key, f"required by scheduler {name!r} ({rule.allowed()})")
    if name == "multistep":
        fractions = resolved.pop("milestones_fraction")
        if (fractions is None) == (resolved["milestones_epochs"] is None):
            raise FieldError("milestones_epochs", "give exactly one of milestones_epochs or "
                                                  "milestones_fraction for scheduler 'multistep'")
        if fractions is not None:
            resolved["milestones_epochs"] = milestones_from_fractions(fractions, epochs)
            return resolved
        milestones = resolved["milestones_epochs"]
        if list(milestones) != sorted(set(milestones)) or milestones[0] < 1 or milestones[-1] >= epochs:
            raise FieldError("milestones_epochs", f"must be strictly increasing in "
                                                  f"[1, {epochs - 1}] (epochs={epochs}), got "
                                                  f"{list(milestones)}")
    return resolved


def milestones_from_fractions(fractions, epochs: int) -> list[int]:
    """``milestones_fraction`` -> epochs: floored, clamped into [1, epochs - 1], merged.

    Fractions describe a shape that must survive any training length (a user shrinking a study
    to 2 epochs did not write its fractions): a fraction flooring to 0 or to ``epochs`` moves to
    the nearest valid epoch, and fractions that land on the same epoch are one milestone, so
    gamma is applied once there (torch's MultiStepLR would apply a repeated milestone twice,
    a decay the study never asked for at that length). Below 2 epochs no epoch can hold a
    milestone: the list is empty and the LR stays at base_lr (constant after warmup).
    """
    return sorted({min(max(int(math.floor(f * epochs)), 1), epochs - 1) for f in fractions}
                  if epochs >= 2 else set())


def check_schedule(cfg: ScheduleConfig, steps_per_epoch: int, epochs: int, base_lr: float) -> None:
    """Raise FieldError (naming the key) when ``cfg`` makes no sense for this training length."""
    total = steps_per_epoch * epochs
    if cfg.warmup_shape not in WARMUP_SHAPES:
        raise FieldError("warmup_shape", f"must be one of {', '.join(WARMUP_SHAPES)}, "
                                         f"got {cfg.warmup_shape!r}")
    # 0 is allowed for the linear and constant shapes (Hugging Face's warmups ramp from 0); the
    # exponential shape f0 ** (1 - t/W) needs f0 > 0.
    low_open = cfg.warmup_shape == "exponential"
    if not (0.0 < cfg.warmup_start_factor if low_open else 0.0 <= cfg.warmup_start_factor) \
            or cfg.warmup_start_factor > 1.0:
        raise FieldError("warmup_start_factor",
                         f"must be in {'(' if low_open else '['}0, 1] for warmup_shape "
                         f"{cfg.warmup_shape!r}, got {cfg.warmup_start_factor!r}")
    if not 0 <= cfg.warmup_steps <= total - 1:
        raise FieldError("warmup_steps", f"must be in [0, {total - 1}] (T-1 for {epochs} epochs "
                                         f"x {steps_per_epoch} steps), got {cfg.warmup_steps}")
    if cfg.name == "onecycle" and cfg.warmup_steps:
        raise FieldError("warmup_steps", f"must be 0 for scheduler 'onecycle' (its own ramp, "
                                         f"pct_start, is the warmup: warmup given twice), got "
                                         f"{cfg.warmup_steps}")
    if cfg.name == "onecycle" and cfg.params["pct_start"] * total <= 1.0:
        # torch OneCycleLR divides by pct_start * T - 1: the ramp must span more than one step.
        raise FieldError("pct_start", f"must be in ({1.0 / total:g}, 1) so that the ramp spans "
                                      f"more than one of the T = {total} steps, got "
                                      f"{cfg.params['pct_start']!r}")
    min_lr = cfg.params.get("min_lr") or 0.0
    if min_lr > base_lr:
        raise FieldError("min_lr", f"must be in [0, base_lr] = [0, {base_lr:g}], got {min_lr:g}")


# --- main schedules: lr = f(tau, base_lr) on the post-warmup clock ----------------------------

@dataclass(frozen=True)
class _Clock:
    steps_per_epoch: int
    main_steps: int  # N = T - W, the length of the post-warmup schedule
    warmup_steps: int
    total_steps: int


def _cos_anneal(start: float, end: float, fraction: float) -> float:
    """``start`` at fraction 0, ``end`` at fraction 1, half a cosine between (torch's form)."""
    return end + (start - end) / 2.0 * (math.cos(math.pi * fraction) + 1.0)


def _constant(p, base, tau, c):
    return base


def _step(p, base, tau, c):
    return base * p["gamma"] ** (tau // (p["step_size_epochs"] * c.steps_per_epoch))


def _multistep(p, base, tau, c):
    milestones = [m * c.steps_per_epoch for m in p["milestones_epochs"]]
    return base * p["gamma"] ** bisect.bisect_right(milestones, tau)


def _exponential(p, base, tau, c):
    return base * p["gamma"] ** (tau // c.steps_per_epoch)


def _cosine(p, base, tau, c):
    return _cos_anneal(base, p["min_lr"], tau / c.main_steps)


def _cosine_restarts(p, base, tau, c):
    cycle = p["t0_epochs"] * c.steps_per_epoch
    while tau >= cycle:  # integer walk over the cycles: exact, like torch's per-step update
        tau -= cycle
        cycle *= p["t_mult"]
    return _cos_anneal(base, p["min_lr"], tau / cycle)


def _linear(p, base, tau, c):
    return p["min_lr"] + (base - p["min_lr"]) * max(0.0, 1.0 - tau / c.main_steps)


def _polynomial(p, base, tau, c):
    remaining = 1.0 - min(tau, c.main_steps) / c.main_steps
    return p["min_lr"] + (base - p["min_lr"]) * remaining ** p["power"]


def _inverse_sqrt(p, base, tau, c):
    timescale = p["timescale_steps"] or (c.warmup_steps if c.warmup_steps > 0 else 10_000)
    return base / math.sqrt((tau + timescale) / timescale)


def _wsd(p, base, tau, c):
    # The decay covers the last decay_fraction of the whole run (T steps, rounded), but never
    # reaches back into warmup.
    decay_steps = min(c.main_steps, max(1, round(p["decay_fraction"] * c.total_steps)))
    stable_steps = c.main_steps - decay_steps
    if tau < stable_steps:
        return base
    progress = min(1.0, (tau - stable_steps) / decay_steps)
    value = {"linear": 1.0 - progress, "1-sqrt": 1.0 - math.sqrt(progress),
             "cosine": 0.5 * (1.0 + math.cos(math.pi * progress))}[p["decay_shape"]]
    return p["min_lr"] + (base - p["min_lr"]) * value


def _onecycle(p, base, tau, c):
    # torch.optim.lr_scheduler.OneCycleLR, two phases, cosine annealing, total_steps = T.
    initial = base / p["div_factor"]
    final = initial / p["final_div_factor"]
    ramp_end = float(p["pct_start"] * c.total_steps) - 1
    if tau <= ramp_end:
        return _cos_anneal(initial, base, tau / ramp_end) if ramp_end > 0 else base
    return _cos_anneal(base, final, (tau - ramp_end) / (c.total_steps - 1 - ramp_end))


def _plateau(p, base, tau, c):
    return base  # reductions are state, applied by LRSchedule


_MAIN: dict[str, Callable[..., float]] = {
    "constant": _constant, "step": _step, "multistep": _multistep, "exponential": _exponential,
    "cosine": _cosine, "cosine_restarts": _cosine_restarts, "plateau": _plateau,
    "onecycle": _onecycle, "linear": _linear, "polynomial": _polynomial,
    "inverse_sqrt": _inverse_sqrt, "wsd": _wsd,
}
assert set(_MAIN) == set(SCHEDULER_PARAMS)  # registry and formulas must name the same types


def _warmup_factor(shape: str, start_factor: float, t: int, warmup_steps: int) -> float:
    """Fraction of base_lr used at step t < warmup_steps. Linear is torch LinearLR's ramp."""
    if shape == "linear":
        return start_factor + (1.0 - start_factor) * t / warmup_steps
    if shape == "exponential":
        return start_factor ** (1.0 - t / warmup_steps)
    return start_factor  # constant: He et al.'s fixed low LR before the main schedule


class _PlateauState:
    """torch ReduceLROnPlateau(mode='min', threshold_mode='rel') bookkeeping, minus the optimizer."""

    def __init__(self, gamma: float, patience: int, threshold: float, cooldown: int):
        self.gamma, self.patience, self.threshold, self.cooldown = gamma, patience, threshold, cooldown
        self.best = math.inf
        self.num_bad_epochs = 0
        self.cooldown_counter = 0
        self.reductions = 0

    def observe(self, val_loss: float) -> bool:
        """Feed one epoch's validation loss; True when this epoch triggers a reduction."""
        if val_loss < self.best * (1.0 - self.threshold):
            self.best = val_loss
            self.num_bad_epochs = 0
        else:
            self.num_bad_epochs += 1
        if self.cooldown_counter > 0:
            self.cooldown_counter -= 1
            self.num_bad_epochs = 0
        if self.num_bad_epochs > self.patience:
            self.reductions += 1
            self.cooldown_counter = self.cooldown
            self.num_bad_epochs = 0
            return True
        return False

    def state_dict(self) -> dict:
        return {k: getattr(self, k) for k in
                ("best", "num_bad_epochs", "cooldown_counter", "reductions")}

    def load_state_dict(self, state: Mapping) -> None:
        for key, value in state.items():
            setattr(self, key, value)


class LRSchedule:
    """Warmup composed with one main schedule; see the module docstring for the contract."""

    def __init__(self, cfg: ScheduleConfig, steps_per_epoch: int, epochs: int):
        self.cfg = cfg
        total = steps_per_epoch * epochs
        self.clock = _Clock(steps_per_epoch, total - cfg.warmup_steps, cfg.warmup_steps, total)
        self._main = _MAIN[cfg.name]
        p = cfg.params
        self._plateau = (
            _PlateauState(p["gamma"], p["patience_epochs"], p["threshold"], p["cooldown_epochs"])
            if cfg.name == "plateau" else None
        )

    @property
    def total_steps(self) -> int:
        return self.clock.total_steps

    def lr_at(self, step: int, base_lr: float) -> float:
        """LR for the ``step``-th optimizer step of a param group whose base LR is ``base_lr``."""
        w = self.cfg.warmup_steps
        if step < w:
            return base_lr * _warmup_factor(self.cfg.warmup_shape, self.cfg.warmup_start_factor,
                                            step, w)
        lr = self._main(self.cfg.params, base_lr, step - w, self.clock)
        if self._plateau is not None:
            for _ in range(self._plateau.reductions):
                # torch ReduceLROnPlateau._reduce_lr, per group: a reduction smaller than
                # eps = 1e-8 is skipped (so a group with a tiny LR or at min_lr stays put).
                new = max(lr * self.cfg.params["gamma"], self.cfg.params["min_lr"])
                if lr - new > PLATEAU_EPS:
                    lr = new
        return lr

    def end_of_epoch(self, epoch: int, val_loss: float) -> bool:
        """Feed epoch ``epoch``'s validation loss; True when plateau reduced the LR.

        Epochs that end inside warmup are not fed: ReduceLROnPlateau must not judge a ramp.
        """
        if self._plateau is None or (epoch + 1) * self.clock.steps_per_epoch < self.cfg.warmup_steps:
            return False
        return self._plateau.observe(float(val_loss))

    def _identity(self) -> list:
        return [self.cfg.name, self.cfg.warmup_steps, self.clock.steps_per_epoch,
                self.clock.total_steps]

    def state_dict(self) -> dict:
        """Plain ints/floats/strings only, so ``torch.load(weights_only=True)`` reads it back."""
        return {"schedule": self._identity(),
                "plateau": self._plateau.state_dict() if self._plateau else None}

    def load_state_dict(self, state: Mapping) -> None:
        """Restore the plateau state. Raises ValueError when ``state`` is another schedule's
        (resuming it would silently follow a different curve)."""
        if list(state.get("schedule", self._identity())) != self._identity():
            raise ValueError(f"checkpoint holds the state of schedule {state['schedule']} "
                             f"(name, W, S, T), not of {self._identity()}")
        if self._plateau is not None and state.get("plateau") is not None:
            self._plateau.load_state_dict(state["plateau"])


def lr_curve(cfg: ScheduleConfig, base_lr: float, steps_per_epoch: int, epochs: int,
             val_losses: list[float | None] | None = None) -> list[float]:
    """The LR of every step 0..T-1; ``val_losses[e]`` feeds plateau at the end of epoch e
    (None, or a missing tail, means that epoch fed nothing, as a non-finite loss in training)."""
    schedule = LRSchedule(cfg, steps_per_epoch, epochs)
    curve: list[float] = []
    for epoch in range(epochs):
        for s in range(steps_per_epoch):
            curve.append(schedule.lr_at(epoch * steps_per_epoch + s, base_lr))
        if val_losses is not None and epoch < len(val_losses) and val_losses[epoch] is not None:
            schedule.end_of_epoch(epoch, val_losses[epoch])
    return curve
