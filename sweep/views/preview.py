"""``sweep schedule``: draw a learning-rate curve without training, or redraw a finished trial's.

A preview is built from flags (``preview_curve``); a trial's curve is rebuilt from its stored
Optuna params through the same ``trial_config`` the worker used, with plateau fed the
validation losses MLflow holds for that trial, and compared with the ``lr`` metric logged at
every optimizer step (``check_trial``). Units: steps are optimizer steps, LRs are absolute.
"""

from __future__ import annotations

import csv
import io
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence, TextIO

import yaml

from sweep.errors import FieldError, ScheduleError
from sweep.study.schedules import SCHEDULER_PARAMS, ScheduleConfig, check_schedule, lr_curve
from sweep.study.schedules import resolve_params

#: the relative difference up to which a redrawn curve counts as equal to the logged one
MATCH_REL = 1e-9


@dataclass(frozen=True)
class LRCurve:
    """The LR of every optimizer step t = 0 .. T-1 of one param group."""

    schedule: ScheduleConfig
    base_lr: float
    steps_per_epoch: int
    epochs: int
    lrs: list[float]


def parse_params(pairs: Sequence[str]) -> dict[str, Any]:
    """``["gamma=0.1", "milestones_epochs=[10, 20]"]`` -> a dict; values are parsed as YAML."""
    params: dict[str, Any] = {}
    for pair in pairs:
        key, sep, text = pair.partition("=")
        if not sep or not key.strip():
            raise ScheduleError(f"--param {pair!r}: expected KEY=VALUE, e.g. --param gamma=0.1")
        try:
            params[key.strip()] = yaml.safe_load(text)
        except yaml.YAMLError:
            raise ScheduleError(f"--param {pair!r}: {text!r} is not a value; write numbers as "
                                f"0.1 and lists as [10, 20]") from None
    return params


def parse_losses(text: str) -> list[float]:
    """``"2.1,1.9,1.95"`` -> the validation loss of epochs 0, 1, 2 (for plateau)."""
    try:
        losses = [float(item) for item in text.split(",")]
    except ValueError:
        raise ScheduleError(f"--val-losses {text!r}: expected numbers separated by commas, "
                            f"e.g. 2.1,1.9,1.95") from None
    if not all(math.isfinite(loss) for loss in losses):
        raise ScheduleError(f"--val-losses {text!r}: every loss must be a finite number")
    return losses


def preview_curve(scheduler: str, base_lr: float, epochs: int, steps_per_epoch: int,
                  warmup_steps: int = 0, params: dict | None = None,
                  warmup_shape: str = "linear", warmup_start_factor: float = 0.01,
                  val_losses: Sequence[float] | None = None) -> LRCurve:
    """Validate exactly as a study file is validated, then compute the curve."""
    if not (math.isfinite(base_lr) and base_lr > 0):
        raise ScheduleError(f"--base-lr: must be a number > 0, got {base_lr!r}")
    try:
        resolved = resolve_params(scheduler, params or {}, epochs)
        cfg = ScheduleConfig(scheduler, warmup_steps, warmup_shape, warmup_start_factor, resolved)
        check_schedule(cfg, steps_per_epoch, epochs, base_lr)
    except FieldError as err:
        key = err.key[-1]
        flag = {"scheduler": "--scheduler", "warmup_steps": "--warmup-steps",
                "warmup_start_factor": "--warmup-start-factor", "warmup_shape": "--warmup-shape",
                "min_lr": "--param min_lr"}.get(key)
        if flag is None and key in SCHEDULER_PARAMS.get(scheduler, {}):
            flag = f"--param {key}"
        raise ScheduleError(f"{flag}: {err.problem}" if flag else str(err)) from None
    lrs = lr_curve(cfg, base_lr, steps_per_epoch, epochs, list(val_losses) if val_losses else None)
    return LRCurve(cfg, base_lr, steps_per_epoch, epochs, lrs)


def describe_curve(curve: LRCurve) -> str:
    """A few lines: the configuration, then the LR at the start, at the end of warmup (step W,
    the first step of the main schedule), the minimum and the end."""
    cfg, lrs, w = curve.schedule, curve.lrs, curve.schedule.warmup_steps
    shown = ", ".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}"
                      for k, v in cfg.params.items() if v is not None)
    warm = (f"warmup {w} steps ({cfg.warmup_shape} from {cfg.warmup_start_factor:g} x base_lr)"
            if w else "no warmup")
    low = min(range(len(lrs)), key=lrs.__getitem__)
    rows = [("start", 0), ("end of warmup", w) if w else None, ("minimum", low),
            ("end", len(lrs) - 1)]
    lines = [f"{cfg.name}{f' ({shown})' if shown else ''}, base_lr {curve.base_lr:g}, {warm}",
             f"T = {len(lrs)} steps ({curve.epochs} epochs x {curve.steps_per_epoch} steps/epoch)"]
    lines += [f"  {label + ':':<15} step {t:>7}  lr {lrs[t]:.6g}" for label, t in filter(None, rows)]
    return "\n".join(lines)


def write_csv(curve: LRCurve, out: TextIO) -> None:
    """``step,lr`` then one row per step; ``repr`` floats, so the file round-trips exactly."""
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(["step", "lr"])
    writer.writerows((t, repr(lr)) for t, lr in enumerate(curve.lrs))


def write_png(curve: LRCurve, path: Path) -> None:
    """The curve on a log LR axis (steps where the LR is 0 are not drawn), warmup's end marked."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 3.6), dpi=110)
    ax = fig.add_subplot()
    ax.plot(range(len(curve.lrs)), curve.lrs, lw=1.3)
    if any(lr > 0 for lr in curve.lrs):
        ax.set_yscale("log")
    if curve.schedule.warmup_steps:
        ax.axvline(curve.schedule.warmup_steps, color="grey", lw=0.8, ls="--",
                   label=f"end of warmup (step {curve.schedule.warmup_steps})")
        ax.legend(loc="lower center", fontsize=8)
    ax.set_xlabel(f"optimizer step t ({curve.steps_per_epoch} steps = 1 epoch)")
    ax.set_ylabel("learning rate (absolute, log scale)")
    ax.set_title(f"{curve.schedule.name}, base_lr {curve.base_lr:g}", fontsize=10)
    ax.grid(alpha=0.3, which="both")
    fig.tight_layout()
    fig.savefig(path)


def check_output(path: Path) -> None:
    """Refuse an output file we cannot write before computing anything."""
    if path.suffix.lower() not in (".csv", ".png"):
        raise ScheduleError(f"-o {path}: the file name must end in .csv (step,lr) or .png (a plot)")
    folder = path.parent if str(path.parent) else Path(".")
    if not folder.is_dir():
        raise ScheduleError(f"-o {path}: folder {folder} does not exist; create it first")


def save(curve: LRCurve, path: Path) -> None:
    check_output(path)
    if path.suffix.lower() == ".png":
        write_png(curve, path)
    else:
        with open(path, "w", newline="") as handle:
            write_csv(curve, handle)


def csv_text(curve: LRCurve) -> str:
    buffer = io.StringIO()
    write_csv(curve, buffer)
    return buffer.getvalue()


# --- a finished trial -------------------------------------------------------------------------

@dataclass(frozen=True)
class TrialCheck:
    """A trial's redrawn curve against the ``lr`` metric MLflow holds for it."""

    study: str
    trial: int
    run_id: str
    curve: LRCurve
    logged_steps: int
    max_rel_diff: float
    worst_step: int | None

    @property
    def matches(self) -> bool:
        return self.logged_steps > 0 and self.max_rel_diff <= MATCH_REL

    def report(self) -> str:
        where = f" (worst at step {self.worst_step})" if self.worst_step is not None else ""
        verdict = "matches" if self.matches else "DIFFERS from"
        return (f"study {self.study!r} trial {self.trial} (MLflow run {self.run_id}): "
                f"the redrawn curve {verdict} the logged lr metric; max relative difference "
                f"{self.max_rel_diff:.3g} over {self.logged_steps} logged steps{where}")


# run params that decide the curve and may have come from ``--set`` at launch (data.*, train.*)
_CURVE_OVERRIDES = (("data", "train_size"), ("train", "batch_size"), ("train", "epochs"),
                    ("train", "warmup_shape"), ("train", "warmup_start_factor"))


def _load_trial(study_name: str, number: int, storage_url: str):
    from sweep.stores import load_existing_study

    study = load_existing_study(study_name, storage_url)
    found = [t for t in study.get_trials(deepcopy=False) if t.number == number]
    if not found:
        raise ScheduleError(f"study {study_name!r} has no trial {number} (it has "
                            f"{len(study.trials)} trials, numbered from 0)")
    trial = found[0]
    run_id = trial.user_attrs.get("mlflow_run_id")
    if not run_id:
        raise ScheduleError(f"trial {number} of study {study_name!r} has no MLflow run "
                            f"(user attr mlflow_run_id); it never started training")
    return study, trial, run_id


def check_trial(study_name: str, number: int, storage_url: str, tracking_uri: str) -> TrialCheck:
    """Redraw trial ``number`` from its Optuna params and compare with MLflow's ``lr`` metric."""
    import optuna

    from sweep.study.space import trial_config
    from sweep.study.spec import load_study
    from sweep.record import open_existing_tracker

    study, trial, run_id = _load_trial(study_name, number, storage_url)
    client = open_existing_tracker(tracking_uri).client
    try:
        run = client.get_run(run_id)
    except Exception:
        raise ScheduleError(f"MLflow run {run_id} of trial {number} is not in this tracking "
                            f"store; pass the --tracking-uri the study used") from None
    logged = run.data.params
    study_file = study.user_attrs.get("sweep.study_file")
    source = study_file if study_file and Path(study_file).is_file() else study_name
    searched = load_study(source).space.train  # these come from the trial's own params
    overrides = [f"{section}.{key}={logged[key]}" for section, key in _CURVE_OVERRIDES
                 if key in logged and key not in searched]
    spec = load_study(source, overrides)
    try:
        cfg = trial_config(optuna.trial.FixedTrial(trial.params, number=number), spec)
    except ValueError as err:  # FixedTrial lacks a parameter the study file now declares
        raise ScheduleError(f"trial {number}'s stored params do not fit {spec.path} as it is "
                            f"now ({err}); restore the study file the trial ran with") from None
    steps_per_epoch = spec.steps_per_epoch
    val_losses = None
    if cfg.schedule.name == "plateau":  # its reductions come from the logged validation losses
        val_losses = [None] * spec.train.epochs
        for m in client.get_metric_history(run_id, "val_loss"):
            if 0 <= m.step < spec.train.epochs:
                val_losses[m.step] = m.value
    lrs = lr_curve(cfg.schedule, cfg.base_lr, steps_per_epoch, spec.train.epochs, val_losses)
    curve = LRCurve(cfg.schedule, cfg.base_lr, steps_per_epoch, spec.train.epochs, lrs)
    worst, worst_step, count = 0.0, None, 0
    for m in client.get_metric_history(run_id, "lr"):
        count += 1
        if not 0 <= m.step < len(lrs):
            return TrialCheck(study_name, number, run_id, curve, count, math.inf, m.step)
        if m.value:
            diff = abs(lrs[m.step] - m.value) / abs(m.value)
        else:  # a logged 0 (warmup from 0) is matched only by 0
            diff = 0.0 if lrs[m.step] == 0 else math.inf
        if diff > worst or worst_step is None:
            worst, worst_step = diff, m.step
    return TrialCheck(study_name, number, run_id, curve, count, worst if count else math.inf,
                      worst_step)


# --- the command ------------------------------------------------------------------------------

@dataclass(frozen=True)
class ScheduleAnswer:
    """What ``sweep schedule`` shows: ``text`` (the curve's description, the verdict of a trial's
    check, the file written) and ``csv`` (the curve for stdout, or None); exit 1 when a redrawn
    trial's curve differs from the logged one."""

    text: str
    csv: str | None
    exit_code: int


def schedule_command(scheduler: str | None, base_lr: float | None, epochs: int | None,
                     steps_per_epoch: int | None, warmup_steps: int, warmup_shape: str,
                     warmup_start_factor: float, params: Sequence[str], val_losses: str | None,
                     study_name: str | None, trial_number: int | None, storage_url: str,
                     tracking_uri: str, as_csv: bool, output: Path | None) -> ScheduleAnswer:
    """Preview a curve from flags, or redraw trial ``trial_number`` of ``study_name`` and check
    it against MLflow; write it to ``output`` (.csv or .png) or return it as CSV."""
    if output is not None:
        check_output(output)
    check = None
    if study_name is not None or trial_number is not None:
        if study_name is None or trial_number is None or scheduler is not None:
            raise ScheduleError("redraw a trial with --study NAME --trial N (and no "
                                "--scheduler), or preview with --scheduler ...")
        check = check_trial(study_name, trial_number, storage_url, tracking_uri)
        curve = check.curve
    else:
        missing = [flag for flag, value in (("--scheduler", scheduler), ("--base-lr", base_lr),
                                            ("--epochs", epochs),
                                            ("--steps-per-epoch", steps_per_epoch))
                   if value is None]
        if missing:
            raise ScheduleError(f"missing {', '.join(missing)}; e.g. sweep schedule "
                                f"--scheduler cosine --base-lr 0.4 --epochs 30 "
                                f"--steps-per-epoch 352, or --study NAME --trial N")
        losses = parse_losses(val_losses) if val_losses else None
        curve = preview_curve(scheduler, base_lr, epochs, steps_per_epoch, warmup_steps,
                              parse_params(params), warmup_shape, warmup_start_factor, losses)
    lines = [describe_curve(curve)] + ([check.report()] if check is not None else [])
    if output is not None:
        save(curve, output)
        lines.append(f"wrote {output}")
    return ScheduleAnswer("\n".join(lines), csv_text(curve) if as_csv and output is None else None,
                          0 if check is None or check.matches else 1)
