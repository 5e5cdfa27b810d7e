"""The ``sweep`` command. Thin: parse flags, call a plain function, map errors to exit 2."""

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


def _silence_known_warnings() -> None:
    """sweep's warning filters (``api.ignore_known_warnings``), set once per command for the
    whole process (library modules set none: they would hide warnings their callers want)."""
    from sweep.api import ignore_known_warnings

    ignore_known_warnings()


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="sweep")
def main():
    """Hyperparameter sweeps over learning-rate schedules: Optuna trials, MLflow curves."""
    _silence_known_warnings()


@main.command()
@study_option()
@trials_option
@storage_option
@tracking_uri_option
@data_dir_option
@device_option
@set_option
@click.option("--seed", type=int, help="Override the study's seed.")
@allow_space_change_option
@allow_config_change_option
@quiet_option
@checkpoint_dir_option
@click.option("--workers", type=click.IntRange(min=1), default=1, show_default=True,
              help="Worker processes sharing the study (each its own GPU when there are several).")
@click.option("--workers-per-device", type=click.IntRange(min=1), default=1, show_default=True,
              help="With --workers and several GPUs: workers per GPU.")
@click.option("--dry-run", is_flag=True,
              help="Print the resolved study, T, the budget left, the fused pack size and the "
                   "estimated MLflow store size; create and run nothing.")
@friendly_errors
def launch(study_name, trials, storage, tracking_uri, data_dir, device, overrides, seed,
           allow_space_change, allow_config_change, quiet, checkpoint_dir, workers,
           workers_per_device, dry_run):
    """Create or resume a study and run its trials on this machine."""
    from sweep import api

    if dry_run:
        click.echo(mask_url(api.plan(study_name, trials=trials, overrides=overrides, seed=seed,
                                     storage=storage, tracking_uri=tracking_uri, device=device,
                                     checkpoint_dir=checkpoint_dir)))
        return
    result = api.launch(study_name, trials=trials, overrides=overrides, seed=seed,
                        storage=storage, tracking_uri=tracking_uri, data_dir=data_dir,
                        device=device, checkpoint_dir=checkpoint_dir, workers=workers,
                        workers_per_device=workers_per_device,
                        allow_space_change=allow_space_change,
                        allow_config_change=allow_config_change, progress=not quiet)
    click.echo(mask_url(result.text))
    sys.exit(result.exit_code)


@main.command()
@study_option()
@click.option("--seeds", type=click.IntRange(min=2),
              help="Fresh seeds per configuration [default: 5; a resumed confirmation keeps its own].")
@top_option("Best configurations per scheduler type [default: 1].")
@storage_option
@tracking_uri_option
@data_dir_option
@device_option
@set_option
@quiet_option
@checkpoint_dir_option
@friendly_errors
def confirm(study_name, seeds, top, storage, tracking_uri, data_dir, device, overrides, quiet,
            checkpoint_dir):
    """Retrain the best configuration of each scheduler type, and the best at other warmup
    lengths, with fresh seeds in the same study; then write the report with intervals."""
    from sweep.commands.confirm import confirm as run_confirm
    from sweep.commands.launch import LaunchOptions
    from sweep.study.spec import load_study
    from sweep.views.console import Console
    from sweep.views.report import write_report

    spec = load_study(study_name, list(overrides))
    result = run_confirm(spec, LaunchOptions(storage, tracking_uri, data_dir, device,
                                             checkpoint_dir=checkpoint_dir),
                         Console(tracking_uri, quiet), seeds, top,
                         log=lambda line: click.echo(mask_url(line)),
                         overrides_given=bool(overrides))
    click.echo(mask_url(result.text))
    if result.exit_code == 0:
        click.echo(mask_url(write_report(spec.name, storage, tracking_uri).text))
    sys.exit(result.exit_code)


@main.command()
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



# --- parallel workers, status, SLURM (issue 6) ------------------------------------------------

@main.command()
@study_option()
@storage_option
@tracking_uri_option
@trials_option
@data_dir_option
@device_option
@set_option
@allow_space_change_option
@allow_config_change_option
@quiet_option
@checkpoint_dir_option
@friendly_errors
def worker(study_name, storage, tracking_uri, trials, data_dir, device, overrides,
           allow_space_change, allow_config_change, quiet, checkpoint_dir):
    """Pull trials from a shared study until its total budget is used (one of many workers)."""
    from sweep.commands.launch import LaunchOptions, worker_main
    from sweep.study.spec import load_study

    spec = load_study(study_name, list(overrides))
    result = worker_main(spec, LaunchOptions(storage, tracking_uri, data_dir, device, trials,
                                             allow_space_change, checkpoint_dir,
                                             allow_config_change),
                         log=lambda line: click.echo(mask_url(line)))
    click.echo(mask_url(result.text))
    sys.exit(result.exit_code)


@main.command()
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


@main.command()
@study_option()
@click.option("--array", type=int, required=True, help="Number of array tasks (= workers).")
@storage_option
@tracking_uri_option
@click.option("--partition", help="SLURM partition.")
@click.option("--gpus-per-task", type=int, default=0, show_default=True, help="GPUs per worker.")
@click.option("--cpus-per-task", type=int, help="CPUs per worker.")
@click.option("--time", "time_limit", help="Time limit per task, in any form sbatch takes: "
                                            "MINUTES, MM:SS, HH:MM:SS, D-HH, D-HH:MM, "
                                            "D-HH:MM:SS, UNLIMITED.")
@trials_option
@data_dir_option
@device_option
@set_option
@click.option("--job-dir", default="sweep-jobs", show_default=True,
              help="Where the script, its 0600 env file and the tasks' output files go.")
@allow_space_change_option
@allow_config_change_option
@checkpoint_dir_option
@click.option("--requeue", is_flag=True,
              help="Let SLURM requeue a task that is preempted or whose node fails (#SBATCH "
                   "--requeue); its trials resume from their checkpoints.")
@click.option("--account", help="SLURM account to charge (#SBATCH --account).")
@click.option("--qos", help="SLURM quality of service (#SBATCH --qos).")
@click.option("--mem", help="Memory per task (= per worker), e.g. 16G (#SBATCH --mem).")
@click.option("--constraint", help="Node features the tasks need, e.g. 'a100|h100' "
                                   "(#SBATCH --constraint).")
@click.option("--sbatch-option", "sbatch_options", multiple=True, metavar="--KEY=VALUE",
              help="Any other sbatch long option, one per flag, written verbatim as an #SBATCH "
                   "line (repeatable).")
@click.option("--setup", multiple=True, metavar="LINE",
              help="A shell line each task runs before the worker starts, e.g. 'module load "
                   "cuda/12.4' (repeatable, in order; one that fails ends the task).")
@click.option("--python", "python", metavar="PATH|current",
              help="The Python on the compute nodes that runs the worker (PATH -m sweep.cli); "
                   "'current': the one running this command. Default: the `sweep` on the "
                   "node's PATH after the --setup lines.")
@click.option("--single-node", is_flag=True,
              help="With a SQLite or journal storage and --array > 1: run the tasks one at a "
                   "time (--array=0-(K-1)%1), so one node at a time holds the file.")
@click.option("--dry-run", is_flag=True, help="Print the sbatch script; create and submit nothing.")
@friendly_errors
def submit(study_name, array, storage, tracking_uri, partition, gpus_per_task, cpus_per_task,
           time_limit, trials, data_dir, device, overrides, job_dir, allow_space_change,
           allow_config_change, checkpoint_dir, requeue, account, qos, mem, constraint,
           sbatch_options, setup, python, single_node, dry_run):
    """Submit a SLURM job array of ``sweep worker`` tasks sharing one study."""
    from pathlib import Path

    from sweep.commands.launch import LaunchOptions
    from sweep.commands.slurm import SubmitOptions, submit as run_submit
    from sweep.commands.slurm_site import SiteOptions
    from sweep.study.spec import load_study

    spec = load_study(study_name, list(overrides))
    site = SiteOptions(account, qos, mem, constraint, tuple(sbatch_options), tuple(setup))
    text = run_submit(spec, LaunchOptions(storage, tracking_uri, data_dir, device, trials,
                                          allow_space_change, checkpoint_dir, allow_config_change),
                      SubmitOptions(array, Path(job_dir), partition, gpus_per_task, time_limit,
                                    cpus_per_task, dry_run, requeue, site, python, single_node),
                      list(overrides))
    click.echo(mask_url(text))


@main.command()
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


# --- report, MLflow UI, optuna-dashboard, list (issue 7) --------------------------------------

@main.command()
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


@main.command()
@tracking_uri_option
@study_option(required=False)
@server_options(5000, "the UI")
@friendly_errors
def ui(tracking_uri, study_name, port, host):
    """Start the MLflow UI for the tracking store and print the study's experiment URL."""
    from sweep.views.ui import serve_mlflow

    sys.exit(serve_mlflow(tracking_uri, host, port, study_name, echo=click.echo))


@main.command()
@storage_option
@study_option(required=False)
@server_options(8080, "the dashboard")
@friendly_errors
def dashboard(storage, study_name, port, host):
    """Start optuna-dashboard on the Optuna storage (pip install -e '.[dashboard]' in the checkout)."""
    from sweep.views.ui import serve_dashboard

    sys.exit(serve_dashboard(storage, host, port, study_name, echo=click.echo))


@main.command(name="list")
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


# --- for scripts: best, export, delete --------------------------------------------------------

@main.command()
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


@main.command()
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


@main.command()
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


if __name__ == "__main__":
    main()
