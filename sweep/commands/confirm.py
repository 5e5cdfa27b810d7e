"""``sweep confirm``: retrain the search's winners with fresh seeds, in the same study (the
plan: ``sweep.loop.confirm_plan``)."""

from __future__ import annotations

from sweep.loop.budget import budget_used, update_parent_run
from sweep.loop.confirm_plan import as_searched, budget_line, prepare_replicates, resolve_plan
from sweep.stores.storage import load_existing_study
from sweep.study.phases import CONFIRM
from sweep.study.spec import StudySpec


def confirm(spec: StudySpec, opts, display, seeds: int | None = None, top: int | None = None,
            log=print, overrides_given: bool = False):
    """Plan (or resume) the study's confirmation, then run its missing replicates. ``opts``: a
    ``launch.LaunchOptions``, ``display`` a ``launch.Display`` (progress, closing text); returns
    a ``launch.LaunchResult``."""
    # Training imports here: `sweep report` reads plans from this module without loading torch.
    from sweep.commands.launch import LaunchResult, open_study_stores
    from sweep.loop.worker import run_worker

    # Planned on the existing study before any store is opened for writing: a study that is
    # absent or has nothing to confirm, or contradicting flags, leave everything untouched.
    existing = load_existing_study(spec.name, opts.storage)
    spec, taken = as_searched(spec, existing, overrides_given)
    if taken:
        log(f"confirming with the search's settings: {' '.join('--set ' + f for f in taken)}")
    plan = resolve_plan(existing, spec, seeds, top)
    stores = open_study_stores(spec, opts)
    study = stores.study
    plan = prepare_replicates(study, plan, opts.storage)
    log(budget_line(study, plan))
    display.watch_record(stores.tracker.lag_text)
    bar = display.trial_bar(plan.budget, budget_used(study, CONFIRM))
    try:
        report = run_worker(study, stores.worker_context(spec, display.epoch_bar), plan.budget,
                            on_trial=bar, phase=CONFIRM)
    finally:
        bar.close()
        update_parent_run(study, stores.tracker, stores.experiment_id, stores.parent_run_id)
    used = budget_used(study, CONFIRM)
    if report.interrupted_by is not None:
        return LaunchResult(f"interrupted: {used}/{plan.budget} confirmation trials done; the "
                            f"running ones were marked FAIL and re-enqueued: run sweep confirm "
                            f"--study {spec.name} again to finish", 128 + report.interrupted_by)
    return LaunchResult(f"confirmation of {spec.name!r}: {used}/{plan.budget} trials done")
