"""The stores a study keeps besides MLflow: the Optuna storage, heartbeats, the retry rule,
checkpoint files and their writer. Never imports mlflow."""
