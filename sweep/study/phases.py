"""A study's two phases, and which trials each part of Optuna may see.

One Optuna study holds the *search* (trials the sampler proposes) and its *confirmation*
(``sweep confirm``: chosen configurations retrained with fresh seeds, enqueued with fixed
parameters). Confirmation trials are ordinary trials in every store, marked by user attributes
set when they are enqueued (``PHASE``, ``GROUP``, ``SEED``), so that:

* the sampler never learns from them (``SearchOnlySampler``): a replicate of the best
  configuration is not a new observation of the search, and feeding N copies of the winner
  back would collapse TPE onto it;
* the pruner never stops them and never compares with them (``sweep.study.pruning``);
* the budgets count them apart (``sweep.loop.budget``).

``StudyView`` is the one mechanism behind all of this: the same study (same storage, id and
per-ask trial cache) whose ``get_trials``/``_get_trials`` return only the trials a predicate
keeps. It is what Optuna's own ``HyperbandPruner`` does for its brackets (``_BracketStudy``).
"""

from __future__ import annotations

from typing import Callable

import optuna
from optuna.trial import FrozenTrial, TrialState

PHASE = "sweep.phase"  # user attribute: SEARCH (absent) or CONFIRM
GROUP = "sweep.group"  # user attribute of a confirmation trial, e.g. "scheduler:cosine"
SEED = "sweep.seed"  # user attribute: the training seed, overriding seed + trial number
SEARCH, CONFIRM = "search", "confirm"
SAMPLER_SAW = "sweep.sampler_saw"  # system attribute: trial numbers the sampler was shown
CONFIRM_KEY = "sweep.confirm_key"  # user attribute: group and seed, one trial per key
#: what a trial was enqueued with, which its retry must keep (else a retried replicate would
#: come back as a search trial with the wrong seed)
ENQUEUED_ATTRS = (PHASE, GROUP, SEED, CONFIRM_KEY)


def phase_of(trial) -> str:
    """SEARCH or CONFIRM; a trial without the attribute is a search trial."""
    return str(trial.user_attrs.get(PHASE, SEARCH))


def is_search(trial) -> bool:
    return phase_of(trial) == SEARCH


class StudyView(optuna.study.Study):
    """``study`` showing only the trials ``keep`` accepts. Shares the study's storage, id and
    the trial cache that ``Study.ask`` resets, so building one per call costs no storage read."""

    def __init__(self, study: optuna.Study, keep: Callable[[FrozenTrial], bool]):
        # No Study.__init__: it would look the study up in the storage again.
        self.__dict__.update(study.__dict__)
        self._keep = keep

    def _get_trials(self, deepcopy: bool = True, states=None, use_cache: bool = False):
        return [t for t in super()._get_trials(deepcopy, states, use_cache) if self._keep(t)]

    def _get_best_trial(self, deepcopy: bool) -> FrozenTrial:
        complete = self._get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
        if not complete:
            raise ValueError("No trials are completed yet.")
        pick = max if self.direction == optuna.study.StudyDirection.MAXIMIZE else min
        best = pick(complete, key=lambda t: t.value)
        return self._storage.get_trial(best._trial_id) if deepcopy else best


def search_view(study: optuna.Study) -> StudyView:
    """The study as the search sees it: without confirmation trials."""
    return StudyView(study, is_search)


class SearchOnlySampler(optuna.samplers.BaseSampler):
    """Wraps a sampler so that it sees the study without confirmation trials.

    Every new trial records (system attribute ``SAMPLER_SAW``) the numbers of the finished
    trials the sampler was shown, so anyone can check from the storage alone that no
    confirmation trial was ever among them."""

    def __init__(self, sampler: optuna.samplers.BaseSampler):
        self.wrapped = sampler

    def infer_relative_search_space(self, study, trial):
        return self.wrapped.infer_relative_search_space(search_view(study), trial)

    def sample_relative(self, study, trial, search_space):
        return self.wrapped.sample_relative(search_view(study), trial, search_space)

    def sample_independent(self, study, trial, param_name, param_distribution):
        return self.wrapped.sample_independent(search_view(study), trial, param_name,
                                               param_distribution)

    def before_trial(self, study, trial) -> None:
        view = search_view(study)
        seen = [t.number for t in view._get_trials(deepcopy=False, use_cache=True)
                if t.state.is_finished()]
        study._storage.set_trial_system_attr(trial._trial_id, SAMPLER_SAW, seen)
        self.wrapped.before_trial(view, trial)

    def after_trial(self, study, trial, state, values) -> None:
        self.wrapped.after_trial(search_view(study), trial, state, values)

    def reseed_rng(self) -> None:
        self.wrapped.reseed_rng()


def phase_tags(trial) -> dict[str, str]:
    """MLflow tags of a trial's run: its phase, and a confirmation trial's group."""
    tags = {PHASE: phase_of(trial)}
    if trial.user_attrs.get(GROUP) is not None:
        tags[GROUP] = str(trial.user_attrs[GROUP])
    return tags
