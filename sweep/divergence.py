"""Divergence detection on every optimizer step, independent of the study's pruner.

A trial has diverged when its loss is non-finite, or when the loss stays above
``loss_factor`` x the early reference (mean loss of the first ``reference_steps`` steps) for
``patience_steps`` consecutive steps. During warmup the excess-loss rule only counts: a spike
that recovers before warmup ends is not divergence. A plateau reduction resets the count,
since the lower LR deserves a chance to bring the loss back.
"""

from __future__ import annotations

import math
from typing import Sequence

from sweep.spec import DivergenceSpec
from sweep.train import StopTraining


class DivergenceMonitor:
    """A training listener that raises ``StopTraining("diverged", ...)``."""

    def __init__(self, spec: DivergenceSpec, warmup_steps: int, steps_per_epoch: int):
        self.spec, self.warmup_steps, self.steps_per_epoch = spec, warmup_steps, steps_per_epoch
        self._early: list[float] = []
        self.reference: float | None = None
        self.bad_steps = 0

    def _stop(self, step: int, loss: float, cause: str) -> StopTraining:
        return StopTraining("diverged", step, step // self.steps_per_epoch,
                            {"loss": loss if math.isfinite(loss) else repr(loss), "cause": cause})

    def on_steps(self, first_step: int, lrs: Sequence[float], losses: Sequence[float]) -> None:
        if not self.spec.enabled:
            return
        for step, loss in enumerate(losses, start=first_step):
            if not math.isfinite(loss):
                raise self._stop(step, loss, "non-finite loss")
            if self.reference is None:
                self._early.append(loss)
                if len(self._early) >= self.spec.reference_steps:
                    self.reference = sum(self._early) / len(self._early)
                continue
            self.bad_steps = self.bad_steps + 1 if loss > self.spec.loss_factor * self.reference else 0
            if self.bad_steps >= self.spec.patience_steps and step >= self.warmup_steps:
                raise self._stop(step, loss, f"loss above {self.spec.loss_factor:g} x early "
                                             f"reference {self.reference:.4g} for "
                                             f"{self.bad_steps} steps")

    def on_epoch_end(self, epoch: int, metrics: dict) -> None:
        if not self.spec.enabled:
            return
        if not math.isfinite(metrics["val_loss"]):
            raise self._stop((epoch + 1) * self.steps_per_epoch - 1, metrics["val_loss"],
                             "non-finite validation loss")
        if metrics.get("lr_reduced"):
            self.bad_steps = 0
