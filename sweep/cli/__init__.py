"""The ``sweep`` command. Thin: parse flags, call a plain function (``sweep.api`` or a command
module), map errors to exit statuses (``options.friendly_errors``). One module per group of
commands: ``train`` (launch, confirm, worker, submit), ``inspect`` (status, report, best, export,
list, delete) and ``tools`` (validate, schedule, ui, dashboard)."""

from __future__ import annotations

import click

from sweep.cli.inspect import best, delete, export, list_command, report, status
from sweep.cli.options import silence_known_warnings
from sweep.cli.tools import dashboard, schedule, ui, validate
from sweep.cli.train import confirm, launch, submit, worker

__all__ = ["main"]


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="sweep")
def main():
    """Hyperparameter sweeps over learning-rate schedules: Optuna trials, MLflow curves."""
    silence_known_warnings()


for command in (launch, confirm, worker, submit, status, report, best, export, list_command,
                delete, validate, schedule, ui, dashboard):
    main.add_command(command)
