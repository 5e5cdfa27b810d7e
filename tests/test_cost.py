"""`sweep launch` says what it will cost once its first steps were timed: the trials left, the
pack size, T and the measured seconds per step, and an estimate that follows from them
(``sweep.loop.cost``). No timed assertion: the numbers are checked against each other, against
the study file and against the stores of the same run."""

from __future__ import annotations

import re

import optuna
import pytest
import yaml
from click.testing import CliRunner

from helpers import TINY, plain_storage
from sweep.cli import main
from sweep.loop.cost import Cost, StepClock, duration

_LINE = re.compile(
    r"^cost: (?P<left>\d+) trial\(s\) left, (?P<pack>one at a time|fused packs of (?P<k>\d+)), "
    r"T = (?P<T>\d+) steps each; a step took (?P<s>[\d.e+-]+) s \((?P<timed>\d+) steps timed\): "
    r"about (?P<about>[\d.]+) (?P<unit>s|minutes|hours) if every trial trains to its end "
    r"\((?P=left) x (?P=T) x (?P=s) s / (?P<div>\d+)\)(?P<hint>.*)$", re.M)


def _estimate(match) -> float:
    return int(match["left"]) * int(match["T"]) * float(match["s"]) / int(match["div"])


def _as_printed(seconds: float) -> tuple[float, str]:
    text, unit = duration(seconds).split()
    return float(text), unit


_UNIT_S = {"s": 1, "minutes": 60, "hours": 3600}


def _agrees(match) -> bool:
    """The printed estimate is the product of the printed numbers, within their rounding (the
    seconds per step to 4 significant digits, the estimate to its last printed digit)."""
    about = float(match["about"]) * _UNIT_S[match["unit"]]
    last_digit = 10 ** -len(match["about"].partition(".")[2]) * _UNIT_S[match["unit"]]
    estimate = _estimate(match)
    return abs(about - estimate) <= last_digit / 2 + estimate * 1e-3


# --- the rule, without training -------------------------------------------------------------

def test_the_estimate_is_trials_times_steps_times_seconds_over_the_pack():
    cost = Cost(trials_left=40, pack=8, total_steps=11_250, seconds_per_step=0.0123,
                timed_steps=10, device="cuda", study="warmup_vs_plateau")
    assert cost.estimate_s == 40 * 11_250 * 0.0123 / 8
    match = _LINE.search(cost.line())
    assert match and match["k"] == "8" and match["hint"] == ""
    assert _as_printed(cost.estimate_s) == (float(match["about"]), match["unit"])
    assert _agrees(match)
    cpu = Cost(40, 1, 11_250, 0.5, 10, "cpu", "warmup_vs_plateau")
    assert cpu.line().endswith("; on a CPU the smoke study is the first look: "
                               "sweep launch --study smoke")
    assert "about 62.5 hours" in cpu.line()
    assert "first look" not in Cost(4, 1, 20, 0.1, 5, "cpu", "smoke").line()
    assert [duration(s) for s in (0.44, 12.4, 204, 9000)] == ["0.4 s", "12 s", "3.4 minutes",
                                                             "2.5 hours"]


def test_the_clock_times_the_second_chunk_and_starts_again_with_each_trial():
    """Chunks of 10 steps, 15 per epoch (a 5-step chunk at the epoch's end): the second chunk,
    steps 10-14, is the one timed. A trial of two chunks is not timed; the next one is."""
    said = []
    clock = StepClock("s", 30, "cpu", said.append)
    clock.on_steps(0, [], [])  # before start(): the worker has not planned yet, nothing counts
    clock.start(7, 2)
    clock.start(99, 99)  # a later start (a second study loop) keeps the first plan
    for first in (0, 10, 0, 10, 15):  # trial A: two chunks; trial B: three
        assert not said
        clock.on_steps(first, [0.1] * 5, [2.0] * 5)
    assert len(said) == 1 and said[0] is clock.cost
    assert (clock.cost.timed_steps, clock.cost.trials_left, clock.cost.pack) == (5, 7, 2)
    assert clock.cost.seconds_per_step > 0
    clock.on_steps(25, [], [])
    assert len(said) == 1  # said once


# --- a real launch ----------------------------------------------------------------------------

@pytest.mark.slow
def test_launch_prints_the_cost_line_from_its_first_pack(tiny_cifar, in_tmp):
    """The tiny study (2 steps per epoch, losses read every step) launched as fused packs of 2
    (the pack's guard path; one trial at a time is tests/test_api.py's launch): the line is
    printed once, its numbers follow the study file and the budget, the estimate follows from
    them, and the steps timed fit inside the first trial's wall time as Optuna stored it."""
    doc = yaml.safe_load(TINY.read_text())
    budget, fuse, epochs = 2, 2, 2
    T = doc["data"]["train_size"] // doc["train"]["batch_size"] * epochs
    res = CliRunner().invoke(main, [
        "launch", "--study", str(TINY), "--device", "cpu", "--quiet", "--data-dir",
        str(tiny_cifar), "--trials", str(budget), "--set", f"train.epochs={epochs}", "--set",
        "train.sync_every_steps=1", "--set", f"train.fuse={fuse}"])
    assert res.exit_code == 0, res.output
    assert len(_LINE.findall(res.stderr)) == 1, res.stderr
    match = _LINE.search(res.stderr)
    assert (int(match["left"]), int(match["T"]), int(match["div"])) == (budget, T, fuse)
    assert match["pack"] == f"fused packs of {fuse}"
    assert match["hint"] == ("; on a CPU the smoke study is the first look: "
                             "sweep launch --study smoke")
    assert _agrees(match), match[0]
    # the timed steps came from this launch's training: they fit in its first trial
    study = optuna.load_study(study_name="tiny", storage=plain_storage(f"sqlite:///{in_tmp}/sweep.db"))
    first = min(study.trials, key=lambda t: t.number)
    wall = (first.datetime_complete - first.datetime_start).total_seconds()
    assert 0 < float(match["s"]) * int(match["timed"]) <= wall
    assert "cost:" not in res.stdout  # the result on stdout stays the summary
