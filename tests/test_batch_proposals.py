"""A fused pack asks its K trials before any of them reports (and concurrent workers ask while
others train): TPE must treat such a batch as one (``constant_liar``, loop.study.build_sampler).
No training: a real in-memory Optuna study, told a synthetic objective."""

from __future__ import annotations

import math
from collections import Counter

import optuna


from sweep.loop.study import build_sampler
from sweep.study.space import trial_config
from sweep.study.spec import load_study

K = 16  # auto K on a GPU


def _batch(constant_liar: bool):
    """20 finished trials of the shipped study in which cosine around base LR 0.1 scored best,
    then K proposals asked at once (none told): how many chose each scheduler."""
    spec = load_study("warmup_vs_plateau")
    study = optuna.create_study(direction="maximize",
                                sampler=build_sampler(spec, constant_liar=constant_liar))
    for _ in range(20):
        trial = study.ask()
        cfg = trial_config(trial, spec)
        good = cfg.schedule.name == "cosine"
        study.tell(trial, (0.9 if good else 0.5) - 0.1 * abs(math.log10(cfg.base_lr / 0.1)))
    batch = [trial_config(study.ask(), spec) for _ in range(K)]
    return Counter(c.schedule.name for c in batch)


def test_k_proposals_asked_at_once_spread_over_the_space():
    liar_schedulers = _batch(constant_liar=True)
    blind_schedulers = _batch(constant_liar=False)
    # Without the liar the batch crowds the best region (measured: cosine 13 of 16); with it
    # the running trials count as bad results and the batch spreads (measured: cosine 9, the
    # other 7 over three more schedulers).
    assert blind_schedulers.most_common(1)[0][1] >= 12, blind_schedulers
    assert liar_schedulers.most_common(1)[0][1] <= 10, liar_schedulers
    assert sum(n for name, n in liar_schedulers.items() if name != "cosine") > \
        sum(n for name, n in blind_schedulers.items() if name != "cosine")
