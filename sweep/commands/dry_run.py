"""``sweep launch --dry-run``: what a launch would do, checked as a launch checks it, and nothing
created (no Optuna store or table, no MLflow store, no checkpoint folder, no data download).

It prints the study with every default filled in, T (optimizer steps per trial: epochs x
steps per epoch, the length every schedule is defined over), the budget and what is left of it
(``budget``'s rule, read from the stored study when there is one), the fused pack size a
worker would use (``training.capacity.pack_capacity``) and the MLflow store the remaining trials would add.
"""

from __future__ import annotations

import dataclasses

import yaml

from sweep.loop import BUDGET, budget_used, chosen_budget
from sweep.stores import resolve_dir
from sweep.base.urls import mask_url
from sweep.loop import IDENTITY, differences, identity_of
from sweep.stores import peek_study
from sweep.record import BYTES_PER_POINT, check_tracking_uri, points_per_trial
from sweep.study.specs import CategoricalParam, Fixed, FloatParam, IntParam, StudySpec


def _param(p) -> object:
    if isinstance(p, Fixed):
        return p.value
    if isinstance(p, CategoricalParam):
        return {"type": "categorical", "choices": list(p.choices)}
    kind = "int" if isinstance(p, IntParam) else "float" if isinstance(p, FloatParam) else "?"
    return {"type": kind, **dataclasses.asdict(p)}


def resolved_study(spec: StudySpec, budget: int) -> dict:
    """The study as a launch runs it: every section with its defaults filled in."""
    def section(value):
        data = dataclasses.asdict(value)
        return {k: (dict(v) if isinstance(v, dict) else v) for k, v in data.items()}

    return {
        "name": spec.name, "description": spec.description, "seed": spec.seed, "trials": budget,
        "objective": section(spec.objective), "sampler": section(spec.sampler),
        "pruner": section(spec.pruner), "divergence": section(spec.divergence),
        "data": section(spec.data), "train": section(spec.train),
        "space": {"warmup_steps": _param(spec.space.warmup_steps),
                  "base_lr": _param(spec.space.base_lr),
                  "scheduler": {name: {k: _param(p) for k, p in params.items()}
                                for name, params in spec.space.scheduler.items()}},
    }


def _size(n_bytes: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n_bytes < 1000 or unit == "GB":
            return f"{n_bytes:.0f} {unit}" if unit == "B" else f"{n_bytes:.1f} {unit}"
        n_bytes /= 1000
    return ""


def dry_run(spec: StudySpec, opts) -> str:
    """The dry run's text for ``spec`` launched with ``opts`` (``launch.LaunchOptions``).
    Raises what a launch raises for bad input (device, URLs, checkpoint folder)."""
    from sweep.training.capacity import pack_capacity, trains_as_pack
    from sweep.training.train import resolve_device

    device = resolve_device(opts.device)
    check_tracking_uri(opts.tracking_uri)
    checkpoints = resolve_dir(opts.checkpoint_dir, opts.storage)
    stored = peek_study(spec.name, opts.storage)
    stored_budget = stored.user_attrs.get(BUDGET) if stored is not None else None
    budget = chosen_budget(stored_budget, spec, opts.trials)
    used = budget_used(stored) if stored is not None else 0
    left = max(0, budget - used)
    capacity = pack_capacity(spec.train, device, max(left, 1))
    T, epochs = spec.total_steps, spec.train.epochs
    per_trial = points_per_trial(T, epochs)
    points = per_trial * left
    where = (f"resumes the stored study ({used} trial(s) used, stored budget "
             f"{stored_budget if stored_budget else 'none'})" if stored is not None
             else "creates the study")
    doc = yaml.safe_dump(resolved_study(spec, budget), sort_keys=False, default_flow_style=False)
    lines = [
        f"dry run: nothing created. Study {spec.name!r} from {spec.path}, as a launch would run it:",
        *("  " + line for line in doc.rstrip().splitlines()),
        f"T = {T} optimizer steps per trial ({epochs} epochs x {spec.steps_per_epoch} steps per "
        f"epoch: data.train_size {spec.data.train_size} // train.batch_size "
        f"{spec.train.batch_size})",
        f"storage {mask_url(opts.storage)}: {where}",
        f"budget: {budget} trials, {used} used, {left} left"
        + ("" if left else "; nothing to run: raise it with --trials N"),
        f"device {device}: fused pack size {capacity}"
        + (" (trials train as one grouped network)" if trains_as_pack(spec.train, device, capacity)
           else " (one trial at a time)"),
        f"MLflow {mask_url(opts.tracking_uri)}: the {left} trial(s) left add at most "
        f"{points:,} points ({per_trial:,} per trial trained to its end), about "
        f"{_size(points * BYTES_PER_POINT)} at ~{BYTES_PER_POINT} bytes per point",
        f"checkpoints: {checkpoints}",
    ]
    changed = differences(stored.user_attrs.get(IDENTITY) or {}, identity_of(spec)) \
        if stored is not None else []
    if changed:
        lines.append("settings: the stored study was created with " + ", ".join(
            f"{key}={old!r} (now {new!r})" for key, old, new in changed)
            + ": a launch refuses this; use another name (--set name=NEW) or pass "
              "--allow-config-change")
    return "\n".join(lines)
