"""The commands that read or change a study's record: ``status``, ``report``, ``best``, ``export``,
``list`` and ``delete``."""

from __future__ import annotations

import sys
import click

from sweep.base.urls import mask_url
from sweep.cli.options import (friendly_errors, study_option, storage_option, tracking_uri_option, json_option, top_option, _echo_json, checkpoint_dir_option)


@click.command()
@study_option()
@storage_option
@tracking_uri_option
@click.option("--repair", is_flag=True,
              help="Replay the MLflow spool into the store, fail stale RUNNING trials (and "
                   "re-enqueue them by the retry rule), end MLflow runs whose trial is finished "
                   "and remove checkpoint files of no live trial.")
@checkpoint_dir_option
@json_option
@friendly_errors
def status(study_name, storage, tracking_uri, repair, checkpoint_dir, as_json):
    """Counts per state, running trials (host, pid, heartbeat age), stale MLflow runs, checkpoint
    files of no live trial. Exit 0: all well; 3: MLflow lacks points or points wait in a spool;
    4: stale trials (RUNNING with no live worker); 2: bad input."""
    from sweep import api

    # stdout stays one JSON document: what a repair said goes to stderr then
    facts = api.load(study_name, storage=storage, tracking_uri=tracking_uri).status(
        repair, checkpoint_dir, log=lambda line: click.echo(mask_url(line), err=as_json))
    if as_json:
        _echo_json(facts.as_json())
    else:
        click.echo(mask_url(facts.text()))
    sys.exit(facts.exit_code)


@click.command()
@study_option()
@storage_option
@tracking_uri_option
@click.option("-o", "--output", "output", default=None, metavar="DIR",
              help="Report folder [default: reports/STUDY].")
@top_option("How many of the best trials get LR and accuracy curves.", default=5, high=10)
@click.option("--top-k", "top_k", type=click.IntRange(min=1, max=10), hidden=True,
              help="Deprecated name of --top.")
@friendly_errors
def report(study_name, storage, tracking_uri, output, top, top_k):
    """Write index.html + summary.md + PNG plots answering the study's question; log them to
    the study's parent MLflow run under report/."""
    from sweep import api

    if top_k is not None:
        click.echo("note: --top-k is deprecated; use --top", err=True)
        top = top_k
    study = api.load(study_name, storage=storage, tracking_uri=tracking_uri)
    click.echo(mask_url(study.report(output, top).text))


@click.command()
@study_option()
@storage_option
@tracking_uri_option
@click.option("--per", metavar="PARAM",
              help="The best of each choice of this categorical search parameter, e.g. "
                   "--per scheduler.")
@json_option
@friendly_errors
def best(study_name, storage, tracking_uri, per, as_json):
    """The best complete search trial: value, parameters, trial number and MLflow run id (exit
    1 when no trial has completed yet)."""
    from sweep import api
    from sweep.views.trials import best_text

    data = api.load(study_name, storage=storage, tracking_uri=tracking_uri).best(per)
    if as_json:
        _echo_json(data)
    else:
        click.echo(mask_url(best_text(data)))


@click.command()
@study_option()
@storage_option
@tracking_uri_option
@click.option("--format", "fmt", required=True, metavar="csv|json",
              help="csv: one row per trial, per-epoch metrics as columns; json: nested.")
@click.option("-o", "--output", required=True, metavar="FILE", help="The file to write.")
@friendly_errors
def export(study_name, storage, tracking_uri, fmt, output):
    """Write one record per trial: number, state, value, every parameter, epochs trained,
    per-epoch metrics and the MLflow run id."""
    from sweep import api
    from sweep.views.trials import check_output

    check_output(fmt, output)  # before any store is opened
    study = api.load(study_name, storage=storage, tracking_uri=tracking_uri)
    click.echo(mask_url(study.export(output, fmt)))


@click.command(name="list")
@storage_option
@json_option
@friendly_errors
def list_command(storage, as_json):
    """Study files in studies/ and the studies in the storage (trials, best value)."""
    from sweep.views.ui import list_data, list_studies

    if as_json:
        _echo_json(list_data(storage))
    else:
        click.echo(mask_url(list_studies(storage)))


@click.command()
@study_option()
@storage_option
@tracking_uri_option
@checkpoint_dir_option
@click.option("--yes", is_flag=True, help="Really remove; without it, only say what would go.")
@friendly_errors
def delete(study_name, storage, tracking_uri, checkpoint_dir, yes):
    """Remove a study everywhere: its Optuna study, its MLflow runs (the experiment when it is
    left empty), its checkpoints and its spool. Without --yes, print what would be removed."""
    from sweep.commands.delete import delete_study, plan_delete

    plan = plan_delete(study_name, storage, tracking_uri, checkpoint_dir)
    lines = delete_study(plan) if yes else plan.lines(done=False)
    click.echo(mask_url("\n".join(lines)))
