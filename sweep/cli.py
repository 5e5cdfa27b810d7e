"""The ``sweep`` command. Thin: parse flags, call a plain function, map errors to exit 2."""

from __future__ import annotations

import functools
import sys

import click

from sweep.errors import SweepError
from sweep.storage import DEFAULT_STORAGE, mask_url
from sweep.tracking import DEFAULT_TRACKING_URI


def friendly_errors(fn):
    """A ``SweepError`` becomes one line on stderr and exit status 2, without a traceback."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except SweepError as err:
            click.echo(f"error: {mask_url(str(err))}", err=True)
            sys.exit(err.exit_code)

    return wrapper


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="sweep")
def main():
    """Hyperparameter sweeps over learning-rate schedules: Optuna trials, MLflow curves."""


@main.command()
@click.option("--study", "study_name", required=True, help="Name in studies/ or path to a YAML file.")
@click.option("--trials", type=click.IntRange(min=1), help="Total trial budget of the study.")
@click.option("--storage", envvar="SWEEP_STORAGE", default=DEFAULT_STORAGE, show_default=True,
              help="Optuna storage URL [env SWEEP_STORAGE].")
@click.option("--tracking-uri", envvar="MLFLOW_TRACKING_URI", default=DEFAULT_TRACKING_URI,
              show_default=True, help="MLflow tracking URI [env MLFLOW_TRACKING_URI].")
@click.option("--data-dir", envvar="SWEEP_DATA_DIR", default=None,
              help="Folder holding cifar-10-batches-py/ [env SWEEP_DATA_DIR; default: user cache, "
                   "downloaded when absent].")
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N.")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
              help="Override a fixed field of the study file, e.g. train.epochs=3 (repeatable).")
@click.option("--seed", type=int, help="Override the study's seed.")
@click.option("--allow-space-change", is_flag=True,
              help="Resume even if the search space changed (the change is recorded).")
@click.option("--quiet", is_flag=True, help="No progress bars.")
@friendly_errors
def launch(study_name, trials, storage, tracking_uri, data_dir, device, overrides, seed,
           allow_space_change, quiet):
    """Create or resume a study and run its trials on this machine."""
    from sweep.launch import LaunchOptions, launch as run_launch
    from sweep.spec import load_study

    overrides = list(overrides) + ([f"seed={seed}"] if seed is not None else [])
    spec = load_study(study_name, overrides)
    result = run_launch(spec, LaunchOptions(storage, tracking_uri, data_dir, device, trials, quiet,
                                            allow_space_change))
    click.echo(mask_url(result.text))
    sys.exit(result.exit_code)


@main.command()
@click.argument("files", nargs=-1, required=True)
@friendly_errors
def validate(files):
    """Check study files without running anything (exit 0 when all are valid, else 2)."""
    from sweep.spec import load_study

    bad = 0
    for name in files:
        try:
            spec = load_study(name)
            click.echo(f"ok: {spec.path} (study {spec.name!r}, {len(spec.space.scheduler)} "
                       f"scheduler type(s), T = {spec.total_steps} steps)")
        except SweepError as err:
            click.echo(f"error: {err}", err=True)
            bad += 1
    sys.exit(2 if bad else 0)


if __name__ == "__main__":
    main()
