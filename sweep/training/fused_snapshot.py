"""A fused pack's training state at an epoch boundary, copied off the device in one go.

Cutting one slot's state out of the fused tensors is a few hundred small row copies (one per
parameter, buffer and optimizer state tensor): about 3 ms per ResNet-20 slot on a 2-core CPU,
50 ms for a pack of 16, on the training thread if done there. So the training thread copies the
pack's few storages whole (``host_copy``: the flat parameter buffer, the optimizer's flat state
buffers, the BatchNorm statistics; on CUDA into pinned memory, synchronised once for the pack)
plus each slot's small host-side state, and ``state(index)`` cuts a slot's rows from that copy
later, on whichever thread writes its checkpoint. The copy is never written by training again.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass

import torch

from sweep.training.fused_model import slot_state, slot_tensors
from sweep.training.fused_optim import SlotOptimizer
from sweep.training.host_copy import HostBuffers, copy_to_host, synchronize


@dataclass(frozen=True)
class SlotClock:
    """What a slot keeps on the host (copied at the boundary): see ``checkpoint.STATE_KEYS``."""

    schedule: dict
    generator: torch.Tensor
    history: list
    steps: int


class PackSnapshot:
    """The pack's tensors (copied off the device into ``buffers``, which get them back when
    the snapshot is dropped; or live with ``buffers=None``: the synchronous path, which must
    then be cut before training goes on) and the clocks of some slots. A slot's state is cut
    into new tensors: nothing of it keeps the snapshot alive."""

    def __init__(self, net: torch.nn.Module, optimizer: SlotOptimizer, k: int,
                 template_state: dict, kind: str, clocks: dict[int, SlotClock],
                 buffers: HostBuffers | None, precision: str):
        model, optim = slot_tensors(net), optimizer.slot_tensors()
        if buffers is not None:
            live = [*model.values(), *optim.values()]
            copies, wholes = copy_to_host(live, buffers)
            synchronize(live)  # once for the whole pack
            weakref.finalize(self, buffers.give_back, wholes)
            model = dict(zip(model, copies))
            optim = dict(zip(optim, copies[len(model):]))
        self._model, self._optim, self._optimizer = model, optim, optimizer
        self._names = [name for name, _ in net.named_parameters()]
        self._k, self._template, self._kind, self.clocks = k, template_state, kind, clocks
        self._precision = precision  # bf16 or fp32: its retry resumes only in it (pack_bf16)

    def state(self, index: int) -> dict:
        """Slot ``index``'s training state (``sweep.training.checkpoint``'s format), cut from
        the copy: may run on any thread, any time later."""
        clock = self.clocks[index]
        steps, per_param = self._optimizer.slot_state(index, self._optim)
        buffers = {name: {key: t.reshape(self._template[name].shape) for key, t in state.items()}
                   for name, state in zip(self._names, per_param)}
        return {"model": slot_state(self._model, self._k, index, self._template, clock.steps),
                "optimizer": {"kind": self._kind, "steps": steps, "buffers": buffers},
                "schedule": clock.schedule, "generator": clock.generator,
                "epochs": len(clock.history), "steps": clock.steps, "history": clock.history,
                "precision": self._precision}
