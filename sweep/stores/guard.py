"""The one guard between the study loop and its Optuna storage: a storage that goes away (a
server restarted or failed over, a SQLite file another process holds locked past the busy
timeout) is waited for, never a crash.

Every call the loop makes to the storage (ask, suggest, report, should_prune, attributes, tell,
heartbeats, enqueue, the trial lists) goes through ``StorageGuard.call``, because the storage
itself is guarded: ``Guarded`` is mixed into the RDB storages ``storage.open_storage`` returns,
so Optuna's ``Study`` and its ``_CachedStorage`` reach the database only through it.

* Transient errors (``is_transient``: connection refused or reset, a server shutting down or
  starting, "database is locked", a pool timeout, a read-only transaction during a failover, a
  deadlock) are retried with the project's one backoff, once the guard ``watch``-es the worker's
  stop. When a stop comes, a call that was waiting raises the stop (the worker's own exception)
  instead of the store's error; a call made during the stop retries until its deadline.
  Unwatched (``sweep status`` and the other commands) a transient error is one line at once.
* Permanent store errors (a schema the code does not know, a refused login) are one line
  (``StorageError``); Optuna's own errors (a finished trial, a missing study) pass unchanged.
* One line when an outage starts and one when it ends, with its length (never one per retry).
* A retried write applies once: a trial is created with a claim token, looked for before it is
  created again; a state change whose reply was lost finds the trial in the state it asked for.
* No worker judges other workers' heartbeats right after an outage: within a grace period of
  the storage coming back (as this process saw it, or as PostgreSQL's own start time says) no
  trial is stale, so heartbeats are judged only once everyone could beat again.
"""

from __future__ import annotations

import copy
import json
import sys
import threading
import time
import uuid
from datetime import datetime
from typing import Callable

import optuna
from optuna.trial import FrozenTrial, TrialState

from sweep.base.backoff import Backoff
from sweep.base.text import first_line
from sweep.errors import StorageError

CLAIM = "sweep:claim"  # system attribute: the token a new trial was created with
# SQLSTATE classes and codes that pass: connection exceptions (08), insufficient resources (53:
# too many clients), operator intervention (57P01 admin shutdown ... 57P03 cannot connect now),
# serialization failure and deadlock (40001, 40P01), a read-only transaction (25006: a standby
# promoted in a failover, or the primary read-only meanwhile).
_TRANSIENT_STATES = ("08", "53", "57P", "40001", "40P01", "25006")
_TRANSIENT_WORDS = ("database is locked", "database table is locked", "connection refused",
                    "connection reset", "server closed the connection", "terminating connection",
                    "the database system is", "could not connect", "connection timed out",
                    "connection is closed", "connection is lost", "broken pipe",
                    "read-only transaction", "no connection to the server", "consuming input",
                    "ssl syscall", "too many clients", "gone away", "lost connection")
_SQLITE_TRANSIENT_WORDS = ("database is locked", "database table is locked", "database is busy",
                           "unable to open database file", "disk i/o error")
_PERMANENT_WORDS = ("authentication failed", "no pg_hba.conf entry", "does not exist",
                    "permission denied", "no such table", "no such column", "syntax error",
                    "readonly database")


def _chain(err: BaseException):
    """``err``, its causes and contexts, and the driver's error behind SQLAlchemy's wrappers."""
    seen = []
    while err is not None and all(err is not e for e in seen) and len(seen) < 12:
        seen.append(err)
        orig = getattr(err, "orig", None)
        if isinstance(orig, BaseException) and all(orig is not e for e in seen):
            seen.append(orig)
        err = err.__cause__ or err.__context__
    return seen


def _sqlstate(err: BaseException) -> str:
    return str(getattr(err, "sqlstate", None) or getattr(err, "pgcode", None) or "")


def is_store_error(err: BaseException) -> bool:
    """Whether ``err`` comes from the database (Optuna's wrapper or SQLAlchemy's), not Optuna's
    own rules."""
    import sqlalchemy.exc

    return isinstance(err, (optuna.exceptions.StorageInternalError, sqlalchemy.exc.SQLAlchemyError))


def is_transient(err: BaseException) -> bool:
    """Whether the storage refused for a reason that passes (see the module docstring)."""
    import sqlalchemy.exc

    chain = _chain(err)
    text = " ".join(str(e) for e in chain).lower()
    if any(word in text for word in _PERMANENT_WORDS):
        return False
    if any(type(e).__module__.startswith("sqlite3") for e in chain):
        # SQLite's OperationalError also means a bad statement or value (malformed JSON, a
        # trigger's RAISE, a full disk); only a lock or a file that did not open passes
        return any(word in text for word in _SQLITE_TRANSIENT_WORDS)
    for e in chain:
        if isinstance(e, (sqlalchemy.exc.TimeoutError, sqlalchemy.exc.DisconnectionError,
                          sqlalchemy.exc.OperationalError, sqlalchemy.exc.InterfaceError,
                          ConnectionError, TimeoutError)):
            return True
        if type(e).__name__ in ("OperationalError", "InterfaceError"):  # the driver's own
            return True
        if _sqlstate(e).startswith(_TRANSIENT_STATES):
            return True
    return is_store_error(err) and any(word in text for word in _TRANSIENT_WORDS)


def _say(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


class StorageGuard:
    """Retries the calls of one storage while it is away (``call``), says when an outage starts
    and ends, and remembers when it last came back (``back_within``). Shared by the threads of
    a worker (training, heartbeat, checkpoint writer)."""

    def __init__(self, label: str, log: Callable[[str], None] = _say):
        self.label, self._log = label, log  # label: the storage's URL, credentials masked
        self._lock = threading.Lock()
        self._away_since: float | None = None  # time.monotonic() of the first refusal
        self._back_at: float | None = None  # time.monotonic() when the last outage ended
        self._stop = None
        self._interrupt: Callable[[], None] | None = None
        self._loop_thread: threading.Thread | None = None

    def watch(self, stop, interrupt: Callable[[], None]) -> None:
        """Wait for the storage from now on, bounded by ``stop`` (a ``stopping.BoundedStop``:
        its ``deadline``); ``interrupt()`` raises the stop on the calling (the loop's) thread."""
        self._stop, self._interrupt = stop, interrupt
        self._loop_thread = threading.current_thread()

    def call(self, what: str, fn: Callable, *args, once: bool = False, **kwargs):
        """``fn(*args, **kwargs)``, retried while the storage refuses it for a transient reason.
        ``what`` names the call in the outage line; ``once``: no retry (a heartbeat: the next
        beat is its retry), the outage is still noted."""
        in_stop = self._stop is not None and self._stop.deadline is not None
        backoff = Backoff()
        while True:
            try:
                result = fn(*args, **kwargs)
            except Exception as err:
                if not is_transient(err):
                    if is_store_error(err):
                        raise StorageError(f"storage {self.label} refused to {what}: "
                                           f"{first_line(_chain(err)[-1])}; check the server, "
                                           f"its schema and the URL") from err
                    raise
                self._went_away(what, err)
                if once:
                    raise
                if self._stop is None:
                    raise StorageError(f"storage {self.label} is away ({first_line(_chain(err)[-1])}) "
                                       f"at {what}; try again once it is back") from err
                self._wait(backoff.next_wait(), in_stop, what, err)
                continue
            self._came_back()
            return result

    def back_within(self, seconds: float) -> bool:
        """Whether the storage came back from an outage less than ``seconds`` ago (or is away)."""
        with self._lock:
            if self._away_since is not None:
                return True
            return self._back_at is not None and time.monotonic() - self._back_at < seconds

    def _wait(self, seconds: float, in_stop: bool, what: str, err: Exception) -> None:
        """Sleep ``seconds``; a stop that comes meanwhile raises on the loop's thread, and no
        wait goes past the stop's deadline."""
        until = time.monotonic() + seconds
        while True:
            deadline = self._stop.deadline
            if deadline is not None:
                mine = threading.current_thread() is self._loop_thread
                if mine and (not in_stop or time.monotonic() + 0.2 >= deadline):
                    self._interrupt()  # raises the stop, not the store's error
                if time.monotonic() + 0.2 >= deadline:
                    raise StorageError(f"storage {self.label} still away at the stop's deadline "
                                       f"({what}): the next launch retries the trial(s)") from err
            left = until - time.monotonic()
            if left <= 0:
                return
            time.sleep(min(0.2, left))

    def _went_away(self, what: str, err: Exception) -> None:
        with self._lock:
            if self._away_since is not None:
                return
            self._away_since = time.monotonic()
        self._log(f"Optuna storage {self.label} is away ({first_line(_chain(err)[-1])}) at {what}: "
                  f"waiting for it; trials pause at their next storage call")

    def _came_back(self) -> None:
        if self._away_since is None:  # the common case, without the lock
            return
        with self._lock:
            since, self._away_since = self._away_since, None
            if since is None:
                return
            self._back_at = time.monotonic()
        self._log(f"Optuna storage {self.label} is back after {self._back_at - since:.1f} s")


class Guarded:
    """Mixed into an ``optuna.storages.RDBStorage`` (before it in the bases): every method that
    reads or writes the database goes through ``self.guard`` (``StorageGuard``); the writes that
    a retry could apply twice are made to apply once (see the module docstring)."""

    def __init__(self, *args, guard: StorageGuard, **kwargs):
        self.guard = guard
        super().__init__(*args, **kwargs)

    def _call(self, what: str, fn: Callable, *args, **kwargs):
        return self.guard.call(what, fn, *args, **kwargs)

    # --- reads, and writes that are idempotent (an upsert, an insert that ignores a duplicate) -
    def get_study_id_from_name(self, *a):
        return self._call("read the study", super().get_study_id_from_name, *a)

    def get_study_name_from_id(self, *a):
        return self._call("read the study", super().get_study_name_from_id, *a)

    def get_study_directions(self, *a):
        return self._call("read the study", super().get_study_directions, *a)

    def get_study_user_attrs(self, *a):
        return self._call("read the study", super().get_study_user_attrs, *a)

    def get_study_system_attrs(self, *a):
        return self._call("read the study", super().get_study_system_attrs, *a)

    def get_all_studies(self, *a):
        return self._call("list the studies", super().get_all_studies, *a)

    def create_new_study(self, *a, **kw):  # a lost reply: the retry's DuplicatedStudyError
        return self._call("create the study", super().create_new_study, *a, **kw)

    def set_study_user_attr(self, *a):
        return self._call("write a study attribute", super().set_study_user_attr, *a)

    def set_study_system_attr(self, *a):
        return self._call("write a study attribute", super().set_study_system_attr, *a)

    def get_trial(self, *a):
        return self._call("read a trial", super().get_trial, *a)

    def get_trial_user_attrs(self, *a):
        return self._call("read a trial", super().get_trial_user_attrs, *a)

    def get_trial_system_attrs(self, *a):
        return self._call("read a trial", super().get_trial_system_attrs, *a)

    def get_trial_param(self, *a):
        return self._call("read a trial", super().get_trial_param, *a)

    def get_trial_id_from_study_id_trial_number(self, *a):
        return self._call("read a trial", super().get_trial_id_from_study_id_trial_number, *a)

    def _get_trials(self, *a, **kw):  # get_all_trials and _CachedStorage's reads
        return self._call("read the trials", super()._get_trials, *a, **kw)

    def _get_best_trial_id(self, *a):
        return self._call("read the best trial", super()._get_best_trial_id, *a)

    def _set_trial_param(self, *a):  # set_trial_param and _CachedStorage's
        return self._call("write a parameter (suggest)", super()._set_trial_param, *a)

    def set_trial_intermediate_value(self, *a):
        return self._call("report a value", super().set_trial_intermediate_value, *a)

    def set_trial_user_attr(self, *a, **kw):
        return self._call("write a trial attribute", super().set_trial_user_attr, *a, **kw)

    def set_trial_system_attr(self, *a, **kw):
        return self._call("write a trial attribute", super().set_trial_system_attr, *a, **kw)

    def record_heartbeat(self, trial_id: int) -> None:
        self.guard.call("beat a heartbeat", super().record_heartbeat, trial_id, once=True)

    # --- the writes a blind retry could apply twice ----------------------------------------
    def _create_new_trial(self, study_id: int, template_trial: FrozenTrial | None = None):
        """A new trial (``Study.ask``, ``Study.add_trial``/enqueue), created once: it carries a
        claim token; a retry first looks for a trial with that token (the previous try's commit
        may have landed with its reply lost). One transaction per try, no retry of Optuna's own:
        every retry is the guard's."""
        token = uuid.uuid4().hex
        if template_trial is None:
            template_trial = FrozenTrial(
                number=-1, state=TrialState.RUNNING, value=None, values=None,
                datetime_start=datetime.now(), datetime_complete=None, params={},
                distributions={}, user_attrs={}, system_attrs={}, intermediate_values={},
                trial_id=-1)
        template = copy.deepcopy(template_trial)
        template.system_attrs[CLAIM] = token
        tries = 0

        def create() -> FrozenTrial:
            nonlocal tries
            tries += 1
            if tries > 1:
                found = self._claimed(study_id, token)
                if found is not None:
                    return found
            return self._insert_trial(study_id, template)

        return self._call("create a trial (ask or enqueue)", create)

    def _insert_trial(self, study_id: int, template: FrozenTrial) -> FrozenTrial:
        from optuna.storages._rdb import models
        from optuna.storages._rdb.storage import _create_scoped_session

        with _create_scoped_session(self.scoped_session) as session:
            # the study's row lock: trial numbers are counted, not drawn from a sequence
            models.StudyModel.find_or_raise_by_id(study_id, session, for_update=True)
            trial = self._get_prepared_new_trial(study_id, template, session)
            frozen = copy.deepcopy(template)
            frozen.number, frozen.datetime_start = trial.number, trial.datetime_start
            frozen._trial_id = trial.trial_id
        return frozen

    def _claimed(self, study_id: int, token: str) -> FrozenTrial | None:
        """The trial of ``study_id`` created with claim ``token``, if its commit landed."""
        from optuna.storages._rdb import models
        from optuna.storages._rdb.storage import _create_scoped_session

        with _create_scoped_session(self.scoped_session) as session:
            trial = (session.query(models.TrialModel)
                     .join(models.TrialSystemAttributeModel,
                           models.TrialSystemAttributeModel.trial_id == models.TrialModel.trial_id)
                     .filter(models.TrialModel.study_id == study_id,
                             models.TrialSystemAttributeModel.key == CLAIM,
                             models.TrialSystemAttributeModel.value_json == json.dumps(token))
                     .order_by(models.TrialModel.trial_id).first())
            return self._build_frozen_trial_from_trial_model(trial) if trial is not None else None

    def set_trial_state_values(self, trial_id: int, state: TrialState, values=None) -> bool:
        """Optuna's, retried. A retry that finds the trial already in ``state`` counts as done
        (the previous try's reply was lost). A retried pop (``RUNNING``) that finds the trial
        taken may have taken it itself: the trial gets a heartbeat row, so the stale check
        fails and retries it should no worker own it (a row its owner's beats overwrite)."""
        tries = 0

        def change() -> bool:
            nonlocal tries
            tries += 1
            try:
                return super(Guarded, self).set_trial_state_values(trial_id, state, values)
            except optuna.exceptions.UpdateFinishedTrialError:
                if tries > 1 and super(Guarded, self).get_trial(trial_id).state == state:
                    return True
                raise

        done = self._call(f"set a trial {state.name} (tell, pop or fail)", change)
        if not done and state == TrialState.RUNNING and tries > 1 \
                and self.get_heartbeat_interval():
            self._call("beat a heartbeat", super().record_heartbeat, trial_id)
        return done

    def _get_stale_trial_ids(self, study_id: int) -> list[int]:
        """Optuna's stale trials, none while heartbeats cannot be judged yet: within a grace
        period of the storage coming back (this process's outage, or the server's restart)."""
        stale = self._call("check heartbeats", super()._get_stale_trial_ids, study_id)
        if not stale:
            return stale
        grace = self.grace_period or 2 * self.heartbeat_interval
        if self.guard.back_within(grace) or self._server_up_for() < grace:
            return []
        return stale

    def _server_up_for(self) -> float:
        """Seconds since the database server started (PostgreSQL; infinite elsewhere)."""
        if self.engine.dialect.name != "postgresql":
            return float("inf")

        def ask() -> float:
            with self.engine.connect() as conn:
                return float(conn.exec_driver_sql(
                    "SELECT EXTRACT(EPOCH FROM now() - pg_postmaster_start_time())").scalar())

        return self._call("check heartbeats", ask)


def watch_stop(storage, stop, interrupt: Callable[[], None]) -> None:
    """Make the guard of ``storage`` (a study's, under Optuna's ``_CachedStorage``, or bare)
    wait for the storage, bounded by ``stop`` (``StorageGuard.watch``); a storage without a
    guard (the journal) is left alone."""
    guard = getattr(getattr(storage, "_backend", storage), "guard", None)
    if guard is not None:
        guard.watch(stop, interrupt)
