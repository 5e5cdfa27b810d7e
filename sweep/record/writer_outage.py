"""The writer's outage rule: when the store refuses a write, when to try it again (the project's
``Backoff``, 0.2 s doubling to 5 s here), when the points go to the spool instead, and the lines
a person reads when an outage starts and ends. No clock of its own: every call gets ``now``.

A store that is away or busy (``store_errors``: transient) is waited for ``spool_after_s``
seconds before the points spool. A store that refuses the credentials (HTTP 401/403) will not
take anything until a person fixes them: the points spool at once, one line says so and names
the fix, and the store is still tried on the backoff (a proxy's 401 during a redeploy passes;
the first accepted write ends the episode)."""

from __future__ import annotations

from typing import Callable

from sweep.base.backoff import Backoff
from sweep.base.text import first_line
from sweep.record.store_errors import CREDENTIALS_FIX, is_credentials

# Shorter than the loop's 0.5 -> 10 s: a refused metric write is retried within a flush or two
# (a lock held for a moment), and an outage is still tried every 5 s.
FIRST_BACKOFF_S, MAX_BACKOFF_S = 0.2, 5.0
REPLAY_HINT = "the next sweep launch or `sweep status --repair` replays them"


class Outage:
    """The store's refusals, one episode at a time: ``refused(err, now)`` says whether the
    points go to the spool now (the store has refused for ``spool_after_s`` seconds),
    ``accepted()`` ends the episode. ``next_try``: no write before this ``now``. ``folder``
    names the spool in the lines ``warn`` hears."""

    def __init__(self, spool_after_s: float, warn: Callable[[str], None], folder):
        self.spool_after_s, self.warn, self.folder = spool_after_s, warn, folder
        self.backoff = Backoff(FIRST_BACKOFF_S, MAX_BACKOFF_S)
        self.failing_since: float | None = None  # when the store began refusing
        self.next_try = 0.0
        self.credentials = False  # the last refusal was of the credentials (HTTP 401/403)
        self._credentials_told = False  # one line per episode

    @property
    def refusing(self) -> bool:
        """Whether the store refused the last write (an episode under way)."""
        return self.failing_since is not None

    def refused(self, err: BaseException, now: float) -> bool:
        """The store refused a write at ``now``: back off; True when the points go to the
        spool (the store has refused for ``spool_after_s`` seconds, or refused the
        credentials)."""
        self.credentials = is_credentials(err)
        if self.failing_since is None:
            self.failing_since = now
            self.backoff.reset()
            if not self.credentials:
                self.warn(f"MLflow store refused a write ({first_line(err)}); retrying, and "
                          f"spooling to {self.folder} if it still refuses after "
                          f"{self.spool_after_s:g} s")
        if self.credentials and not self._credentials_told:
            self._credentials_told = True
            self.warn(f"MLflow store refused this process's credentials ({first_line(err)}): "
                      f"its writes stop and every point and run end goes to {self.folder}, "
                      f"kept there (the store is tried again every {MAX_BACKOFF_S:g} s at most); "
                      f"{CREDENTIALS_FIX}, then `sweep status --repair` replays them")
        self.next_try = now + self.backoff.next_wait()
        return self.credentials or now - self.failing_since >= self.spool_after_s

    def accepted(self, spooled: int) -> None:
        """The store took a write: the episode (if any) ends, with one line saying where the
        ``spooled`` points of this process wait."""
        if self.failing_since is not None:
            self.warn("MLflow store takes writes again"
                      + (f"; {spooled} point(s) spooled to {self.folder} are replayed "
                         f"by the next sweep launch or `sweep status --repair`"
                         if spooled else ""))
        self.failing_since, self.next_try = None, 0.0
        self.credentials = self._credentials_told = False
        self.backoff.reset()

    def after_error(self, now: float) -> None:
        """A bug in a step (not a refusal): try again after the longest backoff."""
        self.next_try = now + MAX_BACKOFF_S
