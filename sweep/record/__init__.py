"""The MLflow record: the names and tags contract, the client, store errors, the spool, the SQL
insert, the one writer, the study's and the trials' runs, completeness. MLflow only: never
imports optuna, torch, the stores, the loop or the commands; importing it loads no MLflow
either (every MLflow import is inside a function).

Code outside ``sweep/record/`` imports these names from ``sweep.record``; the modules behind
them import each other directly.
"""

from sweep.record.completeness import Completeness, is_sql_store, launch_lines, replay_spool
from sweep.record.completeness import check as check_completeness
from sweep.record.connection import DEFAULT_TRACKING_URI, check_tracking_uri
from sweep.record.metric_writer import MetricWriter
from sweep.record.names import (BYTES_PER_POINT, CODE_VERSION, EPOCH_METRICS, EPOCHS_TRAINED,
                                EXPECTED_POINTS, FINAL_METRICS, REASON, ROLE, RUN_END_BY, STATE,
                                STEP_METRICS, STEPS_TRAINED, points_per_trial)
from sweep.record.spool import (SPOOL_DIR_NAME, Pending, SpoolWriter, drop_runs, pending,
                                replay, spool_dir)
from sweep.record.repair import (end_stale_run, other_runs, remove_runs, restore_set_aside,
                                 tag_code_version)
from sweep.record.sql_metrics import bulk_sender
from sweep.record.study_runs import StudySummary
from sweep.record.tracking import Tracker, open_existing_tracker
from sweep.record.trial_run import TrialRun

__all__ = [
    "BYTES_PER_POINT", "CODE_VERSION", "Completeness", "DEFAULT_TRACKING_URI", "EPOCHS_TRAINED",
    "EPOCH_METRICS", "EXPECTED_POINTS", "FINAL_METRICS", "MetricWriter", "Pending", "REASON",
    "ROLE", "RUN_END_BY", "SPOOL_DIR_NAME", "STATE", "STEPS_TRAINED", "STEP_METRICS",
    "SpoolWriter", "StudySummary", "Tracker", "TrialRun", "bulk_sender", "check_completeness",
    "check_tracking_uri", "drop_runs", "end_stale_run", "is_sql_store", "launch_lines", "open_existing_tracker",
    "other_runs", "pending", "points_per_trial", "remove_runs", "replay", "replay_spool",
    "restore_set_aside",
    "spool_dir", "tag_code_version",
]
