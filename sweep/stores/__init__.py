"""The stores a study keeps besides MLflow: the Optuna storage, heartbeats, the retry rule,
checkpoint files and their writer. Never imports mlflow."""

from sweep.base.lazy import lazy_names


# The public names and the module each lives in; loaded on first use, so importing the
# package stays light (no torch, optuna or mlflow until a name needs them).
_PUBLIC = {
    "CHECKPOINT_EPOCHS": "sweep.stores.retry",
    "CheckpointDir": "sweep.stores.checkpoints",
    "CheckpointWriter": "sweep.stores.checkpoint_writer",
    "DEFAULT_STORAGE": "sweep.stores.storage",
    "FAILED_TRIAL": "sweep.stores.retry",
    "Heartbeat": "sweep.stores.heartbeat",
    "RESUMED_AT_STEP": "sweep.stores.checkpoints",
    "RESUMED_EPOCHS": "sweep.stores.retry",
    "RETRY_HISTORY": "sweep.stores.retry",
    "STUDY_UID": "sweep.stores.checkpoints",
    "TrialCheckpoint": "sweep.stores.checkpoints",
    "check_storage_url": "sweep.stores.storage",
    "checkpoint_root": "sweep.stores.checkpoints",
    "folder_of": "sweep.stores.checkpoints",
    "grace_period": "sweep.stores.heartbeat",
    "heartbeat_ages": "sweep.stores.heartbeat",
    "keeps_heartbeats": "sweep.stores.heartbeat",
    "load_existing_study": "sweep.stores.storage",
    "open_existing_storage": "sweep.stores.storage",
    "open_storage": "sweep.stores.storage",
    "original_number": "sweep.stores.checkpoints",
    "orphans": "sweep.stores.checkpoints",
    "peek_study": "sweep.stores.storage",
    "remove_orphans": "sweep.stores.checkpoints",
    "resolve_dir": "sweep.stores.checkpoints",
    "retry_later": "sweep.stores.retry",
    "storage_key": "sweep.stores.checkpoints",
    "study_lock": "sweep.stores.storage",
    "study_names": "sweep.stores.storage",
    "waiting_with_checkpoint": "sweep.stores.checkpoints",
    "watch_stop": "sweep.stores.guard",
}

__all__ = sorted(_PUBLIC)
__getattr__, __dir__ = lazy_names(__name__, _PUBLIC)
