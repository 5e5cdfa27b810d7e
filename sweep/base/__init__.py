"""What every layer shares: store URLs and their masking, the bounded stop, one ``first_line``,
one backoff. Imports nothing of sweep but ``sweep.errors``, and neither optuna, mlflow nor
torch."""
