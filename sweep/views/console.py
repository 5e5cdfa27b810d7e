"""What a person sees: progress bars over trials and epochs, and the closing summary."""

from __future__ import annotations

import sys
from typing import Callable, Sequence

import optuna
from optuna.trial import TrialState

from sweep.loop import state_counts
from sweep.base.urls import mask_url
from sweep.study.phases import SEARCH, search_view


class EpochBar:
    """A training listener that shows a trial's epochs on console row ``row`` (the trials bar is
    row 0; the K slots of a fused pack take rows 1..K), and the record's lag (``lag``) when the
    MLflow writer falls behind."""

    def __init__(self, trial_number: int, epochs: int, row: int = 1,
                 lag: Callable[[], str] = lambda: ""):
        from tqdm import tqdm

        self.bar = tqdm(total=epochs, desc=f"trial {trial_number} epochs", position=row,
                        leave=False, file=sys.stderr, dynamic_ncols=True)
        self.lag = lag

    def on_steps(self, first_step: int, lrs: Sequence[float], losses: Sequence[float]) -> None:
        pass

    def on_epoch_end(self, epoch: int, metrics: dict) -> None:
        self.bar.set_postfix(_with_lag({"val_acc": f"{metrics['val_acc']:.3f}"}, self.lag),
                             refresh=False)
        self.bar.update(1)
        if self.bar.n >= self.bar.total:
            self.close()

    def close(self) -> None:
        self.bar.close()


def _with_lag(postfix: dict, lag: Callable[[], str]) -> dict:
    """``postfix`` and, while the MLflow writer is behind, ``mlflow=<its lag>``."""
    behind = lag()
    return {**postfix, "mlflow": behind} if behind else postfix


class TrialBar:
    def __init__(self, budget: int, used: int, quiet: bool, lag: Callable[[], str] = lambda: ""):
        self.bar = None
        self.lag = lag
        if not quiet:
            from tqdm import tqdm

            self.bar = tqdm(total=budget, initial=used, desc="trials", position=0,
                            file=sys.stderr, dynamic_ncols=True)

    def __call__(self, number: int, outcome) -> None:
        if outcome.state == TrialState.FAIL:  # never silent, --quiet or not
            line = f"trial {number} failed: {mask_url(outcome.detail)}"
            if self.bar is not None:
                self.bar.write(line, file=sys.stderr)
            else:
                print(line, file=sys.stderr, flush=True)
        if self.bar is not None:
            self.bar.set_postfix(_with_lag({"last": f"#{number} {outcome.state.name.lower()}"},
                                           self.lag), refresh=False)
            self.bar.update(1)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


class Console:
    """The CLI's ``launch.Display``: progress bars on stderr (none with ``quiet``) and the
    closing summary. Handed to launch, pool and confirm, which never import a view."""

    def __init__(self, tracking_uri: str, quiet: bool):
        self.tracking_uri, self.quiet = tracking_uri, quiet
        self._lag: Callable[[], str] = lambda: ""
        self.epoch_bar = None if quiet else \
            (lambda number, epochs, row=1: EpochBar(number, epochs, row, self.lag))

    def watch_record(self, lag: Callable[[], str]) -> None:
        self._lag = lag

    def lag(self) -> str:
        return self._lag()

    def trial_bar(self, budget: int, used: int) -> TrialBar:
        return TrialBar(budget, used, self.quiet, self.lag)

    def closing(self, study: optuna.Study, budget: int, used: int) -> str:
        return closing_summary(study, self.tracking_uri, budget, used)

    def say(self, line: str) -> None:
        """``line`` on stderr now, above the bars (tqdm keeps them whole), quiet or not."""
        from tqdm import tqdm

        tqdm.write(mask_url(line), file=sys.stderr)


def closing_summary(study: optuna.Study, tracking_uri: str, budget: int, used: int) -> str:
    """The closing text: best search trial, counts, and how to open the MLflow UI
    (confirmation replicates are not search results: ``sweep report`` shows them)."""
    c = state_counts(study, SEARCH)
    lines = [f"study {study.study_name!r}: {used}/{budget} trials used; {c['complete']} complete, "
             f"{c['pruned']} pruned, {c['diverged']} diverged, {c['failed']} failed"]
    study = search_view(study)
    complete = [t for t in study.get_trials(deepcopy=False) if t.state == TrialState.COMPLETE]
    if complete:
        best = study.best_trial
        test = best.user_attrs.get("test_acc")
        lines.append(f"best trial #{best.number}: {study.direction.name.lower()}d value "
                     f"{best.value:.4f}" + (f", test_acc {test:.4f}" if test is not None else "")
                     + f", mlflow run {best.user_attrs.get('mlflow_run_id', '?')}")
        lines.append("  params: " + ", ".join(f"{k}={_param_text(v)}" for k, v in best.params.items()))
    else:
        lines.append("no complete trial yet")
    if tracking_uri.startswith(("sqlite:", "postgresql", "mysql")):
        lines.append(f"compare trials: mlflow ui --backend-store-uri {mask_url(tracking_uri)}")
    else:
        lines.append(f"compare trials: open {mask_url(tracking_uri)}")
    return "\n".join(lines)


def _param_text(v) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)
