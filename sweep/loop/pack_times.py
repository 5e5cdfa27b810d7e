"""Where a fused pack's wall time went: the parts of ``PackStats.time`` split into what the
sampler/storage and MLflow took, the table a launch prints, and the parent-run metrics
``pack_seconds_<part>``."""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # only a type here: the tables need no torch
    from sweep.training.fused import PackStats


#: The rows of ``time_table``: PackStats.time parts, in order, with what they hold.
TIME_PARTS = {
    "steps": "training steps",
    "evaluation": "evaluation (one fused pass per split)",
    "compile": "torch.compile",
    "capture": "CUDA graph capture",
    "listeners": "slot listeners (metrics, pruning, divergence)",
    "checkpoint": "checkpoints: copies off the device (training thread)",
    "ask": "sampler + storage: ask",
    "start_trial": "starting trials (storage attributes, MLflow runs)",
    "tell": "storage: tell",
    "ends": "ending trials (runs queued to end)",
    "fill": "filling seats (weights, state)",
    "other": "other",
}


def split_time(stats: PackStats, spent: dict) -> None:
    """PackStats.time counts the asking and starting of jobs in "start" and "refill", the
    ending in "ends"; split off what went to the sampler/storage and to MLflow."""
    time_ = stats.time
    filled = time_.pop("start", 0.0) + time_.pop("refill", 0.0)
    time_["ask"], time_["start_trial"] = spent["ask"], spent["start_trial"]
    time_["fill"] = max(0.0, filled - spent["ask"] - spent["start_trial"])
    time_["tell"] = spent["tell"]
    time_["ends"] = max(0.0, time_.get("ends", 0.0) - spent["tell"])


def time_table(packs: list) -> str:
    """Where the packs' wall time went: one row per part, seconds and share, one column per
    pack (``PackStats``; None for a pack that failed is skipped)."""
    packs = [p for p in packs if p is not None and p.seconds > 0]
    if not packs:
        return ""
    head = "where the time went".ljust(58) + "".join(
        f"  pack {i + 1} (K={p.capacity}, {p.jobs} trials)".rjust(26) for i, p in enumerate(packs))
    lines = [head]
    extra = sorted({k for p in packs for k in p.time} - set(TIME_PARTS))
    parts = list(TIME_PARTS)
    at = parts.index("listeners") + 1
    parts[at:at] = [k for k in extra if k.startswith("listener ")]
    parts += [k for k in extra if not k.startswith("listener ")]
    for part in parts:
        if not any(p.time.get(part) for p in packs):
            continue
        cells = "".join(f"{p.time.get(part, 0.0):10.1f} s {100 * p.time.get(part, 0.0) / p.seconds:5.1f}%"
                        .rjust(26) for p in packs)
        lines.append(f"  {_label(part)}".ljust(58) + cells)
    lines.append("  total".ljust(58) + "".join(f"{p.seconds:10.1f} s".rjust(26) for p in packs))
    if any(p.checkpoint_write_seconds for p in packs):  # on its own thread: not in the total
        lines.append("  checkpoints: writer thread (files, notes; not in the total)".ljust(58)
                     + "".join(f"{p.checkpoint_write_seconds:10.1f} s".rjust(26) for p in packs))
    for i, p in enumerate(packs):
        if p.epoch_seconds:
            lines.append(f"  pack {i + 1}: {_epochs(p.epoch_seconds)}")
        if p.recompiles or p.graph_breaks:  # its steps' share holds their time (dynamo's counts)
            lines.append(f"  pack {i + 1}: {p.recompiles} recompiles and {p.graph_breaks} graph "
                         f"breaks after its compilation (torch.compile; "
                         f"TORCH_LOGS=recompiles,graph_breaks says why)")
    return "\n".join(lines)


def _epochs(seconds: list[float]) -> str:
    """Pack epoch wall times in tenths: the first and the last, and the slowest: a pack whose
    later epochs slow down shows it here."""
    slowest = max(range(len(seconds)), key=seconds.__getitem__)
    n = min(5, len(seconds))
    return (f"{len(seconds)} epochs, first {n} " + " ".join(f"{s:.1f}" for s in seconds[:n])
            + f" s, last {n} " + " ".join(f"{s:.1f}" for s in seconds[-n:])
            + f" s, slowest {seconds[slowest]:.1f} s (epoch {slowest})")


def _label(part: str) -> str:
    if part.startswith("listener "):  # a share of "listeners": one listener type's calls
        return f"    of which {part.removeprefix('listener ')}"
    return TIME_PARTS.get(part, part)


def pack_time_metrics(packs: list) -> dict[str, float]:
    """The packs' time parts summed, as parent-run metrics ``pack_seconds_<part>``; with
    ``pack_seconds_checkpoint`` (the training thread's copies) and
    ``pack_seconds_checkpoint_writer`` (the writer thread's seconds, not a part of the total)."""
    total: dict[str, float] = {}
    for p in packs:
        if p is None:
            continue
        for part, seconds in [*p.time.items(), ("total", p.seconds),
                              ("checkpoint_writer", p.checkpoint_write_seconds)]:
            key = "pack_seconds_" + part.replace(" ", "_")
            total[key] = total.get(key, 0.0) + seconds
    return total


def log_pack_times(tracker, run_id: str | None, packs: list) -> None:
    """``pack_time_metrics`` on the study's parent run (best effort: a warning if it fails)."""
    metrics = pack_time_metrics(packs)
    if not metrics or run_id is None:
        return
    try:
        tracker.log_metrics(run_id, metrics)
    except Exception as err:
        print(f"warning: pack times not logged on parent run {run_id}: {type(err).__name__}",
              file=sys.stderr)
