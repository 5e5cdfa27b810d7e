"""What a launch will cost, from its own first steps: the trials left, the pack size, and the
time they take if each trains its T steps at the pace just measured.

The pace is timed on real training, not guessed: ``StepClock`` is a training listener of the
first trial (or pack) a worker trains. Listeners hear of steps in chunks
(``train.sync_every_steps`` steps, fewer at an epoch's end), after each chunk ran, with the
chunk's first step. The second chunk is timed: from the call after the first chunk to the call
after the second; its length is the third chunk's first step less its own. So the first
chunk's one-off costs (model built, batches allocated, cuDNN autotuning, a CUDA graph captured)
are left out, and an epoch end falling before the timed chunk (validation, a checkpoint) is
counted, as every epoch pays it. A trial of fewer than three chunks is not timed; the next
one is.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from typing import Callable, Sequence

#: the study a person runs first on a CPU (studies/smoke.yaml: seconds, not hours)
FIRST_LOOK = "smoke"


@dataclass(frozen=True)
class Cost:
    """A launch's cost. ``seconds_per_step``: the wall time of one optimizer step of the pack
    (all ``pack`` trials at once), measured over ``timed_steps`` steps of the first trial(s)."""

    trials_left: int
    pack: int  # trials trained at once (1: one at a time)
    total_steps: int  # T: optimizer steps per trial trained to its end
    seconds_per_step: float
    timed_steps: int
    device: str  # the torch device type: "cpu", "cuda"
    study: str

    @property
    def estimate_s(self) -> float:
        """Seconds until every trial left has trained to its end (pruned trials end sooner)."""
        return self.trials_left * self.total_steps * self.seconds_per_step / self.pack

    def line(self) -> str:
        """The one line ``sweep launch`` prints once the first steps were timed."""
        pack = f"fused packs of {self.pack}" if self.pack > 1 else "one at a time"
        text = (f"cost: {self.trials_left} trial(s) left, {pack}, T = {self.total_steps} steps "
                f"each; a step took {self.seconds_per_step:.4g} s ({self.timed_steps} steps "
                f"timed): about {duration(self.estimate_s)} if every "
                f"trial trains to its end ({self.trials_left} x {self.total_steps} x "
                f"{self.seconds_per_step:.4g} s / {self.pack})")
        if self.device == "cpu" and self.study != FIRST_LOOK:
            text += (f"; on a CPU the {FIRST_LOOK} study is the first look: "
                     f"sweep launch --study {FIRST_LOOK}")
        return text

    def as_json(self) -> dict:
        return {**asdict(self), "estimate_s": self.estimate_s}


def duration(seconds: float) -> str:
    """``0.4 s``, ``12 s``, ``3.4 minutes``, ``2.5 hours``: the unit a person plans with."""
    if seconds < 10:
        return f"{seconds:.1f} s"
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 90 * 60:
        return f"{seconds / 60:.1f} minutes"
    return f"{seconds / 3600:.1f} hours"


class StepClock:
    """A training listener that times a worker's first steps and hands the ``Cost`` to
    ``on_timed`` once, from the training thread (so ``on_timed`` must be quick: print a line).

    ``start(trials_left, pack)`` is called by the worker before it trains (it knows the
    pack size); the steps are then heard through ``on_steps`` (``first_step``: the first step of
    the chunk just trained, as every listener gets it; the fused pack's guard gets no LRs, so
    only ``first_step`` is read). A ``first_step`` that does not move forward (the next trial,
    from step 0) starts the count again."""

    def __init__(self, study: str, total_steps: int, device: str,
                 on_timed: Callable[[Cost], None]):
        self.study, self.total_steps, self.device = study, total_steps, device
        self.on_timed = on_timed
        self.cost: Cost | None = None
        self._plan: tuple[int, int] | None = None  # trials left, pack
        self._marks: list[tuple[int, float]] = []  # (first step, perf_counter) after each chunk

    def start(self, trials_left: int, pack: int) -> None:
        if self._plan is None:
            self._plan = (trials_left, pack)

    def on_steps(self, first_step: int, lrs: Sequence[float], losses: Sequence[float]) -> None:
        if self.cost is not None or self._plan is None:
            return
        now = time.perf_counter()
        if self._marks and first_step <= self._marks[-1][0]:
            self._marks = []
        self._marks.append((first_step, now))
        if len(self._marks) < 3:
            return
        (_, began), (second, ended), (third, _) = self._marks
        left, pack = self._plan
        steps = third - second
        self.cost = Cost(left, pack, self.total_steps, (ended - began) / steps, steps,
                         self.device, self.study)
        self.on_timed(self.cost)

    def on_epoch_end(self, epoch: int, metrics: dict) -> None:
        pass
