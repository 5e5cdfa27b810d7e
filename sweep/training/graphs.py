"""A training step captured as one CUDA graph (forward, backward and optimizer update).

Following PyTorch's "whole network capture" recipe (torch.cuda.graphs docs): a few warm-up
iterations on a side stream (cudnn.benchmark picks its algorithms, autograd builds its state),
then the capture. The step zeroes the gradients itself (they are the optimizer's flat buffer,
allocated before the capture, so backward accumulates into static memory). A replay reads the static input tensors and the optimizer's
device vectors (LR, weight decay, momentum) and writes the parameters in place; the caller
copies each batch into the static inputs and writes the vectors in place, so nothing is
recompiled and nothing waits for the host.

The warm-up iterations really update the weights, BatchNorm statistics and optimizer state:
everything they write is snapshot before and restored after, so the first replayed step is
the run's first step (a fused slot equals its unfused run).
"""

from __future__ import annotations

import contextlib
from typing import Callable, Sequence

import torch

WARMUP_ITERATIONS = 3  # the docs use 3 (11 with DistributedDataParallel)


@contextlib.contextmanager
def restored(state: Sequence[torch.Tensor]):
    """Whatever the block writes into ``state`` (weights, statistics, optimizer state) is
    undone when it ends, even by an exception: warm-up steps (a capture's, a compilation's)
    leave the run where it was."""
    snapshot = [t.detach().clone() for t in state]
    try:
        yield
    finally:
        with torch.no_grad():
            for t, saved in zip(state, snapshot):
                t.copy_(saved)


class CapturedStep:
    """``step_fn()`` captured; calling the object replays it and returns its output tensor
    (the same static tensor every time: copy it before the next replay)."""

    def __init__(self, step_fn: Callable[[], torch.Tensor], state: Sequence[torch.Tensor]):
        with restored(state):
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for _ in range(WARMUP_ITERATIONS):
                    step_fn()
            torch.cuda.current_stream().wait_stream(side)
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph):
                self.out = step_fn()

    def __call__(self) -> torch.Tensor:
        self.graph.replay()
        return self.out
