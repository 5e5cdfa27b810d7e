"""One synchronous MLflow write: ``log_batch`` and MLflow's cap on a batch, and the two store
calls the metric writer is handed (a chunk of points, a run's end)."""

from __future__ import annotations

from typing import Callable

MAX_BATCH = 1000  # MLflow's cap on metrics per log_batch


def log_batch(client, run_id: str, metrics=(), params=(), tags=()) -> None:
    """``MlflowClient.log_batch``, always synchronous: with ``MLFLOW_ENABLE_ASYNC_LOGGING=true``
    MLflow would otherwise queue the batch and swallow a refusal, and the writer would count
    points as stored that never were."""
    client.log_batch(run_id, metrics=list(metrics), params=list(params), tags=list(tags),
                     synchronous=True)


def metric_sender(client) -> Callable[[str, list], None]:
    """``send(run_id, points)``: one chunk of (key, value, timestamp ms, step) points through
    ``log_batch`` (raises what the store raises)."""

    def send(run_id: str, points: list) -> None:
        from mlflow.entities import Metric

        log_batch(client, run_id, metrics=[Metric(k, v, ts, s) for k, v, ts, s in points])

    return send


def run_finisher(client) -> Callable:
    """``finish(end)``: a run's end (``writer_work.RunEnd``): its tags, then its status and end
    time (raises what the store raises)."""

    def finish(end) -> None:
        from mlflow.entities import RunTag

        if end.tags:
            log_batch(client, end.run_id, tags=[RunTag(k, v) for k, v in end.tags.items()])
        client.set_terminated(end.run_id, end.status, end_time=end.end_time)

    return finish
