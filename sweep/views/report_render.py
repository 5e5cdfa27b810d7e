"""The report as one document, built once from ``ReportData`` and written twice: Markdown
(``summary.md``) and self-contained HTML (``index.html``). Every sentence, table and figure is
decided in ``build_document``; the two writers only spell blocks, so the renderings cannot
drift apart. Inline markup in block text: `code` and **bold**.
"""

from __future__ import annotations

import html
import re
import statistics
from dataclasses import dataclass, field

from sweep.base.urls import mask_url
from sweep.views import stats
from sweep.views.report_model import (DEFAULT_TOP_K, MIN_COMPARE_TRIALS, NO_DECAY, Confirmation, GroupStats, ReportData, fmt, scheduler_table,
                                      spearman)


# --- blocks ---------------------------------------------------------------------------------------

@dataclass
class Heading:
    level: int
    text: str


@dataclass
class Para:
    text: str
    cls: str = ""  # "q": the question; "cap": a caption


@dataclass
class Bullets:
    items: list[str]
    cls: str = ""


@dataclass
class Table:
    header: list[str] | None  # None: a key/value table (first column as row headings)
    rows: list[list[str]]


@dataclass
class Image:
    file: str
    alt: str


@dataclass
class Figures:
    """File names (relative to the report folder) of the figures that were drawn."""

    files: dict = field(default_factory=dict)  # key -> file name


# --- the document ---------------------------------------------------------------------------------

def _pct(v: float | None) -> str:
    return "-" if v is None else f"{100 * v:.2f}%"


def _interval(i: stats.Interval) -> str:
    if i.n == 0:
        return "no complete replicate"
    if i.low is None:
        return f"{_pct(i.mean)} (n=1, no interval)"
    return (f"{_pct(i.mean)} (95% CI {100 * i.low:.2f} to {100 * i.high:.2f}, sd "
            f"{100 * i.std:.2f}, n={i.n})")


def _model_text(training: dict) -> str:
    """``resnet20`` or ``mypackage.nets:build_net {"channels": 32} (254,084 parameters)``, as
    the trials logged it (older trials logged the model only)."""
    text = str(training.get("model") or "?")
    if training.get("model_args") not in (None, "{}"):
        text += f" {training['model_args']}"
    if training.get("model_parameters"):
        text += f" ({int(training['model_parameters']):,} parameters)"
    return text


def _config(params: dict) -> str:
    return ", ".join(f"{k}={fmt(v)}" for k, v in params.items())


def answer_lines(c: Confirmation, study: str) -> list[str]:
    """The confirmed answer: comparisons first (a verdict only where the interval excludes
    zero), then every group's mean and interval."""
    lines = [f"Confirmed with {len(c.seeds)} fresh seeds per configuration ({c.used} of "
             f"{c.budget} replicates finished). Accuracies are the last epoch's; validation "
             f"decides, test accuracy is reported and never used to choose."]
    pending = sum(g.pending for g in c.groups)
    if pending:
        lines.append(f"Unfinished: {pending} replicate(s) still to run; `sweep confirm --study "
                     f"{study}` runs only those.")
    for cmp in c.comparisons:
        lines.append(f"**{cmp.question}** (validation accuracy): "
                     f"{stats.verdict(cmp.val, scale=100, unit=' points')}."
                     + (f" Test accuracy: {_diff(cmp.test)}." if cmp.test.diff is not None else "")
                     + (f" ({cmp.note}.)" if cmp.note else ""))
    if not c.comparisons:
        lines.append("No comparison of the question could be made: it needs a plateau group and "
                     "a fixed-decay group, or two warmup levels, each with 2+ complete replicates.")
    for g in c.groups:
        lines.append(_group_line(g))
    return lines


def _diff(d: stats.Difference) -> str:
    if d.low is None:
        return f"{d.a} - {d.b} = {100 * d.diff:+.2f} points (too few replicates for an interval)"
    return (f"{d.a} - {d.b} = {100 * d.diff:+.2f} points (95% CI {100 * d.low:+.2f} to "
            f"{100 * d.high:+.2f})")


def _group_line(g: GroupStats) -> str:
    lost = (f"; {g.diverged} diverged and {g.failed} failed replicate(s) are not in the mean"
            if g.diverged or g.failed else "")
    if g.val.n < 2:
        return (f"`{g.name}`: {g.complete} of {g.planned} replicates complete: too few to give an "
                f"interval{lost}.")
    source = (f"the best configuration (search trial #{g.source}) at warmup {g.label} steps"
              if g.kind == "warmup" else f"search trial #{g.source}'s configuration")
    return (f"`{g.name}` ({source}): validation {_interval(g.val)}; test "
            f"{_interval(g.test)}{lost}.")


def at_a_glance(data: ReportData) -> list[str]:
    """Plain sentences about the search, computed from the data. Best-of-search values are
    labelled as such; types with too few complete trials are listed, never ranked."""
    lines = []
    table = scheduler_table(data)
    ranked = sorted((r for r in table if r["complete"] >= MIN_COMPARE_TRIALS),
                    key=lambda r: r["best"], reverse=data.maximize)
    few = [r for r in table if r["complete"] < MIN_COMPARE_TRIALS and r["trials"]]
    if ranked:
        lines.append(f"Best-of-search per scheduler type (the best of several one-seed trials "
                     f"overstates; not a comparison): " + "; ".join(
                         f"{r['scheduler']} best {fmt(r['best'])}, median {fmt(r['median'])} "
                         f"({r['complete']} complete of {r['trials']})" for r in ranked) + ".")
    if few:
        lines.append(f"Too few complete trials to be compared (fewer than {MIN_COMPARE_TRIALS}): "
                     + "; ".join(f"{r['scheduler']} ({r['complete']} complete of {r['trials']}: "
                                 f"{r['pruned']} pruned, {r['diverged']} diverged, {r['failed']} "
                                 f"failed)" for r in few) + ".")
    if not any(r["complete"] for r in table):
        lines.append("No trial has completed yet, so no scheduler type can be ranked.")
    names = set(data.schedulers)
    if "plateau" in names and names - set(NO_DECAY) and data.confirmation is None:
        lines.append(f"Fixed decay vs ReduceLROnPlateau: not answered by the search (one seed per "
                     f"configuration); `sweep confirm --study {data.study}` replicates the best "
                     f"of each type with fresh seeds and gives intervals.")
    if data.best is not None:
        b = data.best
        lines.append(f"Best-of-search trial #{b.number}: {b.scheduler}, warmup_steps="
                     f"{fmt(b.params.get('warmup_steps'))}, base_lr={fmt(b.params.get('base_lr'))} "
                     f"-> {data.metric} {fmt(b.value)}"
                     + (f", test accuracy {fmt(b.test_acc)}" if b.test_acc is not None else "") + ".")
    complete = [r for r in data.rows if r.outcome == "COMPLETE" and r.value is not None
                and r.params.get("warmup_steps") is not None]
    top = sorted(complete, key=lambda r: r.value, reverse=data.maximize)[:DEFAULT_TOP_K]
    if top:
        w = [float(r.params["warmup_steps"]) for r in top]
        rho = spearman([float(r.params["warmup_steps"]) for r in complete],
                       [r.value for r in complete])
        lines.append(f"Warmup of the top {len(top)} complete trials: {min(w):g} to {max(w):g} "
                     f"optimizer steps (median {statistics.median(w):g})"
                     + (f"; rank correlation of warmup_steps with {data.metric} over "
                        f"{len(complete)} complete trials: {rho:+.2f}." if rho is not None else "."))
    stopped = [r for r in data.rows if r.outcome == "DIVERGED"]
    if stopped:
        lrs = [float(r.params["base_lr"]) for r in stopped if r.params.get("base_lr") is not None]
        lines.append(f"{len(stopped)} trial(s) diverged" + (f" (base_lr {min(lrs):.3g} to "
                                                            f"{max(lrs):.3g})" if lrs else "") + ".")
    if data.tracking_notes:
        lines.append("MLflow lacks points of some trial runs (see the learning-rate curves "
                     "section): curves drawn from it are incomplete.")
    return lines


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    seconds = int(round(seconds))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h} h {m:02d} min" if h else f"{m} min {s:02d} s" if m else f"{s} s"


def _facts(data: ReportData) -> list[list[str]]:
    c = data.counts
    facts = [
        ["budget used", f"{data.used} of {data.budget if data.budget is not None else '?'} trials"],
        ["outcomes", f"{c['complete']} complete, {c['pruned']} pruned by the pruner, "
                     f"{c['diverged']} diverged, {c['failed']} failed"
                     + (f", {c['running']} running" if c.get("running") else "")],
        ["wall time", f"{_duration(data.wall_seconds)} (first trial start to last trial end); "
                      f"{_duration(data.trial_seconds)} of trial time in total"],
        ["device", ", ".join(data.devices) or "-"],
        ["hosts", ", ".join(data.hosts) or "-"],
        ["objective", f"{data.metric} of the last epoch, {'maximized' if data.maximize else 'minimized'}"],
        ["training", f"{_model_text(data.training)}, {data.epochs or '?'} epochs x "
                     f"{data.steps_per_epoch or '?'} optimizer steps (batch "
                     f"{data.training.get('batch_size') or '?'}; {data.training.get('train_size') or '?'} "
                     f"training / {data.training.get('val_size') or '?'} validation images"
                     f"{', ' + data.training['dataset'] if data.training.get('dataset') else ''})"],
        ["Optuna storage", mask_url(data.storage_url)],
        ["MLflow", f"{mask_url(data.tracking_uri)}, experiment {data.experiment_id}, parent run "
                   f"{data.parent_run_id or '-'}"],
    ]
    if data.confirmation is not None:
        conf = data.confirmation
        facts.insert(1, ["confirmation budget", f"{conf.used} of {conf.budget} replicates "
                                                f"({len(conf.groups)} groups x {len(conf.seeds)} "
                                                f"seeds), counted apart from the search budget"])
    return facts


SECTIONS = (  # (figure key, heading, caption)
    ("schedulers", "Scheduler types",
     "Final {metric} of every complete trial per scheduler type (box: quartiles of complete "
     "trials; hollow grey: last value of pruned trials)."),
    ("warmup", "Effect of warmup and base LR",
     "Each point is a trial; filled = complete (final value), hollow = pruned (last value)."),
    ("searched", "Effect of the other searched parameters",
     "The objective against each searched parameter besides warmup and base LR (training "
     "fields such as weight_decay, and each schedule's own parameters, drawn for the trials "
     "of that type only); filled = complete, hollow = pruned (last value)."),
    ("top_curves", "Learning-rate curves of the top trials",
     "The LR actually used at every optimizer step (from MLflow metric `lr`), with the "
     "validation accuracy after each epoch, for the best complete trials only."),
    ("importance", "Parameter importance",
     "fANOVA (Optuna, seed 0) over complete trials. Conditional parameters are handled by "
     "grouping: 'all trials' ranks only the parameters every trial has; each 'scheduler = X' "
     "panel uses only the trials of that type, with that type's own parameters."),
    ("history", "Optimization history", "Objective per trial and the best value so far."),
    ("timeline", "Pruning and divergence timeline",
     "How many epochs each trial trained before it completed or was stopped, and why."),
)

METHODS = (f"Methods: per group, the mean of the replicates' final accuracy with a "
           f"{stats.T_METHOD}; differences: {stats.DIFF_METHOD}; a verdict is given only when "
           f"that interval excludes zero, otherwise the {stats.POWER_METHOD}.")


def _answer(data: ReportData, figures: Figures) -> list:
    c = data.confirmation
    if c is None:
        return [Heading(2, "Answer"),
                Para(f"Not confirmed yet: everything below is best-of-search (one seed per "
                     f"configuration, the luckiest of many). Run `sweep confirm --study "
                     f"{data.study}` to replicate the best configuration of each scheduler type "
                     f"and a warmup ablation with fresh seeds; this section then gives means, "
                     f"95% intervals and verdicts.")]
    blocks = [Heading(2, "Answer (confirmed)"), Bullets(answer_lines(c, data.study), "glance"),
              Para(METHODS, "cap")]
    for key, alt, caption in (
            ("confirm_groups", "Accuracy per confirmation group",
             "Each replicate's final accuracy (dots) and the group's mean with its 95% t "
             "interval (bar), validation and test."),
            ("confirm_warmup", "Warmup length vs accuracy",
             "The best configuration at several warmup lengths: mean and 95% t interval of "
             "its replicates.")):
        if key in figures.files:
            blocks += [Para(caption, "cap"), Image(figures.files[key], alt)]
    return blocks


def _confirmation_table(c: Confirmation) -> list:
    rows = [[f"`{g.name}`", f"#{g.source}", _config(g.params), f"{g.complete}/{g.planned}",
             str(g.diverged), str(g.failed), _pct(g.val.mean), _pct(g.val.std),
             "-" if g.val.low is None else f"{100 * g.val.low:.2f} to {100 * g.val.high:.2f}",
             _pct(g.test.mean), _pct(g.test.std),
             "-" if g.test.low is None else f"{100 * g.test.low:.2f} to {100 * g.test.high:.2f}"]
            for g in c.groups]
    return [Heading(2, "Confirmation replicates"),
            Para(f"Seeds: {', '.join(map(str, c.seeds))} (the same for every group). "
                 f"{METHODS}", "cap"),
            Table(["group", "from trial", "configuration", "complete", "diverged", "failed",
                   "val mean", "val sd", "val 95% CI", "test mean", "test sd", "test 95% CI"],
                  rows)]


def build_document(data: ReportData, figures: Figures) -> list:
    """The whole report as blocks, in reading order."""
    doc = [Heading(1, f"Study `{data.study}`"),
           Para(f"**Question:** {data.description or '(no description)'}", "q")]
    doc += _answer(data, figures)
    doc += [Heading(2, "At a glance (search)"), Bullets(at_a_glance(data), "glance"),
            Heading(2, "Run"), Table(None, _facts(data)), Heading(2, "Best trial (best-of-search)")]
    if data.best is None:
        doc.append(Para("No complete trial yet."))
    else:
        b = data.best
        doc += [Para(f"Trial #{b.number}: {data.metric} {fmt(b.value)}, test accuracy "
                     f"{fmt(b.test_acc)}, MLflow run `{b.run_id}` (open it with `sweep ui --study "
                     f"{data.study}`)."),
                Table(["parameter", "value"], [[k, fmt(v)] for k, v in b.params.items()])]
    table = scheduler_table(data)
    doc += [Heading(2, "Per scheduler type"),
            Table(["scheduler", "trials", "complete", "pruned", "diverged", "failed",
                   f"best {data.metric}", f"median {data.metric}"],
                  [[r["scheduler"], str(r["trials"]), str(r["complete"]), str(r["pruned"]),
                    str(r["diverged"]), str(r["failed"]), fmt(r["best"]), fmt(r["median"])]
                   for r in table])]
    few = [r["scheduler"] for r in table if r["complete"] < MIN_COMPARE_TRIALS and r["trials"]]
    if few:
        doc.append(Para(f"Too few complete trials to be compared: {', '.join(few)} (fewer than "
                        f"{MIN_COMPARE_TRIALS}; best and median use complete trials only, never "
                        f"the last value of a pruned trial).", "cap"))
    for key, heading, caption in SECTIONS:
        if key == "searched" and key not in figures.files:
            continue  # nothing searched besides scheduler, warmup and base LR
        doc += [Heading(2, heading), Para(caption.format(metric=data.metric), "cap")]
        if key == "importance":
            doc.append(Bullets([f"{title}: " + ", ".join(
                f"{k} {v:.2f}" for k, v in sorted(values.items(), key=lambda kv: -kv[1]))
                for title, values in data.importances] + list(data.importance_notes)))
        if key == "top_curves" and (data.tracking_notes or key not in figures.files):
            doc.append(Bullets(data.tracking_notes or ["No complete trial with an `lr` curve in "
                                                       "MLflow yet: no figure."]))
        if key in figures.files:
            doc.append(Image(figures.files[key], heading))
    doc += [Heading(3, "Stopped trials"),
            Table(["trial", "outcome", "stopped after (epochs)", "reason", "scheduler",
                   "warmup_steps", "base_lr"],
                  [[str(r.number), r.outcome.lower(), fmt(r.stopped_epoch), r.reason or "-",
                    r.scheduler, fmt(r.params.get("warmup_steps")), fmt(r.params.get("base_lr"))]
                   for r in data.rows if r.outcome != "COMPLETE"])]
    if data.confirmation is not None:
        doc += _confirmation_table(data.confirmation)
    doc.append(Para(f"_Made by `sweep report` at {data.made_at}._", "cap"))
    return doc


# --- the two writers ------------------------------------------------------------------------------

def to_markdown(doc: list) -> str:
    out = []
    for block in doc:
        if isinstance(block, Heading):
            out += [f"{'#' * block.level} {block.text}", ""]
        elif isinstance(block, Para):
            out += [block.text, ""]
        elif isinstance(block, Bullets):
            out += [f"- {item}" for item in block.items] + [""]
        elif isinstance(block, Table):
            header = block.header or ["", ""]
            out += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
            out += ["| " + " | ".join(_md_cell(c) for c in row) + " |" for row in block.rows] + [""]
        elif isinstance(block, Image):
            out += [f"![{block.alt}]({block.file})", ""]
    return "\n".join(out)


def _md_cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


_CODE = re.compile(r"`([^`]+)`")
_BOLD = re.compile(r"\*\*(.+?)\*\*")
_ITALIC = re.compile(r"(?<![\w*])_(.+?)_(?![\w*])")


def _inline(text: str) -> str:
    text = html.escape(text)
    text = _CODE.sub(r"<code>\1</code>", text)
    text = _BOLD.sub(r"<b>\1</b>", text)
    return _ITALIC.sub(r"<i>\1</i>", text)


_CSS = """body{font-family:system-ui,-apple-system,'Segoe UI',sans-serif;max-width:1150px;margin:2em auto;
padding:0 1em;color:#222;line-height:1.45}h1{margin-bottom:.2em}h2{border-bottom:1px solid #ddd;
padding-bottom:.2em;margin-top:1.6em}table{border-collapse:collapse;margin:.6em 0}td,th{border:1px solid
#ddd;padding:.25em .6em;text-align:left}th{background:#f4f4f4}img{max-width:100%;height:auto;
border:1px solid #eee}.q{font-size:1.15em;background:#f6f8fa;padding:.6em 1em;border-left:4px solid
#4c72b0}.glance li{margin:.3em 0}code{background:#f4f4f4;padding:0 .2em}.cap{color:#555}"""


def to_html(doc: list, title: str) -> str:
    e = html.escape
    out = [f"<!doctype html><html lang='en'><head><meta charset='utf-8'>"
           f"<title>{e(title)}</title><style>{_CSS}</style></head><body>"]
    for block in doc:
        cls = f" class='{block.cls}'" if getattr(block, "cls", "") else ""
        if isinstance(block, Heading):
            out.append(f"<h{block.level}>{_inline(block.text)}</h{block.level}>")
        elif isinstance(block, Para):
            out.append(f"<p{cls}>{_inline(block.text)}</p>")
        elif isinstance(block, Bullets):
            out.append(f"<ul{cls}>" + "".join(f"<li>{_inline(i)}</li>" for i in block.items) + "</ul>")
        elif isinstance(block, Table):
            rows = []
            if block.header is not None:
                rows.append("<tr>" + "".join(f"<th>{_inline(h)}</th>" for h in block.header) + "</tr>")
                rows += ["<tr>" + "".join(f"<td>{_inline(c)}</td>" for c in row) + "</tr>"
                         for row in block.rows]
            else:
                rows += [f"<tr><th>{_inline(row[0])}</th>"
                         + "".join(f"<td>{_inline(c)}</td>" for c in row[1:]) + "</tr>"
                         for row in block.rows]
            out.append("<table>" + "".join(rows) + "</table>")
        elif isinstance(block, Image):
            out.append(f"<img src='{e(block.file)}' alt='{e(block.alt)}'>")
    out.append("</body></html>")
    return "\n".join(out)
