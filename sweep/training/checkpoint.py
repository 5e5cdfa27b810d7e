"""The state of one trial's training at an epoch end, in ONE format for an unfused trial
(``train``) and a slot of a fused pack (``fused_pack.Pack``), so a trial checkpointed in a pack
resumes unfused and the other way round. Knows nothing of Optuna or MLflow (what a checkpoint
file holds besides this, and where it lives: ``sweep.stores.checkpoints``).

A state is a dict of tensors and plain values (``torch.load(weights_only=True)`` reads it):

* ``model``: the unfused model's ``state_dict`` (parameters and BatchNorm running statistics);
* ``optimizer``: ``{"kind": "sgd"|"adamw", "steps": n, "buffers": {param name: {name: tensor}}}``,
  the per-parameter state keyed by the unfused parameter's name (torch.optim keys it by
  position, the fused optimizer by flat-buffer rows: names are what both share);
* ``schedule``: ``LRSchedule.state_dict()`` (plateau's counters; warmup and every main schedule
  are closed forms of the step, so the step is their whole state);
* ``generator``: the state of the trial's generator (data order and augmentation draws);
* ``epochs`` (finished), ``steps`` (optimizer steps so far), ``history`` (per-epoch metrics);
* ``precision``: "bf16" or "fp32", what the steps ran in (``train.check_resumable``).

The global RNG is not saved: it only seeds the initial weights, which the state replaces.
"""

from __future__ import annotations

from pathlib import Path
from typing import Mapping

import torch
from torch import nn

from sweep.training.atomic import write_bytes_atomic

STATE_KEYS = ("model", "optimizer", "schedule", "generator", "epochs", "steps", "history")


def write_atomic(path: Path, payload: Mapping) -> None:
    """``torch.save`` to a temporary file beside ``path``, flushed to disk, renamed over it, and
    the folder flushed: a kill at any moment leaves the previous file or the new one, never a
    mix, and the rename survives a crash of the node (``sweep.training.atomic``)."""
    write_bytes_atomic(path, lambda f: torch.save(dict(payload), f))


def read(path: Path) -> dict:
    """The payload ``write_atomic`` wrote, on the CPU. Raises ValueError (one line) for a file
    that is not one (truncated, overwritten, another format)."""
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # truncated zip, pickle errors, unknown globals ...
        first = (str(err).strip().splitlines() or [type(err).__name__])[0][:200]
        raise ValueError(f"unreadable ({type(err).__name__}: {first})") from None
    if not isinstance(payload, dict):
        raise ValueError(f"not a checkpoint (a {type(payload).__name__})")
    return payload


def check_state(state: Mapping) -> None:
    """Raise ValueError naming what is missing from a training state."""
    missing = [k for k in STATE_KEYS if k not in state]
    if missing:
        raise ValueError(f"incomplete training state (no {', '.join(missing)})")


def check_consistent(state: Mapping, steps_per_epoch: int, total_epochs: int) -> None:
    """Raise ValueError (one line) unless ``state``'s counts agree with each other and with a
    trial of ``total_epochs`` epochs of ``steps_per_epoch`` steps: some but not all epochs
    finished (a file at the last epoch would end the trial with no training), steps = epochs x
    steps per epoch, one history entry per epoch, the optimizer's steps the state's."""
    check_state(state)
    epochs, steps = state["epochs"], state["steps"]
    if not isinstance(epochs, int) or not 0 < epochs < total_epochs:
        raise ValueError(f"it holds {epochs!r} finished epochs, not 1 to {total_epochs - 1}")
    if steps != epochs * steps_per_epoch:
        raise ValueError(f"{steps!r} steps for {epochs} epochs of {steps_per_epoch}")
    if not isinstance(state["history"], list) or len(state["history"]) != epochs:
        raise ValueError(f"a history of {len(state['history'])} epochs for {epochs}")
    if not isinstance(state["optimizer"], Mapping) or state["optimizer"].get("steps") != steps:
        raise ValueError("its optimizer's step count is not its own")


# --- the optimizer, keyed by parameter name --------------------------------------------------

def _kind(optimizer: torch.optim.Optimizer) -> str:
    return "adamw" if isinstance(optimizer, torch.optim.AdamW) else "sgd"


def optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer, steps: int) -> dict:
    """A torch.optim SGD/AdamW's state in the shared format (``steps``: optimizer steps taken)."""
    buffers = {}
    for name, p in model.named_parameters():
        state = optimizer.state.get(p, {})
        buffers[name] = {k: v for k, v in state.items() if k != "step" and torch.is_tensor(v)}
    return {"kind": _kind(optimizer), "steps": steps, "buffers": buffers}


def load_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer, state: Mapping) -> None:
    """Restore ``optimizer_state``'s output into a fresh torch.optim optimizer over ``model``."""
    if state["kind"] != _kind(optimizer):
        raise ValueError(f"optimizer state of {state['kind']}, not {_kind(optimizer)}")
    for name, p in model.named_parameters():
        saved = state["buffers"].get(name, {})
        if not saved:
            continue  # SGD without momentum keeps no state
        for key, value in saved.items():
            if not torch.is_tensor(value) or value.shape != p.shape:
                raise ValueError(f"optimizer state {name}.{key} does not fit the model")
        entry = {k: v.to(p.device) for k, v in saved.items()}
        if isinstance(optimizer, torch.optim.AdamW):
            # torch keeps AdamW's step as a float32 tensor on the CPU (not capturable)
            entry["step"] = torch.tensor(float(state["steps"]), dtype=torch.float32)
        optimizer.state[p] = entry


# --- an unfused trial ---------------------------------------------------------------------------

def unfused_state(model: nn.Module, optimizer: torch.optim.Optimizer, schedule,
                  generator: torch.Generator, epochs: int, steps: int, history: list,
                  precision: str = "fp32") -> dict:
    """The training state of ``train()`` after ``epochs`` finished epochs. Its tensors are the
    live ones: write it out (``write_atomic``) before training goes on."""
    return {"model": model.state_dict(), "optimizer": optimizer_state(model, optimizer, steps),
            "schedule": schedule.state_dict(), "generator": generator.get_state(),
            "epochs": epochs, "steps": steps, "history": list(history), "precision": precision}


def load_unfused(state: Mapping, model: nn.Module, optimizer: torch.optim.Optimizer, schedule,
                 generator: torch.Generator) -> None:
    """Restore ``state`` into ``train()``'s freshly built objects (ValueError when it does not
    fit them: another architecture, optimizer or schedule)."""
    check_state(state)
    try:
        model.load_state_dict(state["model"])
    except (RuntimeError, TypeError, AttributeError) as err:
        raise ValueError(f"weights of another model ({str(err).splitlines()[0][:200]})") from None
    load_optimizer_state(model, optimizer, state["optimizer"])
    try:
        schedule.load_state_dict(state["schedule"])
        generator.set_state(state["generator"])
    except (RuntimeError, TypeError, KeyError, AttributeError) as err:
        raise ValueError(f"schedule or generator state does not fit ({type(err).__name__})") \
            from None
