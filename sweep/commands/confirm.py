"""``sweep confirm``: retrain the search's winners with fresh seeds, in the same study (the
plan: ``sweep.loop.confirm_plan``)."""

from __future__ import annotations

from sweep.base.stopping import BoundedStop
from sweep.loop import budget_used, update_parent_run
from sweep.loop import as_searched, budget_line, prepare_replicates, resolve_plan
from sweep.stores import load_existing_study
from sweep.study.phases import CONFIRM
from sweep.study.specs import StudySpec


def confirm(spec: StudySpec, opts, display, seeds: int | None = None, top: int | None = None,
            log=print, overrides_given: bool = False):
    """Plan (or resume) the study's confirmation, then run its missing replicates. ``opts``: a
    ``launch.LaunchOptions``, ``display`` a ``launch.Display`` (progress, closing text); returns
    a ``launch.LaunchResult``. A stop (SIGTERM, Ctrl-C) is the same bounded stop as a launch's,
    with the same last words (``stopping``): the command holds its handlers to the end, so a
    second signal spools what is queued instead of raising KeyboardInterrupt."""
    with BoundedStop() as stop:
        return _confirm(spec, opts, display, seeds, top, log, overrides_given, stop)


def _confirm(spec: StudySpec, opts, display, seeds, top, log, overrides_given,
             stop: BoundedStop):
    # Training imports here: `sweep report` reads plans from this module without loading torch.
    from sweep.commands.launch import LaunchResult, open_study_stores
    from sweep.loop import run_worker

    # Planned on the existing study before any store is opened for writing: a study that is
    # absent or has nothing to confirm, or contradicting flags, leave everything untouched.
    existing = load_existing_study(spec.name, opts.storage)
    spec, taken = as_searched(spec, existing, overrides_given)
    if taken:
        log(f"confirming with the search's settings: {' '.join('--set ' + f for f in taken)}")
    plan = resolve_plan(existing, spec, seeds, top)
    stores = open_study_stores(spec, opts)
    stop.last_words = stores.tracker.spool_now
    study = stores.study
    plan = prepare_replicates(study, plan, opts.storage)
    log(budget_line(study, plan))
    display.watch_record(stores.tracker.lag_text)
    bar = display.trial_bar(plan.budget, budget_used(study, CONFIRM))
    try:
        report = run_worker(study, stores.worker_context(spec, display.epoch_bar, stop),
                            plan.budget, on_trial=bar, phase=CONFIRM)
    finally:
        bar.close()
        if not (stop.deadline and stores.tracker.refusing):  # a stop in an outage: the next run
            update_parent_run(study, stores.tracker, stores.experiment_id, stores.parent_run_id)
    used = budget_used(study, CONFIRM)
    if report.interrupted_by is not None:
        return LaunchResult(f"interrupted: {used}/{plan.budget} confirmation trials done; the "
                            f"running ones were marked FAIL and re-enqueued: run sweep confirm "
                            f"--study {spec.name} again to finish", 128 + report.interrupted_by)
    return LaunchResult(f"confirmation of {spec.name!r}: {used}/{plan.budget} trials done")
