"""Creating or resuming a study: its sampler and pruner from the study file, the search-space
fingerprint a resumed study must still agree with, and the attributes a new study is given."""

from __future__ import annotations

import json
import uuid
import warnings

import optuna

from sweep.errors import SpaceChangedError
from sweep.loop.identity import IDENTITY, check_identity, identity_of
from sweep.loop.budget import SETTINGS
from sweep.stores import STUDY_UID
from sweep.study.phases import SearchOnlySampler
from sweep.study.pruning import build_pruner
from sweep.study.specs import StudySpec
from sweep.study.spec import trial_settings


def space_fingerprint(spec: StudySpec) -> str:
    """The search space as canonical JSON (what a resumed study must still agree with)."""
    return json.dumps(spec.raw.get("space"), sort_keys=True, default=str)


def build_sampler(spec: StudySpec, constant_liar: bool = True) -> optuna.samplers.BaseSampler:
    """The study file's sampler, blind to confirmation trials (``sweep.study.phases``).

    TPE runs with ``constant_liar`` (Optuna's advice for parallel optimisation): a fused pack
    asks K trials before any reports, and concurrent workers ask while others train; the liar
    counts each RUNNING trial as a bad result, so a batch of proposals spreads over the space
    instead of all crowding the current best region (H100 run without it: 13 of 24 proposals
    after the first pack were cosine). ``constant_liar=False`` is for the test that measures it."""
    if spec.sampler.type == "random":
        return SearchOnlySampler(optuna.samplers.RandomSampler(seed=spec.seed))
    with warnings.catch_warnings():  # constant_liar is "experimental" in Optuna 5.0
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        tpe = optuna.samplers.TPESampler(seed=spec.seed,
                                         n_startup_trials=spec.sampler.n_startup_trials,
                                         multivariate=spec.sampler.multivariate,
                                         group=spec.sampler.multivariate,
                                         constant_liar=constant_liar)
    return SearchOnlySampler(tpe)


def open_study(spec: StudySpec, storage, allow_space_change: bool = False,
               create: bool = True, allow_config_change: bool = False) -> optuna.Study:
    """Create the study or resume it; refuses a changed search space or changed training
    settings (``identity``) unless allowed."""
    sampler, pruner = build_sampler(spec), build_pruner(spec.pruner, spec.train.epochs)
    fingerprint = space_fingerprint(spec)
    try:
        study = optuna.load_study(study_name=spec.name, storage=storage, sampler=sampler,
                                  pruner=pruner)
    except KeyError:
        if not create:
            raise
        try:
            study = optuna.create_study(study_name=spec.name, storage=storage, sampler=sampler,
                                        pruner=pruner, direction=spec.objective.direction)
        except optuna.exceptions.DuplicatedStudyError:  # another worker created it just now
            return open_study(spec, storage, allow_space_change, create,
                              allow_config_change)
        study.set_user_attr("sweep.space", fingerprint)
        study.set_user_attr(STUDY_UID, uuid.uuid4().hex)  # tells a re-created study's checkpoints apart
        study.set_user_attr("sweep.description", spec.description)
        study.set_user_attr("sweep.study_file", str(spec.path))
        study.set_user_attr(SETTINGS, trial_settings(spec))  # what `sweep confirm` replicates
        study.set_user_attr(IDENTITY, identity_of(spec))
        return study
    if check_identity(study, spec, allow_config_change):
        study.set_user_attr(SETTINGS, trial_settings(spec))  # confirm replicates the new ones
    stored = study.user_attrs.get("sweep.space")
    if stored is not None and stored != fingerprint:
        if not allow_space_change:
            raise SpaceChangedError(
                f"study {spec.name!r} was created with another search space than {spec.path} now "
                f"declares; restore the file, use a new study name, or pass --allow-space-change")
        changes = list(study.user_attrs.get("sweep.space_changes", []))
        changes.append({"from": stored, "to": fingerprint})
        study.set_user_attr("sweep.space_changes", changes)
        study.set_user_attr("sweep.space", fingerprint)
    return study
