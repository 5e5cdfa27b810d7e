"""The options the commands share, and how a command's errors become one line and an exit status."""

from __future__ import annotations

import functools
import os
import signal
import sys
from pathlib import Path

import click

from sweep.errors import SweepError
from sweep.stores import DEFAULT_STORAGE
from sweep.base.urls import mask_url
from sweep.record import DEFAULT_TRACKING_URI


def friendly_errors(fn):
    """A ``SweepError`` becomes one line on stderr and exit status 2, without a traceback; a
    Ctrl-C, exit status 130."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except SweepError as err:
            one_line = str(err).replace("\r", "\\r").replace("\n", "\\n")  # never two lines
            click.echo(f"error: {mask_url(one_line)}", err=True)
            sys.exit(err.exit_code)
        except KeyboardInterrupt:
            # Ctrl-C outside training (loading data, or a second one while a stopped trial is
            # being recorded): 130 like the guarded path, not click's "Aborted!" and status 1.
            # The stores are transactional; the next launch reconciles what was left.
            click.echo("interrupted", err=True)
            sys.exit(128 + signal.SIGINT)

    return wrapper


def _absolute_dir(ctx, param, value):
    """A relative --data-dir (or SWEEP_DATA_DIR) means "relative to where I ran the command":
    made absolute here, once, so workers, SLURM tasks and subprocesses that start elsewhere
    read the same folder."""
    return str(Path(value).expanduser().resolve()) if value else None


def _complete_study(ctx, param, incomplete: str):
    """Shell completion of --study: the study names in the storage the command line names (or
    SWEEP_STORAGE, or the default), silently none when it is unreachable, then the study files
    in studies/. Prints nothing: a completion must never show a URL or its credentials."""
    from sweep.stores import study_names
    from sweep.study.spec import available_studies

    url = ctx.params.get("storage") or os.environ.get("SWEEP_STORAGE") or DEFAULT_STORAGE
    try:
        names = study_names(url) + available_studies()
    except Exception:
        names = []
    return [n for n in dict.fromkeys(names) if n.startswith(incomplete)]


# Options that several commands share, declared once each (with one help text).
STUDY_HELP = ("The study: its name (as in the storage; for launch, worker, submit and confirm "
              "the file studies/NAME.yaml) or the path of its YAML study file.")


def study_option(required: bool = True):
    """--study, the same meaning and help text on every command (optional where a command works
    without a study)."""
    return click.option("--study", "study_name", required=required, default=None,
                        help=STUDY_HELP, shell_complete=_complete_study)


storage_option = click.option("--storage", envvar="SWEEP_STORAGE", default=DEFAULT_STORAGE,
                              show_default=True, help="Optuna storage URL [env SWEEP_STORAGE].")
tracking_uri_option = click.option("--tracking-uri", envvar="MLFLOW_TRACKING_URI",
                                   default=DEFAULT_TRACKING_URI, show_default=True,
                                   help="MLflow tracking URI [env MLFLOW_TRACKING_URI].")
data_dir_option = click.option(
    "--data-dir", envvar="SWEEP_DATA_DIR", default=None, callback=_absolute_dir,
    help="Folder holding cifar-10-batches-py/ (cifar-100-python/ for data.dataset: cifar100), "
         "relative to where sweep runs [env SWEEP_DATA_DIR; default: user cache, downloaded "
         "when absent; on a cluster: a folder the nodes share].")
device_option = click.option("--device", default="auto", show_default=True,
                             help="auto, cpu, cuda or cuda:N (in each worker or array task).")
set_option = click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
                          help="Override a fixed field of the study file, e.g. train.epochs=3 "
                               "(repeatable).")
trials_option = click.option(
    "--trials", type=click.IntRange(min=1),
    help="Total trial budget of the study, stored for later launches and workers [default: the "
         "stored budget, else the study file's trials].")
allow_space_change_option = click.option(
    "--allow-space-change", is_flag=True,
    help="Resume even if the search space changed (the change is recorded).")
allow_config_change_option = click.option(
    "--allow-config-change", is_flag=True,
    help="Resume even if the training settings (train.*, data.*, objective, divergence, pruner, "
         "seed) changed (the change is recorded).")
quiet_option = click.option("--quiet", is_flag=True, help="No progress bars.")
json_option = click.option("--json", "as_json", is_flag=True,
                           help="Print JSON (keys in docs/scripting.md) instead of text.")


def top_option(help_text: str, default: int | None = None, high: int | None = None):
    """--top, the one name for "how many of the best" on every command."""
    return click.option("--top", type=click.IntRange(min=1, max=high), default=default,
                        show_default=default is not None, help=help_text)


def _echo_json(data) -> None:
    import json

    click.echo(mask_url(json.dumps(data, indent=1, allow_nan=False)))
checkpoint_dir_option = click.option(
    "--checkpoint-dir", envvar="SWEEP_CHECKPOINT_DIR", default=None, callback=_absolute_dir,
    help="Where trials checkpoint each epoch, to resume after an interruption [env "
         "SWEEP_CHECKPOINT_DIR; default: sweep-checkpoints/ beside the Optuna store; on a "
         "cluster: a folder the nodes share].")


def server_options(default_port: int, what: str):
    """--port and --host of a command that serves ``what`` on this machine."""
    def decorate(fn):
        fn = click.option("--host", default="127.0.0.1", show_default=True,
                          help=f"Interface to bind; anything but loopback exposes {what} to the "
                               f"network.")(fn)
        return click.option("--port", type=click.IntRange(0, 65535), default=default_port,
                            show_default=True, help="Port (0: any free port).")(fn)
    return decorate


def silence_known_warnings() -> None:
    """sweep's warning filters (``api.ignore_known_warnings``), set once per command for the
    whole process (library modules set none: they would hide warnings their callers want)."""
    from sweep.api import ignore_known_warnings

    ignore_known_warnings()

