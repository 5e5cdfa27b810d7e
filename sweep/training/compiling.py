"""What training does around ``torch.compile`` (and a CUDA graph capture), the rules shared by an
unfused trial (``train``) and a fused pack (``fused_pack``):

- ``or_fall_back``: a compilation or capture that fails must not fail the trials (they train as
  well without it, only slower): one warning line naming the failure and what runs instead.
- ``planned_compile``: a compilation the caller means to make again for new shapes (a pack that
  shrinks compiles its step for the new K) is not one of the recompiles dynamo guards against:
  its ``error_on_recompile`` (a debugging switch, set by the tests) would refuse it, and its
  ``recompile_limit`` (8 per function) would, after 8 pack sizes in one worker process, make
  dynamo give up on the step and run it eagerly without a word.
- ``DynamoWatch``: the frames dynamo compiled and the graph breaks it made since a mark, read
  from dynamo's own counters (``torch._dynamo.utils.counters``: "frames"/"total" counts every
  frame it converts, a recompile or a graph break's continuation included, and a frame it gives
  up on at its recompile limit; "graph_break" every break). After a planned compilation nothing
  should be compiled until the next one; whatever is, is a recompile.
"""

from __future__ import annotations

import contextlib
import warnings
from typing import Callable, TypeVar

import torch
from torch._dynamo.utils import counters

from sweep.base.text import first_line

T = TypeVar("T")

#: dynamo's recompile limit during a planned compilation: one entry per pack size a worker
#: process meets (shrinks to any smaller K, pack after pack), far more than 8
PLANNED_RECOMPILE_LIMIT = 1024


def or_fall_back(attempt: Callable[[], T], failed: str, instead: str) -> T | None:
    """``attempt()``; if it raises an Exception, one warning line "``failed`` failed (the
    error's first line); ``instead``" and None (the caller runs its uncompiled step)."""
    try:
        return attempt()
    except Exception as err:
        warnings.warn(f"{failed} failed ({first_line(err, typed=True)}); {instead}", stacklevel=2)
        return None


@contextlib.contextmanager
def planned_compile():
    """Around the first calls of functions the caller has just ``torch.compile``'d again for
    new shapes (see the module docstring): dynamo's recompile checks are lifted for them."""
    with torch._dynamo.config.patch(error_on_recompile=False,
                                    recompile_limit=PLANNED_RECOMPILE_LIMIT):
        yield


class DynamoWatch:
    """Frames dynamo compiled and graph breaks it made since ``mark()`` (process-wide counts:
    the caller is the only thing compiling in a training process)."""

    def __init__(self):
        self.mark()

    @staticmethod
    def _now() -> tuple[int, int]:
        return counters["frames"]["total"], sum(counters["graph_break"].values())

    def mark(self) -> None:
        self.frames, self.graph_breaks = self._now()

    def since(self) -> tuple[int, int]:
        """(frames compiled, graph breaks) since the mark; marks anew."""
        frames, graph_breaks = self._now()
        new = frames - self.frames, graph_breaks - self.graph_breaks
        self.frames, self.graph_breaks = frames, graph_breaks
        return new
