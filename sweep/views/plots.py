"""The report's figures: matplotlib ``Figure`` objects (Agg, no pyplot state), one per question.

Every function takes plain data from ``sweep.views.report_model`` and returns a figure; nothing here reads a
store or writes a file. Units go in axis labels; learning rates are on log axes; colours are
fixed per scheduler type across all figures so a reader can follow one type from plot to plot.
"""

from __future__ import annotations

import math
from typing import Mapping, Sequence

import numpy as np

# Outcome colours, the same in the history and the timeline.
OUTCOME_COLOURS = {"COMPLETE": "#2a9d57", "PRUNED": "#e9a23b", "DIVERGED": "#d62728",
                   "FAIL": "#444444"}
_PALETTE = ("#1f77b4", "#ff7f0e", "#2ca02c", "#9467bd", "#8c564b", "#e377c2", "#17becf",
            "#bcbd22", "#7f7f7f", "#d62728")


def scheduler_colours(names: Sequence[str]) -> dict[str, str]:
    """A fixed colour per scheduler type, in the order the study declares them."""
    return {name: _PALETTE[i % len(_PALETTE)] for i, name in enumerate(names)}


def _figure(width: float, height: float):
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100, layout="constrained")
    return fig


def _style(ax, xlabel: str, ylabel: str, title: str | None = None) -> None:
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title, fontsize=11)
    ax.grid(alpha=0.3)


def scheduler_strip(groups: Mapping[str, Sequence[float]], pruned: Mapping[str, Sequence[float]],
                    colours: Mapping[str, str], metric_label: str):
    """Box + jittered points of the final objective per scheduler type (complete trials), with
    the last reported value of pruned trials as hollow grey markers."""
    names = list(groups)
    fig = _figure(max(5.5, 1.3 * len(names) + 2.5), 4.2)
    ax = fig.add_subplot()
    rng = np.random.default_rng(0)  # fixed jitter: the same study gives the same picture
    data = [list(groups[n]) for n in names]
    positions = range(1, len(names) + 1)
    if any(data):
        ax.boxplot([d if d else [math.nan] for d in data], positions=list(positions), widths=0.5,
                   showfliers=False, medianprops={"color": "black"})
    for pos, name in zip(positions, names):
        values = groups[name]
        ax.scatter(pos + rng.uniform(-0.15, 0.15, len(values)), values, s=28, zorder=3,
                   color=colours[name], edgecolor="white", linewidth=0.5)
        stopped = pruned.get(name, [])
        ax.scatter(pos + rng.uniform(-0.15, 0.15, len(stopped)), stopped, s=24, zorder=2,
                   facecolor="none", edgecolor="#888888")
    ax.set_xticks(list(positions), [f"{n}\n(n={len(groups[n])}"
                                    + (f" + {len(pruned.get(n, []))} pruned)" if pruned.get(n) else ")")
                                    for n in names])
    _style(ax, "scheduler type (number of complete trials)", metric_label,
           f"{metric_label} by scheduler type")
    from matplotlib.lines import Line2D

    ax.legend(handles=[Line2D([], [], ls="", marker="o", color="#555555", label="complete trial"),
                       Line2D([], [], ls="", marker="o", markerfacecolor="none",
                              markeredgecolor="#888888", label="pruned or diverged (last value)")],
              loc="best", fontsize=8)
    return fig


def _log_axis(axis) -> None:
    """A log axis with plain tick labels at 1, 2 and 5 x 10^k (readable over narrow ranges)."""
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    axis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    axis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    axis.set_minor_formatter(NullFormatter())


def warmup_effect(points: Sequence[dict], colours: Mapping[str, str], metric_label: str):
    """Two panels: the objective against ``warmup_steps`` and against ``base_lr`` (log x),
    coloured by scheduler. ``points``: dicts with warmup_steps, base_lr, scheduler, value,
    complete (bool; pruned trials are drawn hollow at their last reported value)."""
    from matplotlib.lines import Line2D
    from matplotlib.ticker import MaxNLocator

    fig = _figure(11, 4.2)
    left, right = fig.subplots(1, 2, sharey=True)
    for ax, key in ((left, "warmup_steps"), (right, "base_lr")):
        for name, colour in colours.items():
            for complete in (True, False):
                sel = [p for p in points if p["scheduler"] == name and p["complete"] == complete
                       and p.get(key) is not None and p["value"] is not None]
                if sel:
                    ax.scatter([p[key] for p in sel], [p["value"] for p in sel],
                               s=34 if complete else 26, color=colour if complete else "none",
                               edgecolor=colour, zorder=3 if complete else 2)
    _style(left, "warmup length (optimizer steps)", metric_label, f"{metric_label} vs warmup length")
    _style(right, "base learning rate (log scale)", "", f"{metric_label} vs base LR")
    left.xaxis.set_major_locator(MaxNLocator(integer=True))
    right.set_xscale("log")
    _log_axis(right.xaxis)
    used = [n for n in colours if any(p["scheduler"] == n for p in points)]
    handles = [Line2D([], [], ls="", marker="o", color=colours[n], label=n) for n in used]
    if any(not p["complete"] for p in points):
        handles.append(Line2D([], [], ls="", marker="o", markerfacecolor="none",
                              markeredgecolor="#666666", label="hollow: pruned\n(last value)"))
    if handles:
        fig.legend(handles=handles, loc="outside right center", fontsize=8, title="scheduler")
    return fig


def parameter_effects(points: Sequence[dict], scales: Mapping[str, str],
                      colours: Mapping[str, str], metric_label: str):
    """One panel per searched parameter (``scales``: name -> "log", "linear" or "categorical"):
    the objective against its value, coloured by scheduler, pruned trials hollow.
    ``points``: dicts with params (the trial's), scheduler, value, complete."""
    n = len(scales)
    cols = min(n, 3)
    rows = math.ceil(n / cols)
    fig = _figure(4.2 * cols, 0.4 + 3.2 * rows)
    axes = np.atleast_1d(fig.subplots(rows, cols, sharey=True)).ravel()
    for ax, (name, scale) in zip(axes, scales.items()):
        have = [p for p in points if name in p["params"] and p["value"] is not None]
        levels = sorted({str(p["params"][name]) for p in have})  # categorical: one x per choice
        for scheduler, colour in colours.items():
            for complete in (True, False):
                sel = [p for p in have if p["scheduler"] == scheduler and p["complete"] == complete]
                if sel:
                    xs = [levels.index(str(p["params"][name])) if scale == "categorical"
                          else p["params"][name] for p in sel]
                    ax.scatter(xs, [p["value"] for p in sel], s=34 if complete else 26,
                               color=colour if complete else "none", edgecolor=colour,
                               zorder=3 if complete else 2)
        _style(ax, f"{name}{' (log scale)' if scale == 'log' else ''}", metric_label,
               f"{metric_label} vs {name}")
        if scale == "categorical":
            ax.set_xticks(range(len(levels)), levels)
            ax.set_xlim(-0.5, len(levels) - 0.5)
        elif scale == "log":
            ax.set_xscale("log")
            _log_axis(ax.xaxis)
            ax.tick_params(axis="x", labelrotation=30)  # 1-2-5 ticks crowd a narrow panel
    for ax in axes[n:]:
        ax.set_visible(False)
    return fig


def top_k_curves(curves: Sequence[dict], metric_label: str, epochs: int | None):
    """LR (log y, top) and validation accuracy (bottom) per epoch of the top-k trials, on one
    shared epoch axis. ``curves``: dicts with label, lr_epoch (x in epochs), lr, val_epoch, val."""
    fig = _figure(10, 6.5)
    top, bottom = fig.subplots(2, 1, sharex=True)
    for i, c in enumerate(curves):
        colour = _PALETTE[i % len(_PALETTE)]
        if c["lr"]:
            top.plot(c["lr_epoch"], c["lr"], lw=1.4, color=colour, label=c["label"])
        if c["val"]:
            bottom.plot(c["val_epoch"], c["val"], lw=1.6, marker="o", ms=3.5, color=colour)
    if any(v > 0 for c in curves for v in c["lr"]):
        top.set_yscale("log")
    _style(top, "", "learning rate (log scale)", f"Learning-rate schedule of the top {len(curves)} trials")
    _style(bottom, "epoch (1 epoch = steps_per_epoch optimizer steps)", "validation accuracy",
           "validation accuracy per epoch of the same trials")
    if epochs:
        bottom.set_xlim(0, epochs)
    if curves:
        top.legend(loc="lower center", fontsize=8, ncols=1)
    return fig


def importances(groups: Sequence[tuple[str, Mapping[str, float]]]):
    """One horizontal bar panel per group (title, {param: importance in [0, 1]})."""
    n = max(1, len(groups))
    cols = min(n, 3)
    rows = math.ceil(n / cols)
    fig = _figure(4.2 * cols, 0.6 + 2.6 * rows)
    axes = np.atleast_1d(fig.subplots(rows, cols)).ravel()
    for ax, (title, values) in zip(axes, groups):
        items = sorted(values.items(), key=lambda kv: kv[1])
        ax.barh([k for k, _ in items], [v for _, v in items], color="#4c72b0")
        ax.set_xlim(0, 1)
        for y, (_, v) in enumerate(items):
            ax.text(min(v + 0.02, 0.85), y, f"{v:.2f}", va="center", fontsize=8)
        _style(ax, "fANOVA importance (share of variance)", "", title)
    for ax in axes[len(groups):]:
        ax.set_visible(False)
    return fig


def history(points: Sequence[dict], metric_label: str, maximize: bool):
    """Objective per trial number (outcome-coloured) and the best-so-far line (complete only).
    ``points``: dicts with number, outcome, value (the last reported value for stopped trials)."""
    fig = _figure(10, 4.2)
    ax = fig.add_subplot()
    for outcome, colour in OUTCOME_COLOURS.items():
        sel = [p for p in points if p["outcome"] == outcome and p["value"] is not None]
        if sel:
            ax.scatter([p["number"] for p in sel], [p["value"] for p in sel], s=30, color=colour,
                       marker="o" if outcome == "COMPLETE" else "x", zorder=3,
                       label=outcome.lower() + ("" if outcome == "COMPLETE" else " (last value)"))
    best, xs, ys = None, [], []
    for p in sorted(points, key=lambda p: p["number"]):
        if p["outcome"] == "COMPLETE" and p["value"] is not None:
            if best is None or (p["value"] > best if maximize else p["value"] < best):
                best = p["value"]
        if best is not None:
            xs.append(p["number"])
            ys.append(best)
    if xs:
        ax.step(xs, ys, where="post", color="black", lw=1.3, label="best so far")
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    _style(ax, "trial number", metric_label, "Optimization history")
    ax.legend(loc="best", fontsize=8)
    return fig


def timeline(rows: Sequence[dict], epochs: int | None):
    """How far each trial trained: a bar per trial from 0 to the epoch it stopped at, coloured
    by outcome (complete / pruned / diverged / failed), stopped bars labelled with the reason.
    ``rows``: number, outcome, stopped_epoch, reason."""
    height = min(12.0, 1.4 + 0.22 * max(len(rows), 4))
    fig = _figure(10, height)
    ax = fig.add_subplot()
    for r in rows:
        width = r["stopped_epoch"] or 0.02
        ax.barh(r["number"], width, color=OUTCOME_COLOURS[r["outcome"]], height=0.7)
        if r["outcome"] != "COMPLETE":
            ax.text(width, r["number"], f" {r.get('reason') or r['outcome'].lower()} "
                    f"@ {width:.3g}", va="center", ha="left" if not epochs or width < 0.8 * epochs
                    else "right", fontsize=7, color="black")
    from matplotlib.patches import Patch

    seen = [o for o in OUTCOME_COLOURS if any(r["outcome"] == o for r in rows)]
    # outside the axes: complete bars run the full width, so no corner inside is free
    fig.legend([Patch(color=OUTCOME_COLOURS[o]) for o in seen],
               [{"FAIL": "failed"}.get(o, o.lower()) for o in seen], loc="outside right upper",
               fontsize=8, title="outcome")
    if len(rows) <= 40:
        ax.set_yticks([r["number"] for r in rows])
    ax.tick_params(axis="y", labelsize=8)
    ax.invert_yaxis()
    if epochs:
        ax.set_xlim(0, epochs)
        ax.axvline(epochs, color="#999999", lw=0.8, ls="--")
    _style(ax, "epochs trained before the trial stopped", "trial number",
           "Pruning and divergence timeline")
    return fig


def _mean_and_interval(ax, x: float, values: Sequence[float], interval, colour: str,
                       rng, jitter: float = 0.06) -> None:
    """Replicates as small dots, their mean as a square with the 95% interval as error bar."""
    if values:
        ax.scatter(x + rng.uniform(-jitter, jitter, len(values)), [100 * v for v in values], s=14,
                   color=colour, alpha=0.55, zorder=2, edgecolor="none")
    if interval.mean is not None:
        err = None
        if interval.low is not None:
            err = [[100 * (interval.mean - interval.low)], [100 * (interval.high - interval.mean)]]
        ax.errorbar([x], [100 * interval.mean], yerr=err, fmt="s", color=colour, ms=6, capsize=5,
                    lw=1.6, zorder=3)


def group_intervals(groups: Sequence[dict]):
    """Accuracy per confirmation group: every replicate, the mean and its 95% t interval, for
    validation (left of each tick) and test (right). ``groups``: dicts with name, val_values,
    test_values, val and test (``stats.Interval``)."""
    from matplotlib.lines import Line2D

    fig = _figure(max(6.0, 1.1 * len(groups) + 3.0), 4.4)
    ax = fig.add_subplot()
    rng = np.random.default_rng(0)
    for i, g in enumerate(groups):
        _mean_and_interval(ax, i - 0.15, g["val_values"], g["val"], "#1f77b4", rng)
        _mean_and_interval(ax, i + 0.15, g["test_values"], g["test"], "#ff7f0e", rng)
    ax.set_xticks(range(len(groups)), [f"{g['name']}\n(n={g['val'].n})" for g in groups],
                  fontsize=8)
    _style(ax, "confirmation group (complete replicates)", "final accuracy (%)",
           "Accuracy per group: replicates, mean and 95% t interval")
    ax.legend(handles=[Line2D([], [], ls="", marker="s", color="#1f77b4", label="validation"),
                       Line2D([], [], ls="", marker="s", color="#ff7f0e",
                              label="test (reported, not used to choose)")],
              loc="best", fontsize=8)
    return fig


def warmup_intervals(levels: Sequence[dict]):
    """Warmup length (optimizer steps) vs accuracy of the best configuration's replicates:
    mean and 95% t interval, validation and test. ``levels``: dicts with warmup_steps,
    val_values, test_values, val, test."""
    from matplotlib.lines import Line2D

    fig = _figure(6.5, 4.2)
    ax = fig.add_subplot()
    rng = np.random.default_rng(0)
    span = max([lv["warmup_steps"] for lv in levels] + [1])
    shift = 0.012 * span  # validation and test side by side at each length
    for lv in levels:
        w = lv["warmup_steps"]
        for x, key, colour in ((w - shift, "val", "#1f77b4"), (w + shift, "test", "#ff7f0e")):
            _mean_and_interval(ax, x, lv[f"{key}_values"], lv[key], colour, rng, shift / 2)
    for key, colour in (("val", "#1f77b4"), ("test", "#ff7f0e")):
        pts = [(lv["warmup_steps"], 100 * lv[key].mean) for lv in levels if lv[key].mean is not None]
        if len(pts) > 1:
            ax.plot(*zip(*pts), color=colour, lw=0.8, alpha=0.6)
    ax.set_xticks([lv["warmup_steps"] for lv in levels])
    _style(ax, "warmup length (optimizer steps)", "final accuracy (%)",
           "Warmup length vs accuracy (mean, 95% t interval)")
    ax.legend(handles=[Line2D([], [], ls="", marker="s", color="#1f77b4", label="validation"),
                       Line2D([], [], ls="", marker="s", color="#ff7f0e", label="test")],
              loc="best", fontsize=8)
    return fig
