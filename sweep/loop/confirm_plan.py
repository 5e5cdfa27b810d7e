"""The confirmation plan: which configurations ``sweep confirm`` retrains with which seeds.

A search reports the luckiest seed of its best region (the winner's curse): a best-of-N value
overstates, and the gap between two best-of-N values says little. The confirmation phase
replicates, over the same N seeds:

* group ``scheduler:<type>``: the best search configuration of each scheduler type (with
  ``--top K`` also ``scheduler:<type>#2`` ... ``#K``), and
* group ``warmup:<steps>``: the overall best configuration at warmup 0, half, the value found
  and double (clamped into the space's warmup range; equal levels merged).

Replicates are ordinary trials, enqueued with their fixed parameters and user attributes
(``sweep.study.phases``: phase, group, seed); they run through the normal worker loop (so they
fill fused packs when the study fuses) under their own budget (``budget.CONFIRM_BUDGET``).
The plan is stored in the study when first made, so re-running ``sweep confirm`` after an
interruption, or while the search is still going on, finishes the same replicates and enqueues
only the missing ones.
"""

from __future__ import annotations

import json
import statistics
from dataclasses import asdict, dataclass

import optuna
from optuna.trial import TrialState

from sweep.errors import ConfirmError
from sweep.loop.budget import CONFIRM_BUDGET, SETTINGS, budget_used
from sweep.stores import study_lock
from sweep.study.phases import CONFIRM, CONFIRM_KEY, GROUP, PHASE, SEED, is_search
from sweep.study.specs import IntParam, StudySpec
from sweep.study.spec import load_study, settings_overrides

DEFAULT_SEEDS, DEFAULT_TOP = 5, 1
PLAN = "sweep.confirm_plan"  # study user attribute: the plan as JSON
# Replicate r trains with seed SEED_BASE + study seed + r: never a search trial's seed (study
# seed + trial number) in any study of fewer than a million trials.
SEED_BASE = 1_000_000


@dataclass(frozen=True)
class Group:
    name: str  # "scheduler:cosine", "scheduler:cosine#2", "warmup:0"
    params: dict  # the fixed Optuna parameters every replicate is enqueued with
    source: int  # the search trial whose configuration it copies


@dataclass(frozen=True)
class Plan:
    seeds: tuple[int, ...]
    top: int
    groups: tuple[Group, ...]

    @property
    def budget(self) -> int:
        return len(self.groups) * len(self.seeds)

    def to_json(self) -> str:
        return json.dumps({"seeds": list(self.seeds), "top": self.top,
                           "groups": [asdict(g) for g in self.groups]}, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "Plan":
        doc = json.loads(text)
        return cls(tuple(doc["seeds"]), doc["top"], tuple(Group(**g) for g in doc["groups"]))

    def keys(self) -> list[tuple[Group, int, str]]:
        """(group, seed, key) of every replicate; the key identifies one trial in the study."""
        return [(g, s, f"{g.name}/seed{s}") for g in self.groups for s in self.seeds]


def _ranked(study: optuna.Study) -> list[optuna.trial.FrozenTrial]:
    complete = [t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
                if is_search(t) and t.value is not None]
    maximize = study.direction == optuna.study.StudyDirection.MAXIMIZE
    return sorted(complete, key=lambda t: (-t.value if maximize else t.value, t.number))


def warmup_levels(found: int, low: int, high: int) -> list[int]:
    """0, half, the found value and double, clamped into [low, high], duplicates merged."""
    levels = [min(max(w, low), high) for w in (0, found // 2, found, 2 * found)]
    return sorted(set(levels))


def make_plan(study: optuna.Study, spec: StudySpec, seeds: int, top: int) -> Plan:
    """The groups to replicate, from the search trials that completed so far."""
    ranked = _ranked(study)
    if not ranked:
        raise ConfirmError(f"study {study.study_name!r} has no complete search trial to confirm; "
                           f"run (or resume) the search first: sweep launch --study {spec.name}")
    types = list(spec.space.scheduler)
    groups = []
    for name in types:
        mine = [t for t in ranked if t.params.get("scheduler", types[0]) == name][:top]
        groups += [Group(f"scheduler:{name}" + (f"#{k + 1}" if k else ""), dict(t.params), t.number)
                   for k, t in enumerate(mine)]
    best = ranked[0]
    warmup = spec.space.warmup_steps
    if isinstance(warmup, IntParam) and "warmup_steps" in best.params:
        for level in warmup_levels(int(best.params["warmup_steps"]), warmup.low, warmup.high):
            groups.append(Group(f"warmup:{level}", {**best.params, "warmup_steps": level},
                                best.number))
    return Plan(tuple(SEED_BASE + spec.seed + r for r in range(seeds)), top, tuple(groups))


def stored_plan(study: optuna.Study) -> Plan | None:
    text = study.user_attrs.get(PLAN)
    return Plan.from_json(text) if text else None


def resolve_plan(study: optuna.Study, spec: StudySpec, seeds: int | None,
                 top: int | None) -> Plan:
    """The stored plan (a resumed confirmation), else a new one; writes nothing (a plan that
    cannot be made, or flags that contradict the stored one, raise ``ConfirmError``)."""
    plan = stored_plan(study)
    if plan is not None:
        if (seeds is not None and seeds != len(plan.seeds)) or (top is not None and top != plan.top):
            raise ConfirmError(
                f"study {study.study_name!r} already has a confirmation with {len(plan.seeds)} "
                f"seeds and --top {plan.top}; run sweep confirm without --seeds/--top (or with "
                f"those values) to finish it, or confirm under a new study name")
        return plan
    return make_plan(study, spec, DEFAULT_SEEDS if seeds is None else seeds,
                     DEFAULT_TOP if top is None else top)


def store_plan(study: optuna.Study, plan: Plan) -> None:
    """Keep the plan and its budget in the study, once: a resumed confirmation reuses them."""
    if stored_plan(study) is None:
        study.set_user_attr(PLAN, plan.to_json())
        study.set_user_attr(CONFIRM_BUDGET, plan.budget)


def enqueue_missing(study: optuna.Study, plan: Plan) -> int:
    """Enqueue every replicate of ``plan`` that has no trial yet (in any state: a waiting,
    running, finished or re-enqueued one is already its trial); returns how many."""
    have = {t.user_attrs.get(CONFIRM_KEY) for t in study.get_trials(deepcopy=False)}
    added = 0
    for group, seed, key in plan.keys():
        if key in have:
            continue
        study.enqueue_trial(group.params, user_attrs={PHASE: CONFIRM, GROUP: group.name,
                                                      SEED: seed, CONFIRM_KEY: key})
        added += 1
    return added


def prepare_replicates(study: optuna.Study, plan: Plan, storage_url: str) -> Plan:
    """Store ``plan`` unless the study has one, and enqueue its missing replicates; returns the
    stored plan. Several ``sweep confirm`` runs may start at once (one per node, to share the
    replicates): under the study's lock the first stores and enqueues, the others find it done
    (without it, each enqueued every replicate: the same seed trained twice, others never)."""
    with study_lock(storage_url, study.study_name, "confirm"):
        store_plan(study, plan)
        plan = stored_plan(study)
        enqueue_missing(study, plan)
    return plan


def trial_seconds(study: optuna.Study) -> float | None:
    """Median wall time of the study's complete trials (what one replicate should take)."""
    times = [(t.datetime_complete - t.datetime_start).total_seconds()
             for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
             if t.datetime_start and t.datetime_complete]
    return statistics.median(times) if times else None


def budget_line(study: optuna.Study, plan: Plan) -> str:
    """What is about to run, said before it starts."""
    done = budget_used(study, CONFIRM)
    left = plan.budget - done
    each = trial_seconds(study)
    estimate = (f"; about {_minutes(left * each)} at the median {_minutes(each)} per complete "
                f"trial of this study, one worker" if each and left else "")
    return (f"confirmation of {study.study_name!r}: {plan.budget} trials ({len(plan.groups)} "
            f"groups x {len(plan.seeds)} seeds: {', '.join(g.name for g in plan.groups)}); "
            f"{done} done, {left} to run{estimate}")


def _minutes(seconds: float) -> str:
    return f"{seconds / 60:.1f} min" if seconds >= 60 else f"{seconds:.0f} s"


def as_searched(spec: StudySpec, study: optuna.Study, overrides_given: bool) -> tuple[StudySpec, list[str]]:
    """The spec with the trial settings the search ran with (its ``--set`` flags are stored in
    the study when it is created): a replicate with other epochs or data would not replicate.
    Returns (spec, the flags it took from the study); flags given that contradict the search's
    raise ``ConfirmError``."""
    stored = study.user_attrs.get(SETTINGS)
    flags = settings_overrides(spec, stored) if stored else []
    if not flags:
        return spec, []
    if overrides_given:
        raise ConfirmError(
            f"study {spec.name!r} was searched with other settings than these: "
            f"{' '.join('--set ' + f for f in flags)}; pass the search's --set flags to sweep "
            f"confirm, or none to reuse them")
    return load_study(spec.path, flags), flags
