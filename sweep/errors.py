"""The project's exceptions.

Every error a user can cause (a bad study file, a bad flag, an unreachable store,
missing data) is a ``SweepError``. Its message is one line that names the problem
and the fix; the CLI prints it and exits with status 2, without a traceback.
"""


class SweepError(Exception):
    """Base class: a problem the user can fix. ``str(err)`` is the one-line message."""

    exit_code = 2


class StudyFileError(SweepError):
    """Raised when a study file (or a ``--set`` override of it) is malformed or invalid."""


class OverrideError(SweepError):
    """Raised when a ``--set KEY=VALUE`` flag is malformed or names an unknown key."""


class StorageError(SweepError):
    """Raised when the Optuna storage URL is malformed or the storage cannot be reached."""


class TrackingError(SweepError):
    """Raised when the MLflow tracking URI is malformed or cannot be written."""


class DataError(SweepError):
    """Raised when the CIFAR-10 folder is missing, cannot be downloaded or is corrupt."""


class DeviceError(SweepError):
    """Raised when the requested torch device does not exist on this machine."""


class SpaceChangedError(SweepError):
    """Raised when resuming a study whose search space differs from the one it was created with."""


class SubmitError(SweepError):
    """Raised when a ``sweep submit`` flag is invalid or ``sbatch`` refuses the job."""


class ScheduleError(SweepError):
    """Raised when ``sweep schedule`` gets a schedule that makes no sense, a bad output file,
    or a study/trial it cannot redraw."""


class ConfirmError(SweepError):
    """Raised when ``sweep confirm`` has nothing to confirm (no complete search trial) or its
    flags contradict the confirmation plan already stored in the study."""
