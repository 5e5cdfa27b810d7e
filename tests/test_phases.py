"""The two budgets of one study (search and confirmation) and what each worker does next, on a
real in-memory Optuna study (no training)."""

from __future__ import annotations

import optuna
from optuna.trial import TrialState

from sweep.loop.budget import DONE, RUN, WAIT, budget_used, counted, next_step, over_budget
from sweep.stores.retry import retry_later
from sweep.study.phases import CONFIRM, CONFIRM_KEY, GROUP, PHASE, SEED, SearchOnlySampler


def _study():
    return optuna.create_study(direction="maximize",
                               sampler=SearchOnlySampler(optuna.samplers.RandomSampler(seed=0)))


def _replicate(study, key):
    study.enqueue_trial({"x": 0.5}, user_attrs={PHASE: CONFIRM, GROUP: "g", SEED: 7,
                                                CONFIRM_KEY: key})


def test_each_budget_counts_its_own_phase_and_a_confirmation_never_asks_the_sampler():
    study = _study()
    for _ in range(3):
        t = study.ask()
        study.tell(t, t.suggest_float("x", 0, 1))
    _replicate(study, "g/seed7")
    trials = study.get_trials()
    assert next_step(trials, 3) == DONE  # the search budget is used ...
    assert next_step(trials, 1, CONFIRM) == RUN  # ... the confirmation's is not
    replicate = study.ask()  # the queued replicate
    assert replicate.user_attrs[PHASE] == CONFIRM and replicate.suggest_float("x", 0, 1) == 0.5
    assert not over_budget(study, replicate, 1, CONFIRM)
    assert next_step(study.get_trials(), 1, CONFIRM) == WAIT  # running elsewhere: wait
    study.tell(replicate, 0.9)
    assert (budget_used(study), budget_used(study, CONFIRM)) == (3, 1)
    # a budget larger than what was enqueued never makes a confirmation ask the sampler
    assert next_step(study.get_trials(), 5, CONFIRM) == DONE
    # a fresh sampler trial that reaches a confirmation worker (a race) yields, uncounted
    fresh = study.ask()
    assert over_budget(study, fresh, 5, CONFIRM)
    assert len(counted(study.get_trials(), CONFIRM)) == 1
    assert len(counted(study.get_trials())) == 3


def test_a_retried_replicate_keeps_its_group_and_seed_and_replaces_the_failed_one():
    study = _study()
    _replicate(study, "g/seed7")
    trial = study.ask()
    study.tell(trial, state=TrialState.FAIL)
    retry_later(study, study.get_trials()[trial.number])
    retry = study.get_trials()[-1]
    assert retry.state == TrialState.WAITING
    assert {k: retry.user_attrs[k] for k in (PHASE, GROUP, SEED, CONFIRM_KEY)} == \
        {PHASE: CONFIRM, GROUP: "g", SEED: 7, CONFIRM_KEY: "g/seed7"}
    assert counted(study.get_trials(), CONFIRM) == []  # the failed original no longer counts
    assert next_step(study.get_trials(), 1, CONFIRM) == RUN
    retry_later(study, study.get_trials()[trial.number])  # a second path finding it: no-op
    retry_later(study, retry)  # a retry is never retried
    assert len(study.get_trials()) == 2


def test_the_sampler_is_shown_search_trials_only():
    study = _study()
    t = study.ask()
    study.tell(t, t.suggest_float("x", 0, 1))
    _replicate(study, "g/seed7")
    r = study.ask()
    study.tell(r, 0.9)
    nxt = study.ask()
    assert study._storage.get_trial(nxt._trial_id).system_attrs["sweep.sampler_saw"] == [t.number]


def test_confirm_refuses_a_study_with_nothing_to_confirm_and_writes_nothing(tmp_path, tiny_cifar):
    from click.testing import CliRunner

    from sweep.cli import main
    from sweep.stores.storage import open_storage

    storage = f"sqlite:///{tmp_path}/sweep.db"
    optuna.create_study(study_name="tiny", storage=open_storage(storage), direction="maximize")
    args = ["confirm", "--study", "tests/studies/tiny.yaml", "--storage", storage,
            "--tracking-uri", f"sqlite:///{tmp_path}/mlflow.db", "--data-dir", str(tiny_cifar),
            "--device", "cpu"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 2
    assert result.output.strip().splitlines() == [
        "error: study 'tiny' has no complete search trial to confirm; run (or resume) the search "
        "first: sweep launch --study tiny"]
    assert not (tmp_path / "mlflow.db").exists()
    assert optuna.load_study(study_name="tiny", storage=storage).user_attrs == {}
    unknown = CliRunner().invoke(main, [*args[:2], "tests/studies/tiny.yaml", "--storage",
                                        f"sqlite:///{tmp_path}/other.db", *args[5:]])
    assert unknown.exit_code == 2 and "error: " in unknown.output
    assert not (tmp_path / "other.db").exists()
