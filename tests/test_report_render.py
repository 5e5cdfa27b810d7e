"""The report document, built once and written as Markdown and HTML, from hand-made data (no
stores): the two renderings carry the same headings in the same order, a scheduler type with
too few complete trials is said to be so and never ranked on pruned trials' last values, and
a confirmation's answer comes first."""

from __future__ import annotations

import re

from sweep.views.report_model import (Comparison, Confirmation, GroupStats, ReportData,
                                      TrialRow, comparisons)
from sweep.views.report_render import Figures, build_document, to_html, to_markdown
from sweep.views.stats import t_interval, welch


def _row(number, scheduler, outcome, value=None, last=None):
    return TrialRow(number, outcome, {"scheduler": scheduler, "warmup_steps": 10, "base_lr": 0.1},
                    value if outcome == "COMPLETE" else None, last if last is not None else value,
                    None, None, 3.0 if outcome == "COMPLETE" else 1.0,
                    "pruner" if outcome == "PRUNED" else "", 10.0)


def _data(rows, confirmation=None) -> ReportData:
    complete = [r for r in rows if r.outcome == "COMPLETE"]
    return ReportData(
        study="s", description="Does warmup + a fixed decay beat plateau?", metric="val_acc",
        maximize=True, budget=len(rows), used=len(rows),
        counts={"complete": len(complete), "pruned": len(rows) - len(complete), "diverged": 0,
                "failed": 0, "running": 0},
        wall_seconds=100.0, trial_seconds=90.0, devices=["cpu"], hosts=["h"],
        schedulers=["cosine", "plateau"], epochs=3, steps_per_epoch=10, training={}, rows=rows,
        best=max(complete, key=lambda r: r.value), curves=[], importances=[],
        importance_notes=[], experiment_id="1", parent_run_id=None, tracking_uri="sqlite:///m.db",
        storage_url="sqlite:///s.db", confirmation=confirmation)


# plateau's pruned trials reported higher last values than any complete cosine trial
ROWS = ([_row(i, "cosine", "COMPLETE", 0.50 + 0.01 * i) for i in range(4)]
        + [_row(4 + i, "plateau", "PRUNED", last=0.9) for i in range(3)]
        + [_row(7, "plateau", "COMPLETE", 0.40)])


def _headings_md(md: str) -> list[str]:
    return [re.sub(r"`", "", line.lstrip("#").strip()) for line in md.splitlines()
            if line.startswith("#")]


def _headings_html(text: str) -> list[str]:
    return [re.sub(r"<[^>]+>", "", h) for h in re.findall(r"<h\d>(.*?)</h\d>", text)]


def test_markdown_and_html_are_one_document():
    doc = build_document(_data(ROWS), Figures({"schedulers": "schedulers.png"}))
    md, html = to_markdown(doc), to_html(doc, "t")
    assert _headings_md(md) == _headings_html(html)
    assert "Scheduler types" in _headings_html(html)  # the heading the old HTML skipped
    assert "](schedulers.png)" in md and "src='schedulers.png'" in html


def test_a_type_with_too_few_complete_trials_is_said_so_and_not_ranked():
    md = to_markdown(build_document(_data(ROWS), Figures()))
    glance = md.split("## At a glance (search)")[1].split("## Run")[0]
    assert "Too few complete trials to be compared (fewer than 3): plateau (1 complete of 4: " \
           "3 pruned" in glance
    ranking = next(line for line in glance.splitlines() if line.startswith("- Best-of-search per"))
    assert "cosine" in ranking and "plateau" not in ranking and "0.9" not in ranking
    assert "beats" not in md  # the search alone never claims a winner
    assert "not answered by the search" in md and "sweep confirm --study s" in md
    assert "| plateau | 4 | 1 | 3 | 0 | 0 | 0.4 | 0.4 |" in md  # complete trials only


def _group(name, val, test=None):
    test = test if test is not None else [v - 0.01 for v in val]
    return GroupStats(name, {"scheduler": "cosine"}, 2, len(val), len(val), 0, 0, 0, val, test,
                      t_interval(val), t_interval(test))


def test_a_confirmed_answer_comes_first_with_verdicts_only_where_they_hold():
    groups = [_group("scheduler:cosine", [0.60, 0.61, 0.62]),
              _group("scheduler:plateau", [0.50, 0.51, 0.52]),
              _group("warmup:0", [0.600, 0.612, 0.605]), _group("warmup:20", [0.604, 0.601, 0.611])]
    cmps = comparisons(groups)
    assert [c.question for c in cmps] == ["best fixed decay vs ReduceLROnPlateau",
                                          "warmup 20 vs 0 steps"]
    conf = Confirmation([1, 2, 3], 1, 12, 12, groups, cmps)
    md = to_markdown(build_document(_data(ROWS, conf), Figures()))
    assert md.index("## Answer (confirmed)") < md.index("## At a glance")
    lines = md.splitlines()
    plateau = next(line for line in lines if line.startswith("- **best fixed decay"))
    assert "scheduler:cosine is better: scheduler:cosine - scheduler:plateau = +10.00 points" in plateau
    warmup = next(line for line in lines if line.startswith("- **warmup 20 vs 0"))
    assert "no detectable difference with 3 seeds" in warmup and "better" not in warmup
    assert "Welch t interval" in md and "normal approximation" in md


def test_the_fixed_decay_is_chosen_on_validation_never_on_test():
    # step has the better test accuracy, cosine the better validation accuracy
    groups = [_group("scheduler:cosine", [0.60, 0.61], test=[0.40, 0.41]),
              _group("scheduler:step", [0.55, 0.56], test=[0.70, 0.71]),
              _group("scheduler:plateau", [0.50, 0.52])]
    (cmp,) = comparisons(groups)
    assert isinstance(cmp, Comparison) and cmp.val.a == "scheduler:cosine"
    assert cmp.val.diff == welch([0.60, 0.61], [0.50, 0.52]).diff
