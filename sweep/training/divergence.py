"""Divergence detection on every optimizer step, independent of the study's pruner.

A trial has diverged when

* its training loss is non-finite (always checked, even with ``divergence.enabled: false``:
  the weights are then NaN/inf and further training cannot recover), or its validation loss
  is; or
* its loss exceeds ``ceiling_factor`` x the reference, or ``ceiling_factor`` x the chance-level
  loss ln C (the cross-entropy of a uniform guess over C classes), at any step, warmup and the
  reference window included: at once, with no patience. Inside the window the reference is the
  lowest loss so far. This is what catches an explosion (LR 50: 2.4 -> 129 -> 2,776 ...) in a
  trial shorter than ``patience_steps``. Measured on resnet8 runs on the shared subset (LR
  0.05-2 in the smoke study, 0.1-8 with and without warmup in pruning_bench), the largest
  loss / running reference was 2.4 in runs that learned and 4.8 in runs left at chance; 8.4 in
  a 2-epoch resnet20 at LR 2 without warmup. 100 leaves a 12x margin (docs/pruning.md); or
* after an epoch, its validation loss exceeds ``val_loss_factor`` x ln C. The first epochs'
  validation loss of a healthy run can be large (BatchNorm statistics still settling: 89, i.e.
  39x ln 10, for resnet8 at LR 1.6 with warmup, which ended at 32% accuracy; 601 = 260x for a
  2-epoch resnet20 at LR 2 with warmup); the explosion of issue 12 gave 4.7e7. Default
  10,000x; or
* its loss stays above ``loss_factor`` x the early reference for ``patience_steps``
  consecutive steps (moderate excess). The reference is the *lowest* loss of the first
  ``reference_steps`` steps: the mean would be inflated by a run that explodes within those
  steps (LR 50 does at step 1), which then could never exceed a multiple of it.

Non-finite gradients are not checked separately. An optimizer step with a NaN/inf gradient
writes NaN/inf into the weights, so the very next step's forward pass gives a non-finite loss:
detection costs nothing extra and comes one step later. (Checking the gradients at the sync
points only would miss the steps in between; checking every step costs one reduction per
parameter tensor and, on CUDA, is useless without a host sync.) The last step of an epoch has
no next step in that epoch: its effect shows in the validation loss, which is checked.

Aware of warmup: the excess-loss count runs during warmup, but a trial is only stopped by it
from step ``warmup_steps`` on, so a spike that recovers during warmup (the count resets as
soon as a loss is back under the bar) is not divergence. A plateau reduction resets the count,
since the lower LR deserves a chance to bring the loss back.

Losses arrive in chunks (``train.sync_every_steps``), so a trial stops at most that many steps
after the step that decided it; the recorded step is the deciding step itself.
"""

from __future__ import annotations

import math
from typing import Sequence

from sweep.study.specs import DivergenceSpec
from sweep.training.train import StopTraining


class DivergenceMonitor:
    """A training listener that raises ``StopTraining("diverged", step, epoch, detail)``;
    ``detail`` has ``loss`` (a float, or the string 'nan'/'inf' so that no NaN is ever
    stored as a number) and ``cause`` (which rule decided)."""

    def __init__(self, spec: DivergenceSpec, warmup_steps: int, steps_per_epoch: int,
                 num_classes: int = 10):
        self.spec, self.warmup_steps, self.steps_per_epoch = spec, warmup_steps, steps_per_epoch
        self.chance_loss = math.log(num_classes)  # CIFAR-10: ln 10 = 2.303
        self._seen = 0
        self.reference: float | None = None
        self.bad_steps = 0

    def _stop(self, step: int, loss: float, cause: str) -> StopTraining:
        return StopTraining("diverged", step, step // self.steps_per_epoch,
                            {"loss": loss if math.isfinite(loss) else repr(loss), "cause": cause})

    def on_steps(self, first_step: int, lrs: Sequence[float], losses: Sequence[float]) -> None:
        for step, loss in enumerate(losses, start=first_step):
            if not math.isfinite(loss):
                raise self._stop(step, loss, "non-finite loss")
            if not self.spec.enabled:
                continue
            in_window = self._seen < self.spec.reference_steps
            if in_window:  # the reference: the lowest loss so far, fixed once the window ends
                self._seen += 1
                self.reference = loss if self.reference is None else min(self.reference, loss)
            self._check_ceiling(step, loss)
            if in_window:
                continue
            self.bad_steps = self.bad_steps + 1 if loss > self.spec.loss_factor * self.reference else 0
            if self.bad_steps >= self.spec.patience_steps and step >= self.warmup_steps:
                raise self._stop(step, loss, f"loss above {self.spec.loss_factor:g} x early "
                                             f"reference {self.reference:.4g} for "
                                             f"{self.bad_steps} steps")

    def _check_ceiling(self, step: int, loss: float) -> None:
        factor = self.spec.ceiling_factor
        if loss > factor * self.reference:
            raise self._stop(step, loss, f"loss {loss:.4g} above {factor:g} x reference "
                                         f"{self.reference:.4g} (ceiling)")
        if loss > factor * self.chance_loss:
            raise self._stop(step, loss, f"loss {loss:.4g} above {factor:g} x chance-level loss "
                                         f"{self.chance_loss:.4g} (ceiling)")

    def on_epoch_end(self, epoch: int, metrics: dict) -> None:
        last_step = (epoch + 1) * self.steps_per_epoch - 1
        val_loss = metrics["val_loss"]
        if not math.isfinite(val_loss):
            raise self._stop(last_step, val_loss, "non-finite validation loss")
        bar = self.spec.val_loss_factor * self.chance_loss
        if self.spec.enabled and val_loss > bar:
            raise self._stop(last_step, val_loss,
                             f"validation loss {val_loss:.4g} above {self.spec.val_loss_factor:g} x "
                             f"chance-level loss {self.chance_loss:.4g}")
        if metrics.get("lr_reduced"):
            self.bad_steps = 0
