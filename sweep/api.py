"""sweep from Python: launch a study, then read what its stores hold. The ``sweep`` command is a
thin shell over these functions (``sweep launch`` is ``launch``; ``status``, ``best``,
``export`` and ``report`` are ``load(...).status()`` ... ``.report()``).

    import sweep

    done = sweep.launch("smoke", trials=4, overrides={"train.epochs": 1})
    study = sweep.load("smoke")
    study.best(per="scheduler")   # the best trial of each scheduler type
    study.trials()                # a pandas DataFrame, one row per trial

Bad input raises the project's errors (``sweep.errors.SweepError`` and its subclasses: one
line naming the problem and the fix), before any store is written; nothing here exits the
process. Every URL defaults as on the command line: ``storage`` to ``SWEEP_STORAGE``, else
``sqlite:///sweep.db`` in the current folder; ``tracking_uri`` to ``MLFLOW_TRACKING_URI``,
else ``sqlite:///mlflow.db``; ``data_dir`` and ``checkpoint_dir`` to ``SWEEP_DATA_DIR`` and
``SWEEP_CHECKPOINT_DIR``.

Importing this module (or ``sweep``) loads neither torch nor optuna nor mlflow: each function
imports what it needs when called.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator, Mapping, Sequence

if TYPE_CHECKING:  # for the annotations only: importing them loads optuna, torch, pandas
    import optuna
    import pandas

    from sweep.commands.status import StatusFacts
    from sweep.loop import Cost
    from sweep.views.report import ReportResult

__all__ = ["launch", "plan", "load", "Launched", "Study"]


@dataclass(frozen=True)
class Launched:
    """What ``launch`` did. ``text`` is what ``sweep launch`` prints at the end (the best trial,
    the counts, where to look next); ``exit_code`` its exit status: 0, also when every trial
    failed (``study.status()`` says so); 1 when a worker of ``workers > 1`` failed; 128 + N when
    signal N stopped it (the running trials are retried by the next launch). ``cost``: the
    cost line's numbers (``sweep.loop.cost.Cost``), None when no trial trained long enough to
    be timed (or with several workers)."""

    study: "Study"
    text: str
    exit_code: int = 0
    cost: "Cost | None" = None


def launch(study: str | os.PathLike, *, trials: int | None = None,
           overrides: Mapping[str, Any] | Sequence[str] = (), seed: int | None = None,
           storage: str | None = None, tracking_uri: str | None = None,
           data_dir: str | os.PathLike | None = None, device: str = "auto",
           checkpoint_dir: str | os.PathLike | None = None, workers: int = 1,
           workers_per_device: int = 1, allow_space_change: bool = False,
           allow_config_change: bool = False, progress: bool = False) -> Launched:
    """Create or resume ``study`` (a name in ``studies/`` or the path of a study file) and run
    its trials in this process (``workers`` > 1: that many worker processes), as ``sweep
    launch`` does. ``trials``: the total budget (stored for later launches); ``overrides``: the
    study file's fixed fields, ``{"train.epochs": 3}`` or ``["train.epochs=3"]`` as ``--set``
    takes them; ``progress``: progress bars on stderr (the cost line is printed there either
    way). Returns a ``Launched``; raises ``SweepError`` for bad input, ``ConfigChangedError``
    / ``SpaceChangedError`` when the stored study was created with other settings."""
    from sweep.commands.launch import launch as run_launch
    from sweep.views.console import Console

    spec, opts = _prepare(study, trials, overrides, seed, storage, tracking_uri, data_dir,
                          device, checkpoint_dir, allow_space_change, allow_config_change)
    with known_warnings_ignored():
        if workers > 1:
            from sweep.commands.pool import PoolOptions, launch_pool

            result = launch_pool(spec, opts, PoolOptions(workers, workers_per_device,
                                                         tuple(_flags(overrides, seed))),
                                 Console(opts.tracking_uri, not progress))
        else:
            result = run_launch(spec, opts, Console(opts.tracking_uri, not progress))
    return Launched(Study(spec.name, opts.storage, opts.tracking_uri), result.text,
                    result.exit_code, result.cost)


def plan(study: str | os.PathLike, *, trials: int | None = None,
         overrides: Mapping[str, Any] | Sequence[str] = (), seed: int | None = None,
         storage: str | None = None, tracking_uri: str | None = None, device: str = "auto",
         checkpoint_dir: str | os.PathLike | None = None) -> str:
    """What ``launch`` with these arguments would do, as ``sweep launch --dry-run`` prints it
    (the resolved study, T, the budget left, the pack size, the MLflow store it adds); creates
    nothing. Raises what ``launch`` raises for bad input."""
    from sweep.commands.dry_run import dry_run

    spec, opts = _prepare(study, trials, overrides, seed, storage, tracking_uri, None, device,
                          checkpoint_dir, False, False)
    return dry_run(spec, opts)


def load(study: str | os.PathLike, *, storage: str | None = None,
         tracking_uri: str | None = None) -> "Study":
    """The stored study ``study`` (its name, or a study file: its ``name``), to read from.
    Raises ``StorageError`` when the storage is unreachable or holds no such study (the
    message lists the studies it holds)."""
    from sweep.commands.status import stored_name

    handle = Study(stored_name(str(study)), storage or _default_storage(),
                   tracking_uri or _default_tracking_uri())
    handle.optuna  # noqa: B018 (raises here, not at the first read, when the study is absent)
    return handle


class Study:
    """A stored study: its Optuna storage and its MLflow store, read on each call (a study that
    other workers are still filling shows their latest trials). Writes nothing but what a
    method names (``status(repair=True)``, ``export``, ``report``)."""

    def __init__(self, name: str, storage: str, tracking_uri: str):
        self.name, self.storage, self.tracking_uri = name, storage, tracking_uri
        self._optuna = None

    def __repr__(self) -> str:
        from sweep.base.urls import mask_url

        return (f"Study({self.name!r}, storage={mask_url(self.storage)!r}, "
                f"tracking_uri={mask_url(self.tracking_uri)!r})")

    @property
    def optuna(self) -> "optuna.Study":
        """The Optuna study itself (``optuna.load_study``), loaded once."""
        if self._optuna is None:
            from sweep.stores import load_existing_study

            with known_warnings_ignored():
                self._optuna = load_existing_study(self.name, self.storage)
        return self._optuna

    def status(self, repair: bool = False, checkpoint_dir: str | os.PathLike | None = None,
               log: Callable[[str], None] | None = None) -> "StatusFacts":
        """What ``sweep status`` reports: counts per state, running trials (host, pid,
        heartbeat age, stale), stale MLflow runs, whether MLflow holds every point, checkpoint
        files of no live trial. ``.as_json()`` is ``sweep status --json`` (keys in
        docs/scripting.md), ``.exit_code`` its exit status. ``repair``: first replay the spool,
        fail stale trials, end stale runs and remove orphan checkpoint files (``log`` hears
        what the replay did, a line at a time)."""
        from sweep.commands.status import show_status

        with known_warnings_ignored():
            said, facts = show_status(self.name, self.storage, self.tracking_uri, repair,
                                      _absolute(checkpoint_dir, "SWEEP_CHECKPOINT_DIR"))
        if said and log is not None:
            for line in said.splitlines():
                log(line)
        return facts

    def best(self, per: str | None = None) -> dict:
        """The best complete search trial: ``{"study", "direction", "number", "value",
        "params", "run_id"}``; with ``per`` (a categorical parameter, e.g. ``"scheduler"``)
        ``{"study", "direction", "per", "groups": [{"group", "number", ...}, ...]}``, as
        ``sweep best --json``. Raises ``NoResultError`` while no search trial has completed,
        ``SweepError`` for a ``per`` that is not a categorical parameter."""
        from sweep.views.trials import best

        with known_warnings_ignored():
            return best(self.name, self.storage, self.tracking_uri, per)

    def trials(self) -> "pandas.DataFrame":
        """One row per trial: Optuna's ``trials_dataframe()`` columns (``number``, ``value``,
        ``datetime_start``, ``datetime_complete``, ``duration``, ``params_*``, ``user_attrs_*``,
        ``state``), then ``outcome`` (``state`` with DIVERGED told apart from PRUNED),
        ``phase`` (search or confirm), ``epochs_trained``, ``run_id`` (the trial's MLflow
        run), ``test_acc`` and ``epoch_seconds`` as MLflow holds them, and each per-epoch
        metric as a list by epoch (``val_acc_by_epoch``, ``val_loss_by_epoch``; None where a
        point is missing)."""
        from sweep.views.trials import load_trials, trials_frame

        with known_warnings_ignored():
            return trials_frame(load_trials(self.name, self.storage, self.tracking_uri))

    def export(self, path: str | os.PathLike, format: str | None = None) -> str:
        """Write one record per trial to ``path`` as ``sweep export`` does; ``format`` ``csv``
        or ``json`` (default: ``path``'s suffix). Returns the line ``sweep export`` prints."""
        from sweep.views.trials import export

        fmt = format or Path(path).suffix.lstrip(".").lower()
        with known_warnings_ignored():
            return export(self.name, self.storage, self.tracking_uri, fmt, str(path))

    def report(self, out: str | os.PathLike | None = None, top: int = 5) -> "ReportResult":
        """Write the report (``index.html``, ``summary.md``, PNG figures) into ``out``
        (default ``reports/NAME``) and log it to the study's parent MLflow run, as ``sweep
        report``; ``top``: how many of the best trials get curves (1-10). Returns its
        ``folder``, ``files`` and ``text`` (the line ``sweep report`` prints)."""
        from sweep.errors import SweepError
        from sweep.views.report import write_report

        if not 1 <= top <= 10:
            raise SweepError(f"top={top}: how many of the best trials get curves, 1 to 10")
        with known_warnings_ignored():
            return write_report(self.name, self.storage, self.tracking_uri, out, top)


# --- the defaults and the checks the command line does in click --------------------------------

def _default_storage() -> str:
    from sweep.stores import DEFAULT_STORAGE

    return os.environ.get("SWEEP_STORAGE") or DEFAULT_STORAGE


def _default_tracking_uri() -> str:
    from sweep.record import DEFAULT_TRACKING_URI

    return os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI


def _absolute(folder: str | os.PathLike | None, variable: str) -> str | None:
    """A folder given (or read from ``variable``) as absolute, once: relative to where the
    caller runs, which workers and array tasks started elsewhere would not know."""
    folder = folder or os.environ.get(variable) or None
    return str(Path(folder).expanduser().resolve()) if folder else None


def _flags(overrides: Mapping[str, Any] | Sequence[str], seed: int | None) -> list[str]:
    """``--set`` items: a mapping's values written as YAML (``override_flag``), then the seed."""
    from sweep.errors import OverrideError
    from sweep.study.spec import override_flag

    if isinstance(overrides, str):
        raise OverrideError(f"overrides={overrides!r}: give a mapping such as "
                            f"{{'train.epochs': 3}} or a list of 'KEY=VALUE' strings")
    items = [override_flag(k, v) for k, v in overrides.items()] \
        if isinstance(overrides, Mapping) else [str(item) for item in overrides]
    return items + ([f"seed={seed}"] if seed is not None else [])


def _prepare(study, trials, overrides, seed, storage, tracking_uri, data_dir, device,
             checkpoint_dir, allow_space_change, allow_config_change):
    """The study spec and ``LaunchOptions`` of a launch, checked as the command line checks
    them; raises ``SweepError``."""
    from sweep.commands.launch import LaunchOptions
    from sweep.errors import SweepError
    from sweep.study.spec import load_study

    if trials is not None and (isinstance(trials, bool) or not isinstance(trials, int)
                               or trials < 1):
        raise SweepError(f"trials={trials!r}: the total trial budget is a whole number >= 1")
    spec = load_study(str(study), _flags(overrides, seed))
    opts = LaunchOptions(storage or _default_storage(), tracking_uri or _default_tracking_uri(),
                         _absolute(data_dir, "SWEEP_DATA_DIR"), device, trials,
                         allow_space_change, _absolute(checkpoint_dir, "SWEEP_CHECKPOINT_DIR"),
                         allow_config_change)
    return spec, opts


@contextlib.contextmanager
def known_warnings_ignored() -> Iterator[None]:
    """Within the block, the warnings sweep provokes on purpose are not shown
    (``ignore_known_warnings``); the caller's filters come back afterwards."""
    import warnings

    with warnings.catch_warnings():
        ignore_known_warnings()
        yield


def ignore_known_warnings() -> None:
    """Every warning filter of sweep, in one place: the CLI sets them once per command, the
    functions here within each call (a library must not change its caller's filters).

    Optuna marks heartbeats, the stale-trial retry callback and PatientPruner experimental and
    warns that heartbeats are meant for ``study.optimize``; sweep relies on them deliberately
    (it owns the ask/tell loop and beats itself), and one such line per storage opened would
    bury the per-trial lines in batch jobs' output files."""
    import warnings

    import optuna

    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    warnings.filterwarnings("ignore", message="Heartbeat of storage is supposed to be used with",
                            category=UserWarning)
