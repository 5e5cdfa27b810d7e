"""The study language: study files validated into frozen specs (spec), the search space and
the one place that turns an Optuna trial into a config (space), LR schedules as functions of the
step (schedules), and pruner rules (pruning). The lowest part: it imports nothing else of sweep
but errors."""
