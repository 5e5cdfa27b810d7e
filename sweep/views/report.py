"""``sweep report``: answer the study's question in one self-contained folder.

Reads both stores once (``report_model``), draws the figures (``plots``), builds one document
and writes it as ``index.html`` and ``summary.md`` (``report_render``) with PNG figures beside
them (no server, no network, no scripts). The same files go to the study's parent MLflow run as
artifacts under ``report/``, and the confirmation's numbers as metrics of that run
(``confirm.<group>.val_acc_mean`` ...), so the MLflow UI shows the answer. Every read happens
before the first write, so an unknown study or an unreachable store creates nothing.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from sweep.base.urls import pinned_sqlite
from sweep.errors import SweepError
from sweep.views.report_model import (DEFAULT_TOP_K, Confirmation, ReportData,
                                      compute_importances, load_report_data)
from sweep.views.report_render import Figures, build_document, to_html, to_markdown

__all__ = ["write_report", "load_report_data", "compute_importances", "confirmation_metrics",
           "REPORT_ARTIFACT_PATH"]

REPORT_ARTIFACT_PATH = "report"


def draw_figures(data: ReportData, out_dir: Path) -> Figures:
    from sweep.views import plots

    colours = plots.scheduler_colours(data.schedulers)
    made = Figures()

    def save(key: str, fig) -> None:
        name = f"{key}.png"
        fig.savefig(out_dir / name, dpi=100)
        made.files[key] = name

    label = data.metric_label
    groups = {s: [r.value for r in data.rows if r.scheduler == s and r.outcome == "COMPLETE"
                  and r.value is not None] for s in data.schedulers}
    pruned = {s: [r.last_value for r in data.rows if r.scheduler == s
                  and r.outcome in ("PRUNED", "DIVERGED") and r.last_value is not None]
              for s in data.schedulers}
    conf = data.confirmation
    if conf is not None and any(g.val.n for g in conf.groups):
        save("confirm_groups", plots.group_intervals([vars(g) for g in conf.groups]))
        levels = [dict(vars(g), warmup_steps=int(g.label)) for g in conf.groups
                  if g.kind == "warmup" and g.val.n]
        if len(levels) > 1:
            save("confirm_warmup", plots.warmup_intervals(levels))
    if data.rows:
        save("schedulers", plots.scheduler_strip(groups, pruned, colours, label))
        points = [{"warmup_steps": r.params.get("warmup_steps"), "base_lr": r.params.get("base_lr"),
                   "scheduler": r.scheduler, "complete": r.outcome == "COMPLETE",
                   "value": r.value if r.outcome == "COMPLETE" else r.last_value} for r in data.rows]
        save("warmup", plots.warmup_effect(points, colours, label))
        if data.searched:
            save("searched", plots.parameter_effects(
                [dict(p, params=r.params) for p, r in zip(points, data.rows)], data.searched,
                colours, label))
    if any(c.lr for c in data.curves):  # never an empty figure: report_render says why
        save("top_curves", plots.top_k_curves(
            [vars(c) for c in data.curves], label, data.epochs))
    if data.importances:
        save("importance", plots.importances(data.importances))
    if data.rows:
        save("history", plots.history(
            [{"number": r.number, "outcome": r.outcome,
              "value": r.value if r.outcome == "COMPLETE" else r.last_value} for r in data.rows],
            label, data.maximize))
        save("timeline", plots.timeline(
            [{"number": r.number, "outcome": r.outcome, "stopped_epoch": r.stopped_epoch,
              "reason": r.reason}
             for r in data.rows], data.epochs))
    return made


def _key(text: str) -> str:
    """An MLflow metric key from a group name (``scheduler:cosine#2`` -> ``scheduler:cosine_2``)."""
    return re.sub(r"[^\w.\-:/ ]", "_", text)


def confirmation_metrics(conf: Confirmation) -> dict[str, float]:
    """The confirmation's numbers as parent-run metrics: per group and accuracy, ``_mean``,
    ``_std``, ``_ci_low``, ``_ci_high``, ``_n``; per comparison the difference and its interval."""
    out = {}
    for g in conf.groups:
        for name, i in (("val_acc", g.val), ("test_acc", g.test)):
            prefix = f"confirm.{_key(g.name)}.{name}"
            out[f"{prefix}_n"] = float(i.n)
            for stat, value in (("mean", i.mean), ("std", i.std), ("ci_low", i.low),
                                ("ci_high", i.high)):
                if value is not None:
                    out[f"{prefix}_{stat}"] = float(value)
    for c in conf.comparisons:
        for name, d in (("val_acc", c.val), ("test_acc", c.test)):
            prefix = f"confirm.{_key(d.a)}_vs_{_key(d.b)}.{name}"
            for stat, value in (("diff", d.diff), ("ci_low", d.low), ("ci_high", d.high)):
                if value is not None:
                    out[f"{prefix}_{stat}"] = float(value)
    return out


@dataclass
class ReportResult:
    folder: Path
    files: list[Path]
    logged_to: str | None

    @property
    def text(self) -> str:
        logged = (f"; logged to MLflow run {self.logged_to} under {REPORT_ARTIFACT_PATH}/"
                  if self.logged_to else "; no parent MLflow run to log to")
        return f"report: {self.folder / 'index.html'} and summary.md ({len(self.files) - 2} plots){logged}"


def write_report(study_name: str, storage_url: str, tracking_uri: str, out_dir: str | Path | None = None,
                 top_k: int = DEFAULT_TOP_K) -> ReportResult:
    """Read both stores, then write the report folder and log it to the parent MLflow run."""
    folder = Path(out_dir) if out_dir else Path("reports") / study_name
    if folder.exists() and not folder.is_dir():
        raise SweepError(f"report folder {folder} is a file; choose another with -o DIR")
    data = load_report_data(study_name, storage_url, tracking_uri, top_k)
    folder.mkdir(parents=True, exist_ok=True)
    figures = draw_figures(data, folder)
    doc = build_document(data, figures)
    (folder / "summary.md").write_text(to_markdown(doc), encoding="utf-8")
    (folder / "index.html").write_text(to_html(doc, f"sweep report: {data.study}"), encoding="utf-8")
    files = [folder / n for n in figures.files.values()] + [folder / "summary.md", folder / "index.html"]
    if data.parent_run_id:
        import time

        from mlflow.entities import Metric
        from mlflow.tracking import MlflowClient

        client = MlflowClient(tracking_uri=pinned_sqlite(tracking_uri))
        for path in files:
            client.log_artifact(data.parent_run_id, str(path), REPORT_ARTIFACT_PATH)
        if data.confirmation is not None:
            now = int(time.time() * 1000)
            metrics = [Metric(k, v, now, 0) for k, v in confirmation_metrics(data.confirmation).items()]
            for start in range(0, len(metrics), 1000):  # MLflow's batch limit
                client.log_batch(data.parent_run_id, metrics=metrics[start:start + 1000])
    return ReportResult(folder, files, data.parent_run_id)
