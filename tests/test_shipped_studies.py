"""Every shipped study stays valid when a user shrinks it with ``--set``: any ``train.epochs``
from 2 up and any ``data.train_size`` down to two batches (issue 12, part 2). A user trying a
shipped study small must never meet an error in a file they did not write.

Loading goes through the real loader with the same overrides ``sweep launch --set`` applies;
each scheduler of the space is then resolved into a trial config at the extremes of its
parameters (the loader itself checks every combination of extremes against the schedule rules).
"""

from __future__ import annotations

import itertools

import optuna
import pytest

from sweep.study.specs import Fixed
from sweep.study.spec import available_studies, load_study
from sweep.study.space_rules import param_values
from sweep.study.space import trial_config

STUDIES = available_studies()
EPOCHS = range(2, 41)


def _train_sizes(name: str) -> list[int]:
    """Two batches, a few sizes between (one not a multiple of the batch), the file's own size."""
    spec = load_study(name)
    batch, full = spec.train.batch_size, spec.data.train_size
    sizes = {2 * batch, 2 * batch + 1, 3 * batch, 5 * batch, 10 * batch, full // 2, full}
    return sorted(n for n in sizes if 2 * batch <= n <= full)


def test_the_shipped_studies_are_there():
    assert {"smoke", "warmup_vs_plateau", "pruning_bench", "lr_wd"} <= set(STUDIES)


@pytest.mark.parametrize("name", STUDIES)
def test_a_shipped_study_loads_for_every_length_and_size(name):
    for epochs, size in itertools.product(EPOCHS, _train_sizes(name)):
        overrides = [f"train.epochs={epochs}", f"data.train_size={size}"]
        spec = load_study(name, overrides)  # raises StudyFileError on any rule it breaks
        assert (spec.train.epochs, spec.data.train_size) == (epochs, size)
        T = spec.steps_per_epoch * epochs
        warmups = param_values(spec.space.warmup_steps)
        assert 0 <= min(warmups) <= max(warmups) <= T - 1, (overrides, warmups)
        for scheduler, params in spec.space.scheduler.items():
            searched = {**params, **spec.space.train}  # the training fields at their extremes too
            keys = [k for k, p in searched.items() if not isinstance(p, Fixed)]
            for combo in itertools.product(*(param_values(searched[k]) for k in keys)):
                fixed = {"scheduler": scheduler, "warmup_steps": max(warmups),
                         "base_lr": max(param_values(spec.space.base_lr)), **dict(zip(keys, combo))}
                cfg = trial_config(optuna.trial.FixedTrial(fixed), spec)
                for m in cfg.schedule.params.get("milestones_epochs") or ():
                    assert 1 <= m <= epochs - 1, (overrides, cfg.schedule.params)
