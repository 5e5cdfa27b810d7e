"""Trial heartbeats in the Optuna storage: the thread that beats for the trials a worker
trains, and the reading of Optuna's heartbeat table that ``sweep status`` shows (RDB storages
only; the journal storage keeps no heartbeats)."""

from __future__ import annotations

import threading

import optuna
from optuna.storages._heartbeat import is_heartbeat_enabled
from optuna.trial import TrialState


def keeps_heartbeats(storage) -> bool:
    """Whether ``storage`` records heartbeats (an RDB storage with a heartbeat interval)."""
    return is_heartbeat_enabled(storage)


class Heartbeat:
    """Records the heartbeats of the trials this worker is training (one, or the live slots of a
    fused pack: ``add``/``discard``) so a dead worker's trials are failed after the grace period
    (RDB storages only; the journal storage has no heartbeat)."""

    def __init__(self, storage, *trial_ids: int):
        self._storage, self._trial_ids = storage, set(trial_ids)
        self._lock = threading.Lock()
        self._stop = threading.Event()
        interval = storage.get_heartbeat_interval() if hasattr(storage, "get_heartbeat_interval") else None
        self._thread = None
        self._interval = interval
        if interval:
            self._thread = threading.Thread(target=self._beat, daemon=True, name="heartbeat")
            self._thread.start()

    def add(self, trial_id: int) -> None:
        """Beat for ``trial_id`` from now on, its first beat at once (on the caller's thread):
        Optuna's stale check skips a RUNNING trial without a heartbeat row, so a worker killed
        before the thread's next beat would leave it RUNNING for good."""
        with self._lock:
            self._trial_ids.add(trial_id)
        if self._interval:
            self._record(trial_id)

    def discard(self, trial_id: int) -> None:
        with self._lock:
            self._trial_ids.discard(trial_id)

    def _beat(self):
        while True:
            with self._lock:
                ids = list(self._trial_ids)
            for trial_id in ids:
                self._record(trial_id)
            if self._stop.wait(self._interval):
                return

    def _record(self, trial_id: int) -> None:
        try:
            self._storage.record_heartbeat(trial_id)
        except Exception:
            pass  # a missed beat is harmless; a dead storage shows up at tell()

    def stop(self):
        self._stop.set()
        if self._thread is not None:
            self._thread.join()


def heartbeat_ages(study: optuna.Study) -> dict[int, float]:
    """Seconds since the last heartbeat of each RUNNING trial, by trial id (RDB storages only)."""
    storage = study._storage
    if not isinstance(storage, optuna.storages.RDBStorage):
        return {}
    import sqlalchemy
    from optuna.storages._rdb import models

    session = storage.scoped_session()
    try:
        now = session.execute(sqlalchemy.func.now()).scalar().replace(tzinfo=None)
        rows = (session.query(models.TrialHeartbeatModel.trial_id, models.TrialHeartbeatModel.heartbeat)
                .join(models.TrialModel, models.TrialModel.trial_id == models.TrialHeartbeatModel.trial_id)
                .filter(models.TrialModel.study_id == study._study_id)
                .filter(models.TrialModel.state == TrialState.RUNNING).all())
        return {tid: (now - beat.replace(tzinfo=None)).total_seconds() for tid, beat in rows}
    finally:
        session.close()


def grace_period(study: optuna.Study) -> float | None:
    """The storage's heartbeat grace period in seconds (None: it keeps no heartbeats)."""
    grace = getattr(study._storage, "grace_period", None)
    return float(grace) if grace else None
