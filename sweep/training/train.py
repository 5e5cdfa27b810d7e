"""The training loop. It knows nothing of Optuna or MLflow.

It takes a ``TrialConfig``, the device-resident data splits and listeners. Listeners hear
about every optimizer step (in chunks of ``train.sync_every_steps``: the per-step losses stay
on the device until then, so CUDA is not synchronised every step) and about every epoch.
A listener stops training by raising ``StopTraining``; tracking and pruning are listeners.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Callable, Mapping, Protocol, Sequence

import torch
from torch import nn

from sweep.errors import DeviceError
from sweep.training.checkpoint import check_consistent, load_unfused, unfused_state
from sweep.training.compiling import or_fall_back
from sweep.training.data import Normalizer, Splits, train_batches
from sweep.training.graphs import restored
from sweep.training.host_copy import host_state
from sweep.training.models import build_model, memory_format
from sweep.study.schedules import LRSchedule
from sweep.study.space import TrialConfig


class StopTraining(Exception):
    """Raised by a listener to end training early (``reason``: "diverged", "pruner", ...)."""

    def __init__(self, reason: str, step: int, epoch: int, detail: dict | None = None):
        super().__init__(f"{reason} at step {step} (epoch {epoch})")
        self.reason, self.step, self.epoch, self.detail = reason, step, epoch, detail or {}


class Listener(Protocol):
    def on_steps(self, first_step: int, lrs: Sequence[float], losses: Sequence[float]) -> None:
        """Steps ``first_step ..`` ran with these LRs and produced these (maybe NaN) losses."""

    def on_epoch_end(self, epoch: int, metrics: dict) -> None:
        """Epoch ``epoch`` ended; ``metrics`` has val_loss, val_acc, lr_reduced, epoch_seconds."""


@dataclass
class TrainResult:
    history: list[dict] = field(default_factory=list)  # one metrics dict per finished epoch
    test_acc: float | None = None
    steps: int = 0
    compile_seconds: float = 0.0


def resolve_device(name: str) -> torch.device:
    """``auto`` -> CUDA when available, else CPU. Raises DeviceError (a one-line
    user error) for a device that does not exist here."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise DeviceError(f"--device {name}: use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise DeviceError(f"--device {name}: CUDA is not available on this machine; use "
                             f"--device cpu or auto")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise DeviceError(f"--device {name}: only {torch.cuda.device_count()} CUDA device(s)")
    elif device.type != "cpu":
        raise DeviceError(f"--device {name}: use auto, cpu, cuda or cuda:N")
    return device


def build_optimizer(model: nn.Module, cfg: TrialConfig) -> torch.optim.Optimizer:
    t = cfg.train
    # No weight decay on BatchNorm and bias parameters; both groups start at base_lr.
    decay = [p for p in model.parameters() if p.ndim > 1]
    no_decay = [p for p in model.parameters() if p.ndim <= 1]
    groups = [{"params": decay, "weight_decay": t.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    if t.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=cfg.base_lr, betas=(t.beta1, t.beta2))
    return torch.optim.SGD(groups, lr=cfg.base_lr, momentum=t.momentum,
                           nesterov=t.nesterov and t.momentum > 0)


def full_precision(logits: torch.Tensor) -> torch.Tensor:
    """Logits for the loss: bf16 (autocast) as fp32; fp32 and float64 as they are, so a run in
    float64 (the equivalence tests, ``torch.set_default_dtype``) stays float64 throughout."""
    return logits if logits.dtype in (torch.float32, torch.float64) else logits.float()


@torch.no_grad()
def evaluate(model: nn.Module, x_u8: torch.Tensor, y: torch.Tensor, normalize: Normalizer,
             batch_size: int, autocast) -> tuple[float, float]:
    """(mean cross-entropy, accuracy) over a whole split, without augmentation; one sync."""
    model.eval()
    loss_sum = torch.zeros((), device=y.device)
    correct = torch.zeros((), device=y.device, dtype=torch.long)
    for start in range(0, y.shape[0], batch_size):
        xb, yb = normalize(x_u8[start: start + batch_size]), y[start: start + batch_size]
        with autocast():
            logits = model(xb)
        loss_sum += nn.functional.cross_entropy(full_precision(logits), yb, reduction="sum")
        correct += (logits.argmax(1) == yb).sum()
    model.train()
    n = y.shape[0]
    return loss_sum.item() / n, correct.item() / n


def compiles(setting: bool | str, device: torch.device) -> bool:
    """``train.compile`` for ``device``: true, false, or "auto" = on CUDA only (the CPU
    compiles for minutes and the compiled step was no faster there: docs/packs.md)."""
    return setting is True or (setting == "auto" and device.type == "cuda")


def _autocast_for(device: torch.device, bf16: bool):
    if device.type == "cuda" and bf16:
        return lambda: torch.autocast("cuda", dtype=torch.bfloat16)
    return lambda: torch.autocast(device.type, enabled=False)


def trial_precision(t, device: torch.device) -> str:
    """The precision a trial trains in: ``bf16`` (autocast) on CUDA when ``train.bf16`` says
    so, else ``fp32``; the study's, never the pack's (``train()`` and every fused pack)."""
    return "bf16" if device.type == "cuda" and t.bf16 else "fp32"


def check_resumable(state: Mapping, cfg: TrialConfig, steps_per_epoch: int,
                    device: torch.device) -> None:
    """Raise ValueError (one line) unless ``train(cfg, resume=state)`` (or a pack's slot) can
    continue from ``state``: its counts agree (``check_consistent``) and it restores into
    freshly built objects of ``cfg`` (weights, optimizer, schedule, generator; on the CPU but
    the generator). Called before a resumed trial's earlier steps are replayed into its
    listeners, so a file that does not fit costs a restart from step 0, never a trial. A state
    trained in another precision than the trial's (``trial_precision``) does not fit: going on
    in it would give the trial numerics its configuration does not ask for."""
    check_consistent(state, steps_per_epoch, cfg.train.epochs)
    t = cfg.train
    saved, wanted = state.get("precision", "fp32"), trial_precision(t, device)
    if saved != wanted:
        raise ValueError(f"its steps ran in {saved}, and the study trains in {wanted} on "
                         f"{device.type} (train.bf16: {str(t.bf16).lower()})")
    model = build_model(t.model, t.width, cfg.data.num_classes, t.model_args)
    schedule = LRSchedule(cfg.schedule, steps_per_epoch, cfg.train.epochs)
    load_unfused(state, model, build_optimizer(model, cfg), schedule,
                 torch.Generator(device=device))


def train(cfg: TrialConfig, splits: Splits, device: torch.device,
          listeners: Sequence[Listener] = (),
          checkpoint: Callable[[Callable[[], dict]], None] | None = None,
          resume: Mapping | None = None) -> TrainResult:
    """Train one trial. With ``checkpoint``, it is called at every epoch end, before the
    listeners hear of the epoch (a stop there keeps it), with a function that returns the
    training state (``sweep.training.checkpoint``) from a host copy taken then: training goes on
    at once, and the function may be called later, on another thread (``host_copy``). With
    ``resume`` (such a state), training continues after its last epoch with the same weights,
    optimizer state, batches and LR sequence as if never stopped; the listeners hear only the
    epochs trained here (the caller replays the earlier ones if it wants them)."""
    t = cfg.train
    torch.manual_seed(cfg.seed)
    generator = torch.Generator(device=device).manual_seed(cfg.seed)
    layout = memory_format(t.channels_last)
    model = build_model(t.model, t.width, splits.num_classes, t.model_args).to(
        device, memory_format=layout)
    optimizer = build_optimizer(model, cfg)
    base_lrs = [cfg.base_lr for _ in optimizer.param_groups]
    steps_per_epoch = splits.train_y.shape[0] // t.batch_size
    schedule = LRSchedule(cfg.schedule, steps_per_epoch, t.epochs)
    normalize = Normalizer(device, layout == torch.channels_last, splits.dataset)
    autocast = _autocast_for(device, t.bf16)
    criterion = nn.CrossEntropyLoss(label_smoothing=t.label_smoothing)
    if device.type == "cuda":
        # autotuning picks kernels by timing: not under deterministic algorithms (tests)
        torch.backends.cudnn.benchmark = not torch.are_deterministic_algorithms_enabled()
    result, start_epoch = TrainResult(), 0
    if resume is not None:
        load_unfused(resume, model, optimizer, schedule, generator)
        start_epoch, result.history = resume["epochs"], list(resume["history"])
        result.steps = resume["steps"]
    step_fn = model
    if compiles(t.compile, device):
        began = time.perf_counter()
        x = normalize(splits.train_x[: t.batch_size])
        compiled = or_fall_back(lambda: _compiled(model, x, autocast),  # must not fail the trial
                                "torch.compile of the model", "this trial trains eagerly")
        if compiled is not None:
            step_fn, result.compile_seconds = compiled, time.perf_counter() - began

    sync_every = t.sync_every_steps
    losses = torch.zeros(sync_every, device=device)
    for epoch in range(start_epoch, t.epochs):
        began = time.perf_counter()
        pending: list[float] = []
        first = epoch * steps_per_epoch
        for i, (x, y) in enumerate(train_batches(splits, t.batch_size, generator, normalize)):
            step = epoch * steps_per_epoch + i
            # A Python float written every step: only the model is compiled (never
            # optimizer.step), so a new LR causes no recompilation and no device sync.
            for group, base in zip(optimizer.param_groups, base_lrs):
                group["lr"] = schedule.lr_at(step, base)
            with autocast():
                loss = criterion(step_fn(x), y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            losses[len(pending)] = loss.detach()
            pending.append(optimizer.param_groups[0]["lr"])
            if len(pending) == sync_every or i == steps_per_epoch - 1:
                host = losses[: len(pending)].tolist()  # the one host sync per chunk
                for listener in listeners:
                    listener.on_steps(first, pending, host)
                first, pending = step + 1, []
        val_loss, val_acc = evaluate(model, splits.val_x, splits.val_y, normalize,
                                     t.eval_batch_size, autocast)
        metrics = {"val_loss": val_loss, "val_acc": val_acc,
                   "epoch_seconds": time.perf_counter() - began}
        if math.isfinite(val_loss):
            metrics["lr_reduced"] = schedule.end_of_epoch(epoch, val_loss)
        result.history.append(metrics)
        result.steps = (epoch + 1) * steps_per_epoch
        if checkpoint is not None:  # before the listeners: a stop at this epoch's end keeps it
            state = host_state(unfused_state(
                model, optimizer, schedule, generator, epoch + 1, result.steps, result.history,
                trial_precision(t, device)))
            checkpoint(lambda state=state: state)
        for listener in listeners:
            listener.on_epoch_end(epoch, metrics)
    _, result.test_acc = evaluate(model, splits.test_x, splits.test_y, normalize,
                                  t.eval_batch_size, autocast)
    return result


def _compiled(model: nn.Module, x: torch.Tensor, autocast) -> nn.Module:
    """``torch.compile(model)``, run once forward and backward on ``x`` so the compilation
    happens here, outside the timed epochs; the model's state (BatchNorm running statistics)
    is restored afterwards, even when the compilation fails."""
    compiled = torch.compile(model)
    try:
        with restored([*model.parameters(), *model.buffers()]), autocast():
            compiled(x).float().sum().backward()
    finally:
        model.zero_grad(set_to_none=True)
    return compiled
