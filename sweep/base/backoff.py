"""The project's one backoff: how long to wait before asking a store that refused again."""

from __future__ import annotations

from dataclasses import dataclass

FIRST_WAIT_S, MAX_WAIT_S = 0.5, 10.0


@dataclass
class Backoff:
    """Exponential backoff, ``first_s`` doubling up to ``max_s``; ``reset()`` after a success.

    Pure state (no clock, no sleep): callers ask ``next_wait()`` and sleep or schedule it."""

    first_s: float = FIRST_WAIT_S
    max_s: float = MAX_WAIT_S
    _wait: float = 0.0

    def next_wait(self) -> float:
        """Seconds to wait before the next try: ``first_s``, then doubling up to ``max_s``."""
        self._wait = self.first_s if self._wait == 0.0 else min(self._wait * 2, self.max_s)
        return self._wait

    def reset(self) -> None:
        self._wait = 0.0

    @property
    def failing(self) -> bool:
        """True between a refusal and the next ``reset()``."""
        return self._wait > 0.0
