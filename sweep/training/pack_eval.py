"""A pack's per-slot evaluation: the fused network over a split, each image repeated for
the K slots, in one pass. A mixin of ``fused_pack.Pack``."""

from __future__ import annotations

import time

import torch
from torch import nn

from sweep.training.data import Normalizer
from sweep.training.train import full_precision


class StackedNormalizer(Normalizer):
    """``Normalizer`` for K slots' images stacked along channels: ``[B, K*3, H, W]``."""

    def __init__(self, device: torch.device, k: int, layout: torch.memory_format, dataset: str):
        super().__init__(device, layout == torch.channels_last, dataset)
        self.scale, self.shift = self.scale.repeat(1, k, 1, 1), self.shift.repeat(1, k, 1, 1)


class PackEvaluation:
    """Per-slot loss and accuracy over a split, in one pass of the fused network."""

    @torch.no_grad()
    def evaluate(self, x_u8: torch.Tensor, y: torch.Tensor) -> tuple[list[float], list[float]]:
        """Per-slot (mean cross-entropy, accuracy) over a split: the fused network runs once
        over it with each image repeated for the K slots (compiled when the step is). One sync."""
        began = time.perf_counter()
        self.net.eval()
        k = self.k
        loss_sum = torch.zeros(k, device=self.device)
        correct = torch.zeros(k, device=self.device, dtype=torch.long)
        for start in range(0, y.shape[0], self.t.eval_batch_size):
            logits = self._eval_logits(x_u8[start: start + self.t.eval_batch_size], self.logits_fn)
            yb = y[start: start + self.t.eval_batch_size]
            loss_sum += nn.functional.cross_entropy(full_precision(logits).transpose(1, 2),
                                                    yb[:, None].expand(-1, k),
                                                    reduction="none").sum(0)
            correct += (logits.argmax(2) == yb[:, None]).sum(0)
        self.net.train()
        n = y.shape[0]
        losses, accuracies = [v / n for v in loss_sum.tolist()], [c / n for c in correct.tolist()]
        self.stats.add_time("evaluation", time.perf_counter() - began)
        self._note_recompiles()
        return losses, accuracies

    def _eval_logits(self, x_u8: torch.Tensor, logits_fn) -> torch.Tensor:
        """[n, K, classes] for n images, each seen by every slot. A compiled forward gets
        every batch at the full ``eval_batch_size`` (a short last batch padded with zero
        images, their rows dropped): one shape, one compilation. In eval mode every image is
        computed on its own, so padding changes nothing for the others."""
        n, full = x_u8.shape[0], self.t.eval_batch_size
        if logits_fn is not self.net and n < full:
            x_u8 = torch.cat([x_u8, x_u8.new_zeros(full - n, *x_u8.shape[1:])])
        normalize = StackedNormalizer(self.device, self.k, self.layout, self.splits.dataset)
        with self.autocast():
            return logits_fn(normalize(x_u8.repeat(1, self.k, 1, 1)))[:n]
