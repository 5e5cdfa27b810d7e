"""SGD and AdamW over the slots of a fused network, with per-slot hyperparameters as vectors.

``lr``, ``weight_decay`` and ``momentum`` are device tensors of shape ``[K]``, written in place
(``vector[k] = ...`` or ``copy_``): a step reads them on the device, so a new LR every step
costs no host sync and keeps a captured CUDA graph valid. Every state tensor is allocated up
front (not lazily at the first step as torch.optim does) for the same reason.

The update of slot k is torch.optim's (``_single_tensor_sgd`` / ``_single_tensor_adam`` with
decoupled weight decay), in the same order, with the scalar replaced by entry k of the vector
(broadcast over ``slot_rows``). Zero-initialised momentum equals torch's first-step
``buf = grad`` exactly (``0 * momentum + grad``). AdamW's bias correction uses a per-slot step
count (float64, as torch computes it on the host), because a refilled slot starts again at 0.
Weight decay applies only to the parameters that ``decays`` marks, as ``build_optimizer``.
"""

from __future__ import annotations

import torch

from sweep.training.fused_model import slot_rows


class SlotOptimizer:
    """Base: the vectors, the per-slot state and the slot operations (reset, select)."""

    state_names: tuple[str, ...] = ()

    def __init__(self, params: list[torch.Tensor], decay: list[bool], k: int):
        self.params, self.decay, self.k = params, decay, k
        device = params[0].device
        self.lr = torch.zeros(k, device=device)
        self.weight_decay = torch.zeros(k, device=device)
        self.momentum = torch.zeros(k, device=device)
        self.steps = torch.zeros(k, device=device, dtype=torch.float64)
        self.state = {name: [torch.zeros_like(p) for p in params] for name in self.state_names}

    def _b(self, vector: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """``vector`` [K] shaped to broadcast over ``rows`` [K, ...]."""
        return vector.view(self.k, *[1] * (rows.dim() - 1))

    def state_tensors(self) -> list[torch.Tensor]:
        """Everything a step writes (to snapshot around a CUDA-graph warm-up)."""
        return [self.steps, *[t for ts in self.state.values() for t in ts]]

    @torch.no_grad()
    def reset_slot(self, slot: int) -> None:
        """Fresh optimizer state for slot ``slot`` alone (a refilled slot)."""
        self.steps[slot] = 0
        for tensors in self.state.values():
            for t in tensors:
                slot_rows(t, self.k)[slot].zero_()

    @torch.no_grad()
    def take_slots(self, src: "SlotOptimizer", slots: list[int]) -> None:
        """This optimizer (over ``len(slots)`` slots) continues ``src``'s slots ``slots``."""
        index = torch.tensor(slots, device=self.lr.device)
        for name in ("lr", "weight_decay", "momentum", "steps"):
            getattr(self, name).copy_(getattr(src, name)[index])
        for name, tensors in self.state.items():
            for dst, old in zip(tensors, src.state[name]):
                slot_rows(dst, self.k).copy_(slot_rows(old, src.k)[index])


class SlotSGD(SlotOptimizer):
    """torch.optim.SGD(momentum, dampening 0, nesterov, weight_decay) per slot."""

    state_names = ("momentum_buffer",)

    def __init__(self, params, decay, k, nesterov: bool):
        super().__init__(params, decay, k)
        self.nesterov = nesterov

    @torch.no_grad()
    def step(self) -> None:
        self.steps += 1
        for p, decay, buf in zip(self.params, self.decay, self.state["momentum_buffer"]):
            p_r, g_r, buf_r = (slot_rows(t, self.k) for t in (p, p.grad, buf))
            if decay:
                g_r = torch.addcmul(g_r, p_r, self._b(self.weight_decay, p_r))  # g + wd * p
            momentum = self._b(self.momentum, p_r)
            buf_r.mul_(momentum).add_(g_r)
            g_r = torch.addcmul(g_r, buf_r, momentum) if self.nesterov else buf_r
            p_r.sub_(g_r * self._b(self.lr, p_r))


class SlotAdamW(SlotOptimizer):
    """torch.optim.AdamW(betas=(0.9, 0.999), eps=1e-8, amsgrad off) per slot."""

    state_names = ("exp_avg", "exp_avg_sq")

    def __init__(self, params, decay, k, betas=(0.9, 0.999), eps: float = 1e-8):
        super().__init__(params, decay, k)
        self.betas, self.eps = betas, eps

    @torch.no_grad()
    def step(self) -> None:
        beta1, beta2 = self.betas
        self.steps += 1
        lr = self.lr.double()
        step_size = (lr / (1 - torch.pow(beta1, self.steps))).float()
        bias_correction2_sqrt = (1 - torch.pow(beta2, self.steps)).sqrt().float()
        shrink = (1 - lr * self.weight_decay.double()).float()  # decoupled weight decay
        for p, decay, m, v in zip(self.params, self.decay, self.state["exp_avg"],
                                  self.state["exp_avg_sq"]):
            p_r, g_r, m_r, v_r = (slot_rows(t, self.k) for t in (p, p.grad, m, v))
            if decay:
                p_r.mul_(self._b(shrink, p_r))
            m_r.lerp_(g_r, 1 - beta1)
            v_r.mul_(beta2).addcmul_(g_r, g_r, value=1 - beta2)
            denom = (v_r.sqrt() / self._b(bias_correction2_sqrt, p_r)).add_(self.eps)
            p_r.sub_(m_r / denom * self._b(step_size, p_r))


def build_slot_optimizer(kind: str, params, decay, k: int, nesterov: bool) -> SlotOptimizer:
    """``kind`` is ``train.optimizer``: "sgd" or "adamw" (as ``train.build_optimizer``)."""
    if kind == "adamw":
        return SlotAdamW(params, decay, k)
    if kind == "sgd":
        return SlotSGD(params, decay, k, nesterov)
    raise ValueError(f"train.optimizer: unknown optimizer {kind!r}; use sgd or adamw")
