"""The MLflow record: the names and tags contract, the client, store errors, the spool, the SQL
insert, the one writer, the study's and the trials' runs, completeness. MLflow only: never
imports optuna, torch, the stores, the loop or the commands."""
