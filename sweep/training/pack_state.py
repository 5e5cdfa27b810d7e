"""A pack's checkpoints: snapshots of its state (the format: ``sweep.training.checkpoint``)
and a slot resumed from one. A mixin of ``fused_pack.Pack``."""

from __future__ import annotations

import functools
import time
from typing import Sequence

from sweep.base.text import first_line
from sweep.training.checkpoint import check_state
from sweep.training.fused_model import load_slot
from sweep.training.fused_snapshot import PackSnapshot, SlotClock


class PackState:
    """Snapshots of the pack and a slot resumed from one."""

    def snapshot(self, indices: Sequence[int], copy: bool = True) -> PackSnapshot:
        """The pack's state with the clocks of slots ``indices``: copied off the device (one
        copy per storage, one sync: ``fused_snapshot``), or live with ``copy=False``."""
        clocks = {k: SlotClock(self.slots[k].schedule.state_dict(),
                               self.slots[k].generator.get_state(),
                               [dict(h) for h in self.slots[k].history], self.slots[k].step)
                  for k in indices}
        return PackSnapshot(self.net, self.optimizer, self.k, self.template_state,
                            self.t.optimizer, clocks, self._host_buffers if copy else None,
                            self.precision)

    def slot_state(self, index: int) -> dict:
        """Slot ``index``'s training state after its last finished epoch, in the format of an
        unfused trial's (copies of the slot's rows, cut from the live tensors)."""
        return self.snapshot([index], copy=False).state(index)

    def _resume(self, index: int, state: dict) -> None:
        """Slot ``index`` (just filled) continues from ``state`` on its own clock."""
        check_state(state)
        s = self.slots[index]
        load_slot(self.net, self.k, index, state["model"])
        saved = state["optimizer"]
        if saved["kind"] != self.t.optimizer:
            raise ValueError(f"optimizer state of {saved['kind']}, not {self.t.optimizer}")
        names = [name for name, _ in self.net.named_parameters()]
        self.optimizer.load_slot_state(index, saved["steps"],
                                       [saved["buffers"].get(n, {}) for n in names])
        s.schedule.load_state_dict(state["schedule"])
        s.generator.set_state(state["generator"])
        s.step, s.epoch, s.history = state["steps"], state["epochs"], list(state["history"])

    def checkpoint_slots(self, indices: Sequence[int]) -> None:
        """Hand each of slots ``indices`` that checkpoints its state: one copy of the pack taken
        here (the training thread's whole share), the slots cut from it by the callee."""
        began = time.perf_counter()
        wanted = [k for k in indices if self.slots[k].job.checkpoint is not None]
        if wanted:
            snapshot = self.snapshot(wanted)
            for k in wanted:
                try:
                    self.slots[k].job.checkpoint(functools.partial(snapshot.state, k))
                except Exception as err:  # one slot's hand-off: that slot ends, the others train
                    self._machinery_failed(self.slots[k], f"checkpoint failed "
                                                          f"({first_line(err, typed=True)})")
        self.stats.add_time("checkpoint", time.perf_counter() - began)
