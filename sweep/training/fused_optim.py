"""SGD and AdamW over the slots of a fused network, with per-slot hyperparameters as vectors.

``lr`` and the per-slot hyperparameters (``PER_SLOT``: weight decay, momentum and nesterov for
SGD, betas for AdamW) are device tensors of shape ``[K]``, written in place (``vector[k] = ...``
or ``copy_``): a step reads them on the device, so a new LR every step or a refill with other
hyperparameters costs no host sync, keeps a captured CUDA graph valid and recompiles nothing. All state is allocated up front
(not lazily at the first step as torch.optim does) for the same reason.

All parameters live in ONE flat buffer (each parameter a view into it, in its own layout),
and so do their gradients (backward accumulates into the views; ``zero_grad`` zeroes the
buffer) and the optimizer state. A step is then a handful of element-wise kernels over the
whole buffer, whatever the number of layers: on CUDA, under a graph, the step's cost is memory
bandwidth, not one small kernel per parameter tensor. ``slot_of`` maps each element to its
slot (slot k owns row k of every ``slot_rows`` view), so ``vector[slot_of]`` spreads a
per-slot value over the buffer.

The update of slot k is torch.optim's (``_single_tensor_sgd`` / ``_single_tensor_adam`` with
decoupled weight decay), in the same order, with the scalar replaced by entry k of the vector.
Zero-initialised momentum equals torch's first-step ``buf = grad`` exactly
(``0 * momentum + grad``). AdamW's bias correction uses a per-slot step count (float64, as
torch computes it on the host), because a refilled slot starts again at 0. Weight decay applies
only to the parameters that ``decays`` marks, as ``build_optimizer``.
"""

from __future__ import annotations

import torch

from sweep.training.fused_model import slot_rows


class SlotOptimizer:
    """Base: the flat buffers, the vectors, the per-slot state and the slot operations."""

    state_names: tuple[str, ...] = ()
    #: per-slot hyperparameters, named as the ``train:`` fields a slot's config sets them from
    PER_SLOT: tuple[str, ...] = ("weight_decay",)

    def __init__(self, params: list[torch.Tensor], decay: list[bool], k: int):
        self.k, self.shapes = k, [(p.shape, p.stride()) for p in params]
        device, dtype = params[0].device, params[0].dtype
        total = sum(p.numel() for p in params)
        self.flat = torch.empty(total, device=device, dtype=dtype)
        self.grad = torch.zeros(total, device=device, dtype=dtype)
        mask, self._offsets, offset = [], [], 0
        for p, d in zip(params, decay):
            dense = p.is_contiguous() or (p.dim() == 4 and p.is_contiguous(
                memory_format=torch.channels_last))
            if not dense or p.numel() % k:
                raise ValueError(f"a fused parameter of shape {tuple(p.shape)} has no slot rows")
            self._offsets.append(offset)
            view = self._view(self.flat, len(self._offsets) - 1)
            view.copy_(p.detach())
            p.data = view  # the parameter now lives in the flat buffer (same layout)
            p.grad = self._view(self.grad, len(self._offsets) - 1)
            mask.append(torch.full((p.numel(),), d, device=device, dtype=torch.bool))
            offset += p.numel()
        self.params = params
        self.decay_mask = torch.cat(mask)
        self.slot_of = torch.cat([torch.arange(k, device=device, dtype=torch.int32)
                                  .repeat_interleave(p.numel() // k) for p in params])
        self.lr = torch.zeros(k, device=device)
        self.weight_decay = torch.zeros(k, device=device)
        self.steps = torch.zeros(k, device=device, dtype=torch.float64)
        self.state = {name: torch.zeros_like(self.flat) for name in self.state_names}

    def _view(self, flat: torch.Tensor, i: int) -> torch.Tensor:
        shape, stride = self.shapes[i]
        return flat.as_strided(shape, stride, flat.storage_offset() + self._offsets[i])

    def spread(self, vector: torch.Tensor) -> torch.Tensor:
        """A per-slot vector [K] as one value per element of the flat buffer."""
        return torch.index_select(vector, 0, self.slot_of)

    def zero_grad(self) -> None:
        self.grad.zero_()

    def state_tensors(self) -> list[torch.Tensor]:
        """What a step writes besides the parameters (to snapshot around a graph warm-up)."""
        return [self.steps, self.grad, *self.state.values()]

    @torch.no_grad()
    def set_slot(self, slot: int, values) -> None:
        """Slot ``slot``'s hyperparameters (``PER_SLOT``) from ``values`` (an object with those
        attributes: the slot's ``TrainSpec``), written in place."""
        for name in self.PER_SLOT:
            getattr(self, name)[slot] = getattr(values, name)

    @torch.no_grad()
    def reset_slot(self, slot: int) -> None:
        """Fresh optimizer state for slot ``slot`` alone (a refilled slot)."""
        self.steps[slot] = 0
        mine = self.slot_of == slot
        for t in self.state.values():
            t.masked_fill_(mine, 0)

    @torch.no_grad()
    def take_slots(self, src: "SlotOptimizer", slots: list[int]) -> None:
        """This optimizer (over ``len(slots)`` slots) continues ``src``'s slots ``slots``."""
        index = torch.tensor(slots, device=self.lr.device)
        for name in ("lr", "steps", *self.PER_SLOT):
            getattr(self, name).copy_(getattr(src, name)[index])
        for name, t in self.state.items():
            for i in range(len(self.shapes)):
                slot_rows(self._view(t, i), self.k).copy_(
                    slot_rows(src._view(src.state[name], i), src.k)[index])

    def slot_tensors(self) -> dict[str, torch.Tensor]:
        """The per-slot step counts and the flat state buffers (what ``slot_state`` cuts from)."""
        return {"steps": self.steps, **self.state}

    @torch.no_grad()
    def slot_state(self, slot: int, tensors: dict[str, torch.Tensor] | None = None
                   ) -> tuple[int, list[dict[str, torch.Tensor]]]:
        """Slot ``slot``'s optimizer steps and, per parameter (``params`` order), its state
        tensors shaped like the unfused parameter (copies); from ``tensors`` (``slot_tensors``
        copied off the device) when given, else from the live buffers. Reads only the layout
        of this optimizer, which never changes: any thread may cut from a copy."""
        tensors = tensors if tensors is not None else self.slot_tensors()
        per_param = [{name: slot_rows(self._view(tensors[name], i), self.k)[slot].clone()
                      for name in self.state_names} for i in range(len(self.shapes))]
        return int(tensors["steps"][slot].item()), per_param

    @torch.no_grad()
    def load_slot_state(self, slot: int, steps: int,
                        per_param: list[dict[str, torch.Tensor]]) -> None:
        """Slot ``slot`` continues from ``slot_state``'s output (state absent for a parameter,
        as torch's SGD without momentum keeps none, is zero), in place."""
        self.steps[slot] = steps
        for i, saved in enumerate(per_param):
            for name, t in self.state.items():
                row = slot_rows(self._view(t, i), self.k)[slot]
                if name in saved:
                    row.copy_(saved[name].reshape(row.shape))
                else:
                    row.zero_()


class SlotSGD(SlotOptimizer):
    """torch.optim.SGD(momentum, dampening 0, nesterov, weight_decay) per slot. Nesterov with
    momentum 0 is plain SGD here as in ``build_optimizer`` (g + 0 * buf = buf = g)."""

    state_names = ("momentum_buffer",)
    PER_SLOT = ("weight_decay", "momentum", "nesterov")

    def __init__(self, params, decay, k, nesterov: bool = True, momentum: float = 0.0):
        super().__init__(params, decay, k)
        self.momentum = torch.full((k,), momentum, device=self.lr.device)
        self.nesterov = torch.full((k,), nesterov, device=self.lr.device, dtype=torch.bool)

    @torch.no_grad()
    def step(self) -> None:
        self.steps += 1
        p, buf = self.flat, self.state["momentum_buffer"]
        momentum = self.spread(self.momentum)
        decay = torch.where(self.decay_mask, self.spread(self.weight_decay), 0.0)
        g = torch.addcmul(self.grad, p, decay)  # grad + wd * param
        buf.mul_(momentum).add_(g)
        g = torch.where(self.spread(self.nesterov), torch.addcmul(g, buf, momentum), buf)
        p.sub_(g * self.spread(self.lr))


class SlotAdamW(SlotOptimizer):
    """torch.optim.AdamW(betas, eps=1e-8, amsgrad off) per slot, betas per slot. The betas are
    float64 (torch computes ``1 - beta ** step`` and ``1 - beta`` in Python floats)."""

    state_names = ("exp_avg", "exp_avg_sq")
    PER_SLOT = ("weight_decay", "beta1", "beta2")

    def __init__(self, params, decay, k, betas=(0.9, 0.999), eps: float = 1e-8):
        super().__init__(params, decay, k)
        device = self.lr.device
        self.beta1 = torch.full((k,), betas[0], device=device, dtype=torch.float64)
        self.beta2 = torch.full((k,), betas[1], device=device, dtype=torch.float64)
        self.eps = eps

    @torch.no_grad()
    def step(self) -> None:
        self.steps += 1
        lr = self.lr.double()
        dtype = self.flat.dtype  # fp32 (float64 in the equivalence tests)
        step_size = (lr / (1 - torch.pow(self.beta1, self.steps))).to(dtype)
        bias_correction2_sqrt = (1 - torch.pow(self.beta2, self.steps)).sqrt().to(dtype)
        shrink = (1 - lr * self.weight_decay.double()).to(dtype)  # decoupled weight decay
        p, g, m, v = self.flat, self.grad, self.state["exp_avg"], self.state["exp_avg_sq"]
        p.mul_(torch.where(self.decay_mask, self.spread(shrink), 1.0))
        m.lerp_(g, self.spread((1 - self.beta1).to(dtype)))
        # v * beta2 + (1 - beta2) * g * g, as torch's addcmul_(g, g, value=1 - beta2)
        v.mul_(self.spread(self.beta2.to(dtype))).addcmul_(
            g * self.spread((1 - self.beta2).to(dtype)), g)
        denom = (v.sqrt() / self.spread(bias_correction2_sqrt)).add_(self.eps)
        p.sub_(m / denom * self.spread(step_size))


def build_slot_optimizer(kind: str, params, decay, k: int) -> SlotOptimizer:
    """``kind`` is ``train.optimizer``: "sgd" or "adamw" (as ``train.build_optimizer``); each
    slot's hyperparameters are set by ``set_slot`` when it is filled."""
    if kind == "adamw":
        return SlotAdamW(params, decay, k)
    if kind == "sgd":
        return SlotSGD(params, decay, k)
    raise ValueError(f"train.optimizer: unknown optimizer {kind!r}; use sgd or adamw")
