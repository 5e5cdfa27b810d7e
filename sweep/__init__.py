"""sweep: hyperparameter sweeps over learning-rate schedules (Optuna + MLflow + PyTorch)."""

__version__ = "0.1.0"
