"""The writer's units of work and the handles a caller waits on (as MLflow's
``async_logging/run_batch.py``): a run's end, and a drain mark.

Points themselves travel as ``(run_id, [(key, value, timestamp ms, step), ...])`` tuples: the
training thread's cheapest append."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field


@dataclass
class RunEnd:
    """A run's last write: tags, then its status. ``done`` is set once stored or spooled
    (``spooled`` then says which), or set aside."""

    run_id: str
    status: str
    tags: dict[str, str]
    end_time: int  # ms since the epoch, when the trial ended (not when the write went out)
    done: threading.Event = field(default_factory=threading.Event)
    spooled: bool = False


@dataclass
class Drain:
    """A mark in the queue: ``done`` is set once everything queued before it is stored or
    spooled."""

    done: threading.Event = field(default_factory=threading.Event)


def end_record(end: RunEnd) -> dict:
    """A run's end as a spool line (``spool`` describes the format)."""
    return {"run": end.run_id, "end": end.status, "end_time": end.end_time, "tags": end.tags}


def points_record(run_id: str, points: list) -> dict:
    """A run's points as a spool line."""
    return {"run": run_id, "metrics": points}
