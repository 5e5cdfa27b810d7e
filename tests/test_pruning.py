"""Pruners driven by real Optuna studies (``study.ask()`` / ``trial.report()``, as Optuna's own
pruner tests do) through sweep's ``build_pruner``; pruner parameters checked at load; and one
real run (Optuna SQLite + MLflow SQLite + resnet8 training on tiny data) in which Optuna and
MLflow must agree on every trial."""

from __future__ import annotations

import math
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

from sweep.errors import StudyFileError
from sweep.loop.objective import PruningListener
from sweep.study.pruning import build_pruner, describe_pruner
from sweep.study.specs import PrunerSpec
from sweep.study.spec import parse_study
from sweep.training.train import StopTraining

from helpers import write_cifar

STUDY = """
name: {name}
seed: 0
trials: {trials}
objective: {{metric: val_acc, direction: maximize}}
sampler: {{type: random}}
pruner: {pruner}
divergence: {{loss_factor: 4.0, patience_steps: 5, reference_steps: 3}}
data: {{train_size: 320, val_size: 80, test_size: 40}}
train: {{model: resnet8, width: 1, epochs: {epochs}, batch_size: 16, sync_every_steps: 4}}
space:
  warmup_steps: 0
  base_lr: {{type: float, low: 0.0001, high: 50.0, log: true}}
  scheduler: {{constant: {{}}, cosine: {{}}}}
"""


def study_spec(tmp_path: Path, pruner: str = "{type: median}", epochs: int = 2, trials: int = 4,
               name: str = "t"):
    text = STUDY.format(name=name, pruner=pruner, epochs=epochs, trials=trials)
    path = tmp_path / "t.yaml"
    path.write_text(text)  # a launch logs the study file as an artifact
    return parse_study(text, str(path), path)


def memory_study(pruner) -> optuna.Study:
    return optuna.create_study(direction="maximize", pruner=pruner,
                               sampler=optuna.samplers.RandomSampler(seed=0))


# --- parameters are checked when the study file is loaded ---------------------------------------

@pytest.mark.parametrize("pruner, key, problem", [
    ("{type: threshold}", "pruner.type", "needs 'lower' or 'upper'"),
    ("{type: threshold, lower: 0.9, upper: 0.1}", "pruner.lower", "must be <= upper"),
    ("{type: hyperband, reduction_factor: 1}", "pruner.reduction_factor", "must be >= 2"),
    ("{type: median, percentile: 30}", "pruner.percentile", "not a parameter of pruner 'median'"),
    ("{type: patient, patience: 2}", "pruner", "needs 'wrapped:'"),
    ("{type: patient, wrapped: {type: threshold}}", "pruner.wrapped.type", "needs 'lower'"),
])
def test_bad_pruner_parameters_are_rejected_at_load_with_the_key(tmp_path, pruner, key, problem):
    with pytest.raises(StudyFileError) as err:
        study_spec(tmp_path, pruner)
    message = str(err.value)
    assert f"t.yaml: {key} (line" in message and problem in message and "\n" not in message


def decisions(tmp_path, text: str, completed: list[list[float]], probe: list[float],
              epochs: int = 3, name: str = "decisions") -> list[bool]:
    """``should_prune`` after each step of a probe trial, once the ``completed`` curves are
    complete trials (each asked ``should_prune`` per step, as a worker does)."""
    # A fixed name: hyperband puts a trial into a bracket by a hash of study name and number.
    study = optuna.create_study(
        study_name=name, direction="maximize",
        pruner=build_pruner(study_spec(tmp_path, text, epochs=epochs).pruner, epochs),
        sampler=optuna.samplers.RandomSampler(seed=0))
    for curve in completed:
        trial = study.ask()
        for step, value in enumerate(curve):
            trial.report(value, step)
            trial.should_prune()
        study.tell(trial, curve[-1])
    trial, out = study.ask(), []
    for step, value in enumerate(probe):
        trial.report(value, step)
        out.append(bool(trial.should_prune()))
    return out


MEDIAN = "{type: median, n_startup_trials: 1, n_warmup_steps: 0}"


@pytest.mark.parametrize("text, completed, probe, expected", [
    # n_warmup_steps w: no decision before step w
    (MEDIAN, [[0.5] * 3], [0.1] * 3, [True, True, True]),
    ("{type: median, n_startup_trials: 1, n_warmup_steps: 2}", [[0.5] * 3], [0.1] * 3,
     [False, False, True]),
    # n_startup_trials n: nothing is pruned until n trials are complete
    ("{type: median, n_startup_trials: 2, n_warmup_steps: 0}", [[0.5] * 3], [0.1] * 3,
     [False] * 3),
    # percentile p (maximize): prune below the top p% of the values at the step
    ("{type: percentile, percentile: 25, n_startup_trials: 1, n_warmup_steps: 0}",
     [[0.2], [0.4], [0.6], [0.8]], [0.5], [True]),
    ("{type: percentile, percentile: 75, n_startup_trials: 1, n_warmup_steps: 0}",
     [[0.2], [0.4], [0.6], [0.8]], [0.5], [False]),
    # threshold lower: prune below it
    ("{type: threshold, lower: 0.2}", [], [0.1] * 3, [True] * 3),
    ("{type: threshold, lower: 0.05}", [], [0.1] * 3, [False] * 3),
    # successive halving min_resource r: the first rung is at step r
    ("{type: successive_halving, min_resource: 1}", [[0.9] * 3] * 4, [0.1] * 3,
     [False, True, False]),
    ("{type: successive_halving, min_resource: 2}", [[0.9] * 3] * 4, [0.1] * 3,
     [False, False, True]),
    # patient(patience k): a steadily worse trial is pruned only after k steps without gain
    ("{type: patient, patience: 0, wrapped: " + MEDIAN + "}", [[0.5] * 3], [0.3, 0.2, 0.1],
     [False, True, True]),
    ("{type: patient, patience: 1, wrapped: " + MEDIAN + "}", [[0.5] * 3], [0.3, 0.2, 0.1],
     [False, False, True]),
    ("none", [[0.5] * 3], [0.1] * 3, [False] * 3),
])
def test_built_pruners_follow_their_parameters(tmp_path, text, completed, probe, expected):
    """Each case differs from its neighbour in one parameter; a pruner built with that
    parameter ignored would decide as the neighbour does."""
    assert decisions(tmp_path, text, completed, probe) == expected


@pytest.mark.parametrize("factor, rungs", [(2, {2, 4, 8}), (3, {3, 9})])
def test_hyperband_rungs_follow_the_reduction_factor(tmp_path, factor, rungs):
    """Rungs sit at min_resource x factor**k steps, so the first pruning of a bad trial happens at
    one of them (max_resource = the study's 9 epochs). Hyperband picks a trial's bracket from a
    hash of study name and trial number: with this name the probe's bracket starts above step 1
    for both factors, so a factor that were ignored (default 3) would prune at another step."""
    text = f"{{type: hyperband, reduction_factor: {factor}, min_resource: 1}}"
    pruned = decisions(tmp_path, text, [[0.9] * 9] * 12, [0.1] * 9, epochs=9, name="hb20")
    assert True in pruned and pruned.index(True) in rungs


def test_pruner_names_for_logs(tmp_path):
    spec = study_spec(tmp_path, "{type: patient, wrapped: {type: median}}", epochs=6)
    assert describe_pruner(spec.pruner) == "patient(median)"


# --- pruners on real studies ---------------------------------------------------------------------

def test_hyperband_prunes_exactly_at_the_rungs_of_each_trials_bracket():
    """max_resource = 9 epochs, eta = 3 -> brackets 0, 1, 2 with first rungs at steps 1, 3, 9.
    Each new trial reports a value worse than every earlier one, so the first trial of a
    bracket is promoted through its rungs and every later trial of that bracket is pruned at
    the bracket's first rung, never at another step; bracket 2 (rung 9 > last step 8) never
    prunes."""
    epochs = 9
    pruner = build_pruner(PrunerSpec("hyperband", {"min_resource": 1, "reduction_factor": 3}),
                          epochs)
    study = memory_study(pruner)
    pruned_at: dict[int, list[int]] = {}
    first_in_bracket: dict[int, int] = {}
    for n in range(40):
        trial = study.ask()
        for step in range(epochs):
            trial.report(1.0 / (n + 1), step)
            prune = trial.should_prune()  # the first call also sets up the brackets
            if step == 0:
                bracket = pruner.wrapped._get_bracket_id(  # GroupPruner wraps the hyperband
                    study, study._storage.get_trial(trial._trial_id))
                first_in_bracket.setdefault(bracket, n)
            if prune:
                pruned_at.setdefault(bracket, []).append(step)
                study.tell(trial, state=TrialState.PRUNED)
                break
        else:
            study.tell(trial, 1.0 / (n + 1))
            assert n == first_in_bracket[bracket] or bracket == 2, (n, bracket)
    assert pruner.wrapped._n_brackets == 3
    assert set(pruned_at) == {0, 1}
    assert set(pruned_at[0]) == {1} and set(pruned_at[1]) == {3}
    assert len(pruned_at[0]) + len(pruned_at[1]) >= 20  # the budget went mostly to bracket 0/1


def test_hyperband_promotes_the_top_third_at_the_first_rung():
    """Values in a fixed shuffled order: at the first rung a trial survives iff it is within
    the top 1/eta of the values seen there so far (Optuna's ASHA rule)."""
    pruner = build_pruner(PrunerSpec("successive_halving", {"reduction_factor": 3}), 4)
    study = memory_study(pruner)
    values = [0.5, 0.9, 0.1, 0.7, 0.3, 0.8, 0.2, 0.6, 0.4, 0.95]
    seen: list[float] = []
    for value in values:
        trial = study.ask()
        trial.report(value, 0)
        assert not trial.should_prune()  # step 0 < first rung (min_resource 1)
        trial.report(value, 1)
        seen.append(value)
        keep = max(len(seen) // 3, 1)
        assert trial.should_prune() == (value < sorted(seen)[-keep]), (value, seen)
        study.tell(trial, state=TrialState.PRUNED)


def test_median_never_prunes_before_its_warmup_steps():
    spec = PrunerSpec("median", {"n_startup_trials": 1, "n_warmup_steps": 3})
    study = memory_study(build_pruner(spec, 6))
    best = study.ask()
    for step in range(6):
        best.report(0.9, step)
    study.tell(best, 0.9)
    worst = study.ask()
    decisions = []
    for step in range(6):
        worst.report(0.1, step)
        decisions.append(worst.should_prune())
    assert decisions == [False, False, False, True, True, True]


def test_an_ordinary_prune_records_the_pruner_and_the_epoch():
    spec = PrunerSpec("threshold", {"lower": 0.5, "n_warmup_steps": 1})
    study = memory_study(build_pruner(spec, 4))
    trial = study.ask()
    listener = PruningListener(trial, "val_acc", describe_pruner(spec), steps_per_epoch=10)
    listener.on_epoch_end(0, {"val_acc": 0.3, "val_loss": 2.0})  # warm-up epoch: kept
    with pytest.raises(StopTraining) as stop:
        listener.on_epoch_end(1, {"val_acc": 0.4, "val_loss": 1.9})
    assert (stop.value.reason, stop.value.epoch, stop.value.step) == ("pruner", 1, 19)
    assert stop.value.detail == {"pruner": "threshold", "value": 0.4}
    # a non-finite epoch is never reported to Optuna
    listener.on_epoch_end(2, {"val_acc": 0.4, "val_loss": math.nan})
    assert study._storage.get_trial(trial._trial_id).intermediate_values == {0: 0.3, 1: 0.4}


# --- one real run: Optuna and MLflow agree ------------------------------------------------------

@pytest.mark.slow
def test_a_real_run_agrees_between_optuna_and_mlflow(tmp_path):
    """Enqueued: LR 50 (explodes), two sane trials, and LR 1e-4 (learns nothing, pruned by the
    median pruner after its first epoch). Every trial's intermediate values equal its MLflow
    val_acc series; states agree; no NaN metric anywhere; the diverged run is KILLED with
    sweep.prune_reason=diverged and keeps its lr curve up to the step that stopped it."""
    from mlflow.tracking import MlflowClient

    from sweep.commands.launch import LaunchOptions, open_study_stores
    from sweep.loop.worker import run_worker

    data = write_cifar(tmp_path / "data", per_batch=80, test=40)
    spec = study_spec(tmp_path, "{type: median, n_startup_trials: 2, n_warmup_steps: 0}")
    opts = LaunchOptions(f"sqlite:///{tmp_path}/optuna.db", f"sqlite:///{tmp_path}/mlflow.db",
                         str(data), device="cpu")
    stores = open_study_stores(spec, opts)
    study, ctx = stores.study, stores.worker_context(spec)
    for lr, scheduler in ((50.0, "constant"), (0.1, "cosine"), (0.05, "constant"),
                          (1e-4, "constant")):
        study.enqueue_trial({"base_lr": lr, "scheduler": scheduler})
    run_worker(study, ctx, budget=4)

    client = MlflowClient(opts.tracking_uri)
    trials = study.get_trials()
    assert [t.state for t in trials] == [TrialState.PRUNED, TrialState.COMPLETE,
                                         TrialState.COMPLETE, TrialState.PRUNED]
    steps_per_epoch = spec.steps_per_epoch
    for t in trials:
        run = client.get_run(t.user_attrs["mlflow_run_id"])
        assert run.data.tags["sweep.state"] == t.state.name
        assert run.info.status == ("FINISHED" if t.state == TrialState.COMPLETE else "KILLED")
        series = {m.step: m.value for m in client.get_metric_history(run.info.run_id, "val_acc")}
        assert series == t.intermediate_values
        for key in ("lr", "train_loss", "val_loss", "val_acc"):
            assert all(math.isfinite(m.value) for m in client.get_metric_history(run.info.run_id, key))

    diverged, ordinary = trials[0], trials[3]
    assert diverged.user_attrs["prune_reason"] == "diverged"
    assert diverged.user_attrs["prune_epoch"] == 0
    stop_step = diverged.user_attrs["prune_step"]
    assert stop_step < steps_per_epoch and "prune_loss" in diverged.user_attrs
    assert diverged.intermediate_values == {}
    run = client.get_run(diverged.user_attrs["mlflow_run_id"])
    assert run.data.tags["sweep.prune_reason"] == "diverged"
    assert int(run.data.tags["sweep.prune_step"]) == stop_step
    lr_steps = [m.step for m in client.get_metric_history(run.info.run_id, "lr")]
    # the curve reaches the deciding step; at most one sync chunk past it was logged
    assert lr_steps[0] == 0 and stop_step <= lr_steps[-1] < stop_step + spec.train.sync_every_steps
    assert lr_steps == list(range(len(lr_steps)))

    assert ordinary.user_attrs["prune_reason"] == "pruner"
    assert ordinary.user_attrs["prune_pruner"] == "median"
    assert ordinary.user_attrs["prune_epoch"] == 0 == max(ordinary.intermediate_values)
    run = client.get_run(ordinary.user_attrs["mlflow_run_id"])
    assert run.data.tags["sweep.prune_reason"] == "pruner"
    assert run.data.metrics["val_acc"] == ordinary.intermediate_values[0]  # last value visible


def _first_prune(trial, values: list[float]) -> int | None:
    """The first step at which the pruner stops ``trial`` reporting ``values``, else None."""
    for step, value in enumerate(values):
        trial.report(value, step)
        if trial.should_prune():
            return step
    return None


def _hyperband_study(name: str, pruner) -> optuna.Study:
    """12 trials over 9 epochs, each better than the one before (none is pruned), so a trial
    reporting 0.0 is pruned at the first rung of its bracket: step 1, step 3, or never."""
    study = optuna.create_study(study_name=name, direction="maximize", pruner=pruner,
                                sampler=optuna.samplers.RandomSampler(seed=0))
    for n in range(12):
        trial = study.ask()
        assert _first_prune(trial, [0.5 + n / 100] * 9) is None
        study.tell(trial, 0.5 + n / 100)
    return study


def test_a_retry_meets_the_pruning_decisions_of_the_trial_it_continues():
    """Trial 12 dies after its first epoch; its retry is trial 13. The reference is Optuna's own
    HyperbandPruner on a trial numbered 12 in a study of the same name and history; the study
    name is one where Optuna would put trials 12 and 13 in brackets that decide differently, so
    a retry drawn by its own number would fail the comparison."""
    from sweep.stores.retry import retry_later
    from sweep.study.pruning import PRUNING_TRIAL

    worst = [0.0] * 9
    for name in (f"hyperband-{i}" for i in range(200)):
        plain = optuna.pruners.HyperbandPruner(min_resource=1, max_resource=9, reduction_factor=3)
        reference = _hyperband_study(name, plain)
        expected = _first_prune(reference.ask(), worst)  # trial 12
        if _first_prune(reference.ask(), worst) != expected:  # trial 13 decides otherwise
            break
    else:
        pytest.fail("no study name puts trials 12 and 13 in brackets that decide differently")

    pruner = build_pruner(PrunerSpec("hyperband", {"min_resource": 1, "reduction_factor": 3}), 9)
    study = _hyperband_study(name, pruner)
    original = study.ask()
    assert original.number == 12 and _first_prune(original, worst[:1]) is None
    study.tell(original, state=TrialState.FAIL)  # its worker died during epoch 2
    assert retry_later(study, study._storage.get_trial(original._trial_id))
    retry = study.ask()
    assert retry.number == 13
    assert study._storage.get_trial(retry._trial_id).system_attrs[PRUNING_TRIAL] == 12
    assert _first_prune(retry, worst) == expected

    # a retry of the retry (its worker stopped on a signal) still continues trial 12
    study.tell(retry, state=TrialState.FAIL)
    assert retry_later(study, study._storage.get_trial(retry._trial_id), signalled=True)
    again = study.ask()
    assert study._storage.get_trial(again._trial_id).system_attrs[PRUNING_TRIAL] == 12
    assert _first_prune(again, worst) == expected
