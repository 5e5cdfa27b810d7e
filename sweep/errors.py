"""The project's exceptions.

Every error a user can cause (a bad study file, a bad flag, an unreachable store,
missing data) is a ``SweepError``. Its message is one line that names the problem
and the fix; the CLI prints it and exits with status 2, without a traceback.
"""


class SweepError(Exception):
    """Base class: a problem the user can fix. ``str(err)`` is the one-line message."""

    exit_code = 2


class FieldError(SweepError, ValueError):
    """Raised when one value breaks a rule (a schedule's or a pruner's parameter rules).

    ``key`` is the path of keys that names the value, as far as the rule knows it (the schedule
    rules know ``("gamma",)``; a study file knows ``("space", "scheduler", "step", "gamma")``),
    ``problem`` says what is wrong and the fix, ``line`` is the study file's line when known.
    Callers that know more re-raise with the full path or the flag that gave the value, instead
    of taking a message apart. A ValueError too: rules stay usable without sweep's CLI."""

    def __init__(self, key: str | tuple, problem: str, line: int | None = None):
        self.key = (key,) if isinstance(key, str) else tuple(key)
        self.problem, self.line = problem, line
        where = ".".join(map(str, self.key)) + (f" (line {line})" if line else "")
        super().__init__(f"{where}: {problem}")


class StudyFileError(SweepError):
    """Raised when a study file (or a ``--set`` override of it) is malformed or invalid."""


class OverrideError(SweepError):
    """Raised when a ``--set KEY=VALUE`` flag is malformed or names an unknown key."""


class StorageError(SweepError):
    """Raised when the Optuna storage URL is malformed or the storage cannot be reached."""


class TrackingError(SweepError):
    """Raised when the MLflow tracking URI is malformed or cannot be written."""


class CredentialsRefused(TrackingError):
    """Raised when the MLflow store refuses this process's credentials (HTTP 401/403) for a
    trial's run start: the worker stops (its trials are re-enqueued, every queued point is
    stored or spooled) instead of failing trial after trial. Exit status 6."""

    exit_code = 6


class DataError(SweepError):
    """Raised when the CIFAR-10 or CIFAR-100 folder is missing, cannot be downloaded or is
    corrupt."""


class ModelError(SweepError):
    """Raised when ``train.model`` names a factory that cannot be imported or called, or whose
    network does not map a ``B x 3 x 32 x 32`` batch to ``B x num_classes`` floating-point
    logits with floating-point parameters (checked before any store is written)."""


class DeviceError(SweepError):
    """Raised when the requested torch device does not exist on this machine."""


class SpaceChangedError(SweepError):
    """Raised when resuming a study whose search space differs from the one it was created with."""


class ConfigChangedError(SweepError):
    """Raised when resuming a study whose training settings (its identity beside the space)
    differ from the ones it was created with (``sweep.loop.identity``)."""


class SubmitError(SweepError):
    """Raised when a ``sweep submit`` flag is invalid or ``sbatch`` refuses the job."""


class ScheduleError(SweepError):
    """Raised when ``sweep schedule`` gets a schedule that makes no sense, a bad output file,
    or a study/trial it cannot redraw."""


class ConfirmError(SweepError):
    """Raised when ``sweep confirm`` has nothing to confirm (no complete search trial) or its
    flags contradict the confirmation plan already stored in the study."""


class CheckpointError(SweepError):
    """Raised when the checkpoint folder (``--checkpoint-dir``) cannot be written."""


class NoResultError(SweepError):
    """Raised when ``sweep best`` finds no complete search trial (yet): not bad input, so its
    exit status is 1."""

    exit_code = 1
