"""K same-shaped models as one network (horizontal fusion, as in HFTA and PyTorch's model
ensembling tutorial; our own code).

Slot k of a fused network is model k. Its input is the K models' batches stacked along the
channels, ``[B, K*3, H, W]``; every layer keeps the slots apart by construction:

* ``Conv2d(cin, cout, groups=g)`` -> ``Conv2d(K*cin, K*cout, groups=K*g)``: output group j only
  reads input group j, so slot k's output channels (block k of K*cout) see only its own input
  channels (block k of K*cin). The K weights are concatenated along dim 0.
* ``BatchNorm2d(C)`` -> ``BatchNorm2d(K*C)``: statistics are per channel, hence per slot.
* ReLU, Identity, pooling and flatten act per channel; residual adds add block k to block k.
* The head ``Linear(in, out)`` -> ``FusedHead``: weight ``[K, out, in]``, one einsum, output
  ``[B, K, out]`` (flattening ``[B, K*C, h, w]`` puts slot k's C*h*w features in block k).

So slot k computes exactly model k's function and its gradient is model k's gradient. Any
other layer type (or a Linear that is not the head) is refused by ``structure_problem``, and
``fusion_problem`` also runs the forward code once fused, which catches functional ops that mix
channels (a concatenation, a channel shuffle).

Every fused tensor (parameter, buffer, optimizer state) has its slots along dim 0:
``slot_rows(t, K)[k]`` is slot k's part, shaped like model k's tensor (conv weights stay
channels_last: dim 0 is their outermost dimension).
"""

from __future__ import annotations

import copy
import functools
from typing import Mapping

import torch
from torch import nn

from sweep.study.model_ref import is_import_path
from sweep.training.models import build_model, memory_format

# Layers that act on each channel separately: the model's own forward code works unchanged.
_PER_CHANNEL = (nn.ReLU, nn.Identity, nn.AdaptiveAvgPool2d, nn.AvgPool2d, nn.MaxPool2d, nn.Flatten)


class FusedHead(nn.Module):
    """K linear heads: ``[B, K*in] -> [B, K, out]``; ``weight[k]`` is head k's weight."""

    def __init__(self, k: int, in_features: int, out_features: int, bias: bool, device=None):
        super().__init__()
        self.k = k
        self.weight = nn.Parameter(torch.empty(k, out_features, in_features, device=device))
        self.bias = nn.Parameter(torch.empty(k, out_features, device=device)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.einsum("bki,koi->bko", x.reshape(x.shape[0], self.k, -1), self.weight)
        return out if self.bias is None else out + self.bias


def structure_problem(model: nn.Module) -> str | None:
    """None when every layer of ``model`` is one that ``fuse`` knows, else why not (one line)."""
    leaves = [(name, m) for name, m in model.named_modules() if not any(m.children())]
    if not leaves or not isinstance(leaves[-1][1], nn.Linear):
        return "its last layer is not a Linear head"
    for i, (name, m) in enumerate(leaves):
        if isinstance(m, nn.Linear):
            if i != len(leaves) - 1:
                return f"layer {name} is a Linear that is not the head"
        elif isinstance(m, nn.Conv2d):
            if m.padding_mode != "zeros":
                return f"layer {name} pads with {m.padding_mode!r}"
        elif isinstance(m, nn.BatchNorm2d):
            # momentum None averages over num_batches_tracked, one counter for all slots
            if m.momentum is None or not m.track_running_stats or type(m) is not nn.BatchNorm2d:
                return f"layer {name} is a BatchNorm without running statistics at a momentum"
        elif not isinstance(m, _PER_CHANNEL):
            return f"layer {name} is a {type(m).__name__}, which fusion does not know"
    for name, m in model.named_modules():
        if any(m.children()) and any(True for _ in m.parameters(recurse=False)):
            return f"module {name or 'model'} holds parameters of its own"
    return None


def fuse(template: nn.Module, k: int, device: torch.device,
         layout: torch.memory_format | None = None) -> nn.Module:
    """An uninitialised fused network of ``k`` copies of ``template``'s architecture (fill the
    slots with ``load_slot``), on ``device``, in ``layout`` (default ``memory_format()``:
    channels_last)."""
    fused = copy.deepcopy(template).to("meta")  # structure only: the weights come per slot
    for name, m in list(fused.named_modules()):
        if isinstance(m, nn.Conv2d):
            new = nn.Conv2d(k * m.in_channels, k * m.out_channels, m.kernel_size, m.stride,
                            m.padding, m.dilation, k * m.groups, m.bias is not None, device="meta")
        elif isinstance(m, nn.BatchNorm2d):
            new = nn.BatchNorm2d(k * m.num_features, m.eps, m.momentum, m.affine,
                                 m.track_running_stats, device="meta")
        elif isinstance(m, nn.Linear):
            new = FusedHead(k, m.in_features, m.out_features, m.bias is not None, device="meta")
        else:
            continue
        parent, _, attr = name.rpartition(".")
        setattr(fused.get_submodule(parent), attr, new)
    fused = fused.to_empty(device=device).to(memory_format=layout or memory_format())
    with torch.no_grad():
        for buffer in fused.buffers():
            buffer.zero_()  # num_batches_tracked; the rest is overwritten slot by slot
    return fused


def slot_rows(t: torch.Tensor, k: int) -> torch.Tensor:
    """``t`` (a fused tensor) as ``[k, ...]``, a view: row i is slot i's part."""
    return t.unflatten(0, (k, -1))


def _slot_tensors(module: nn.Module) -> dict[str, torch.Tensor]:
    # 0-dim buffers (num_batches_tracked) are shared, not per slot: not copied
    return {name: t for name, t in [*module.named_parameters(), *module.named_buffers()] if t.dim()}


@torch.no_grad()
def load_slot(fused: nn.Module, k: int, slot: int, model: nn.Module | Mapping[str, torch.Tensor]) -> None:
    """Write ``model``'s parameters and BatchNorm statistics (or those of a model's
    ``state_dict``) into slot ``slot`` of ``fused`` (in place: storages, and so a captured CUDA
    graph, stay valid)."""
    source = model if isinstance(model, Mapping) else _slot_tensors(model)
    for name, t in _slot_tensors(fused).items():
        row = slot_rows(t, k)[slot]
        row.copy_(source[name].reshape(row.shape))


@torch.no_grad()
def slot_tensors(fused: nn.Module) -> dict[str, torch.Tensor]:
    """The fused network's tensors that hold slot rows (what ``slot_state`` cuts from)."""
    return _slot_tensors(fused)


def slot_state(fused: nn.Module | Mapping[str, torch.Tensor], k: int, slot: int,
               template: nn.Module | Mapping[str, torch.Tensor],
               steps: int) -> dict[str, torch.Tensor]:
    """Slot ``slot`` of ``fused`` (the network, or its ``slot_tensors`` copied off the device)
    as the unfused model's ``state_dict`` (copies; the inverse of ``load_slot``; ``template``:
    the unfused model or its ``state_dict``). The 0-dim ``num_batches_tracked`` counters, one
    for all slots in the fused network, are the slot's own: one per training step it took
    (``steps``), as unfused."""
    tensors = fused if isinstance(fused, Mapping) else _slot_tensors(fused)
    shapes = template if isinstance(template, Mapping) else template.state_dict()
    rows = {name: slot_rows(t, k)[slot] for name, t in tensors.items()}
    return {name: rows[name].reshape(t.shape).clone() if name in rows
            else torch.tensor(steps, dtype=t.dtype)
            for name, t in shapes.items()}


@torch.no_grad()
def copy_slots(dst: nn.Module, src: nn.Module, src_k: int, slots: list[int]) -> None:
    """``dst`` (fused with ``len(slots)`` slots) gets slots ``slots`` of ``src``."""
    source = _slot_tensors(src)
    for name, t in _slot_tensors(dst).items():
        slot_rows(t, len(slots)).copy_(slot_rows(source[name], src_k)[slots])


def decays(model: nn.Module) -> dict[str, bool]:
    """Parameter name -> whether it gets weight decay: as ``train.build_optimizer``, those with
    more than one dimension in the unfused model."""
    return {name: p.ndim > 1 for name, p in model.named_parameters()}


@functools.lru_cache(maxsize=None)
def fusion_problem(model: str, width: int) -> str | None:
    """None when ``model`` at ``width`` can be fused, else one line saying why not (the caller
    says it once and runs unfused). A model by import path is never fused: the fused network
    knows only the built-in families' layers and forwards (docs/your-model.md)."""
    if is_import_path(model):
        return f"{model} is a model by import path; packs fuse only the built-in ResNets"
    with torch.random.fork_rng(devices=[]):  # leaves the caller's random state alone
        try:
            models = [build_model(model, width) for _ in range(2)]
        except ValueError as err:
            return str(err)
        problem = module_problem(*models)
    return f"{model} cannot be fused: {problem}" if problem else None


def module_problem(first: nn.Module, second: nn.Module) -> str | None:
    """None when two differently initialised models of one architecture fuse, else why not:
    every layer must be known (``structure_problem``), and a 2-slot fused forward must equal
    the two models' own forwards (catches forward code that mixes channels)."""
    problem = structure_problem(first)
    if problem:
        return problem
    fused = fuse(first, 2, torch.device("cpu"))
    for slot, m in enumerate((first, second)):
        load_slot(fused, 2, slot, m)
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        try:
            out = fused(torch.cat([x, x], 1).contiguous(memory_format=torch.channels_last))
        except RuntimeError as err:
            return f"its forward fails on stacked slots ({str(err).splitlines()[0]})"
        want = torch.stack([first(x), second(x)], 1)
    if out.shape != want.shape or not torch.allclose(out, want, rtol=1e-3, atol=1e-4):
        return "its forward mixes the slots' channels"
    return None
