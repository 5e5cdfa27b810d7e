"""The commands around a study: ``validate`` its file, ``schedule`` (an LR curve, checked against
torch), and the ``ui`` (MLflow) and ``dashboard`` (optuna-dashboard) servers."""

from __future__ import annotations

from pathlib import Path
import sys
import click

from sweep.base.urls import mask_url
from sweep.errors import SweepError
from sweep.cli.options import (friendly_errors, study_option, storage_option, tracking_uri_option, server_options)


@click.command()
@click.argument("files", nargs=-1, required=True)
@friendly_errors
def validate(files):
    """Check study files without running anything (exit 0 when all are valid, else 2)."""
    from sweep.study.spec import load_study

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



@click.command()
@click.option("--scheduler", help="Scheduler type (constant, step, multistep, exponential, cosine, "
                                  "cosine_restarts, plateau, onecycle, linear, polynomial, "
                                  "inverse_sqrt, wsd).")
@click.option("--base-lr", type=float, help="Base learning rate (absolute).")
@click.option("--epochs", type=click.IntRange(min=1), help="Training length in epochs.")
@click.option("--steps-per-epoch", type=click.IntRange(min=1), help="Optimizer steps per epoch (S).")
@click.option("--warmup-steps", type=click.IntRange(min=0), default=0, show_default=True,
              help="Warmup length W in optimizer steps.")
@click.option("--warmup-shape", default="linear", show_default=True,
              type=click.Choice(["linear", "exponential", "constant"]))
@click.option("--warmup-start-factor", type=float, default=0.01, show_default=True,
              help="Warmup starts at this fraction of base_lr.")
@click.option("--param", "params", multiple=True, metavar="KEY=VALUE",
              help="A scheduler parameter, as in the study file (repeatable), e.g. gamma=0.1.")
@click.option("--val-losses", metavar="L0,L1,...",
              help="plateau: validation loss at the end of each epoch (else no reductions).")
@study_option(required=False)
@click.option("--trial", "trial_number", type=click.IntRange(min=0),
              help="Number of the trial of --study to redraw.")
@storage_option
@tracking_uri_option
@click.option("--csv", "as_csv", is_flag=True, help="Write the curve as CSV (step,lr) to stdout.")
@click.option("-o", "--output", type=click.Path(dir_okay=False),
              help="Write the curve to FILE.csv or FILE.png.")
@friendly_errors
def schedule(scheduler, base_lr, epochs, steps_per_epoch, warmup_steps, warmup_shape,
             warmup_start_factor, params, val_losses, study_name, trial_number, storage,
             tracking_uri, as_csv, output):
    """Preview a learning-rate curve without training, or redraw a finished trial's curve and
    check it against the lr metric in MLflow (exit 0 when the largest relative difference is at
    most 1e-9, else 1)."""
    from sweep.views.preview import schedule_command

    answer = schedule_command(scheduler, base_lr, epochs, steps_per_epoch, warmup_steps,
                              warmup_shape, warmup_start_factor, params, val_losses, study_name,
                              trial_number, storage, tracking_uri, as_csv,
                              Path(output) if output else None)
    # stdout carries the CSV alone; the description then goes to stderr
    click.echo(mask_url(answer.text), err=answer.csv is not None)
    if answer.csv is not None:
        click.echo(answer.csv, nl=False)
    sys.exit(answer.exit_code)


@click.command()
@tracking_uri_option
@study_option(required=False)
@server_options(5000, "the UI")
@friendly_errors
def ui(tracking_uri, study_name, port, host):
    """Start the MLflow UI for the tracking store and print the study's experiment URL."""
    from sweep.views.ui import serve_mlflow

    sys.exit(serve_mlflow(tracking_uri, host, port, study_name, echo=click.echo))


@click.command()
@storage_option
@study_option(required=False)
@server_options(8080, "the dashboard")
@friendly_errors
def dashboard(storage, study_name, port, host):
    """Start optuna-dashboard on the Optuna storage (pip install -e '.[dashboard]' in the checkout)."""
    from sweep.views.ui import serve_dashboard

    sys.exit(serve_dashboard(storage, host, port, study_name, echo=click.echo))
