"""The ``sweep`` command. Thin: parse flags, call a plain function, map errors to exit 2."""

from __future__ import annotations

import functools
import signal
import sys
from pathlib import Path

import click

from sweep.errors import SweepError
from sweep.orchestration.storage import DEFAULT_STORAGE, mask_url
from sweep.orchestration.tracking import DEFAULT_TRACKING_URI


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


# Options that several commands share, declared once each (with one help text).
study_option = click.option("--study", "study_name", required=True,
                            help="Name in studies/ or path to a YAML file.")
storage_option = click.option("--storage", envvar="SWEEP_STORAGE", default=DEFAULT_STORAGE,
                              show_default=True, help="Optuna storage URL [env SWEEP_STORAGE].")
tracking_uri_option = click.option("--tracking-uri", envvar="MLFLOW_TRACKING_URI",
                                   default=DEFAULT_TRACKING_URI, show_default=True,
                                   help="MLflow tracking URI [env MLFLOW_TRACKING_URI].")
data_dir_option = click.option(
    "--data-dir", envvar="SWEEP_DATA_DIR", default=None, callback=_absolute_dir,
    help="Folder holding cifar-10-batches-py/, relative to where sweep runs [env SWEEP_DATA_DIR; "
         "default: user cache, downloaded when absent; on a cluster: a folder the nodes share].")
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
quiet_option = click.option("--quiet", is_flag=True, help="No progress bars.")
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
    """Every warning filter of sweep, in one place, set once per command (library modules set
    none: a process-wide filter from a library would hide warnings its callers want).

    Optuna marks heartbeats, the stale-trial retry callback and PatientPruner experimental and
    warns that heartbeats are meant for ``study.optimize``; sweep relies on them deliberately
    (it owns the ask/tell loop and beats itself), and one such line per storage opened would
    bury the per-trial lines in batch jobs' output files."""
    import warnings

    import optuna

    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    warnings.filterwarnings("ignore", message="Heartbeat of storage is supposed to be used with",
                            category=UserWarning)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="sweep")
def main():
    """Hyperparameter sweeps over learning-rate schedules: Optuna trials, MLflow curves."""
    _silence_known_warnings()


@main.command()
@study_option
@trials_option
@storage_option
@tracking_uri_option
@data_dir_option
@device_option
@set_option
@click.option("--seed", type=int, help="Override the study's seed.")
@allow_space_change_option
@quiet_option
@checkpoint_dir_option
@click.option("--workers", type=click.IntRange(min=1), default=1, show_default=True,
              help="Worker processes sharing the study (each its own GPU when there are several).")
@click.option("--workers-per-device", type=click.IntRange(min=1), default=1, show_default=True,
              help="With --workers and several GPUs: workers per GPU.")
@friendly_errors
def launch(study_name, trials, storage, tracking_uri, data_dir, device, overrides, seed,
           allow_space_change, quiet, checkpoint_dir, workers, workers_per_device):
    """Create or resume a study and run its trials on this machine."""
    from sweep.orchestration.launch import LaunchOptions, launch as run_launch
    from sweep.study.spec import load_study
    from sweep.views.console import Console

    overrides = list(overrides) + ([f"seed={seed}"] if seed is not None else [])
    spec = load_study(study_name, overrides)
    opts = LaunchOptions(storage, tracking_uri, data_dir, device, trials, allow_space_change,
                         checkpoint_dir)
    if workers > 1:
        from sweep.orchestration.pool import PoolOptions, launch_pool

        result = launch_pool(spec, opts, PoolOptions(workers, workers_per_device, tuple(overrides)),
                             Console(tracking_uri, quiet))
    else:
        result = run_launch(spec, opts, Console(tracking_uri, quiet))
    click.echo(mask_url(result.text))
    sys.exit(result.exit_code)


@main.command()
@study_option
@click.option("--seeds", type=click.IntRange(min=2),
              help="Fresh seeds per configuration [default: 5; a resumed confirmation keeps its own].")
@click.option("--top", type=click.IntRange(min=1),
              help="Best configurations per scheduler type [default: 1].")
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
    from sweep.orchestration.confirm import confirm as run_confirm
    from sweep.orchestration.launch import LaunchOptions
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
@study_option
@storage_option
@tracking_uri_option
@trials_option
@data_dir_option
@device_option
@set_option
@allow_space_change_option
@quiet_option
@checkpoint_dir_option
@friendly_errors
def worker(study_name, storage, tracking_uri, trials, data_dir, device, overrides,
           allow_space_change, quiet, checkpoint_dir):
    """Pull trials from a shared study until its total budget is used (one of many workers)."""
    from sweep.orchestration.launch import LaunchOptions, worker_main
    from sweep.study.spec import load_study

    spec = load_study(study_name, list(overrides))
    result = worker_main(spec, LaunchOptions(storage, tracking_uri, data_dir, device, trials,
                                             allow_space_change, checkpoint_dir),
                         log=lambda line: click.echo(mask_url(line)))
    click.echo(mask_url(result.text))
    sys.exit(result.exit_code)


@main.command()
@click.option("--study", "study_name", required=True, help="Study name (or its study file).")
@storage_option
@tracking_uri_option
@click.option("--repair", is_flag=True,
              help="Fail stale RUNNING trials and end MLflow runs whose trial is finished.")
@friendly_errors
def status(study_name, storage, tracking_uri, repair):
    """Counts per state, running trials (host, pid, heartbeat age), stale MLflow runs, the MLflow
    record's completeness. Exit status 3: points are missing in MLflow, wait in a spool or were
    set aside."""
    from sweep.orchestration.status import show_status

    result = show_status(study_name, storage, tracking_uri, repair)
    click.echo(mask_url(result.text))
    sys.exit(result.exit_code)


@main.command()
@study_option
@click.option("--array", type=int, required=True, help="Number of array tasks (= workers).")
@storage_option
@tracking_uri_option
@click.option("--partition", help="SLURM partition.")
@click.option("--gpus-per-task", type=int, default=0, show_default=True, help="GPUs per worker.")
@click.option("--cpus-per-task", type=int, help="CPUs per worker.")
@click.option("--time", "time_limit", help="Time limit per task, HH:MM:SS or D-HH:MM:SS.")
@trials_option
@data_dir_option
@device_option
@set_option
@click.option("--job-dir", default="sweep-jobs", show_default=True,
              help="Where the script, its 0600 env file and the tasks' output files go.")
@allow_space_change_option
@checkpoint_dir_option
@click.option("--requeue", is_flag=True,
              help="Let SLURM requeue a task that is preempted or whose node fails (#SBATCH "
                   "--requeue); its trials resume from their checkpoints.")
@click.option("--dry-run", is_flag=True, help="Print the sbatch script; create and submit nothing.")
@friendly_errors
def submit(study_name, array, storage, tracking_uri, partition, gpus_per_task, cpus_per_task,
           time_limit, trials, data_dir, device, overrides, job_dir, allow_space_change,
           checkpoint_dir, requeue, dry_run):
    """Submit a SLURM job array of ``sweep worker`` tasks sharing one study."""
    from pathlib import Path

    from sweep.orchestration.launch import LaunchOptions
    from sweep.orchestration.slurm import SubmitOptions, submit as run_submit
    from sweep.study.spec import load_study

    spec = load_study(study_name, list(overrides))
    text = run_submit(spec, LaunchOptions(storage, tracking_uri, data_dir, device, trials,
                                          allow_space_change, checkpoint_dir),
                      SubmitOptions(array, Path(job_dir), partition, gpus_per_task, time_limit,
                                    cpus_per_task, dry_run, requeue), list(overrides))
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
@click.option("--study", "study_name", help="Redraw a trial of this study (with --trial).")
@click.option("--trial", "trial_number", type=click.IntRange(min=0), help="Trial number.")
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
    check it against the lr metric in MLflow (exit 0 when equal to 1e-9, else 1)."""
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
@click.option("--study", "study_name", required=True, help="Study name (as in the storage).")
@storage_option
@tracking_uri_option
@click.option("-o", "--output", "output", default=None, metavar="DIR",
              help="Report folder [default: reports/STUDY].")
@click.option("--top-k", type=click.IntRange(min=1, max=10), default=5, show_default=True,
              help="How many of the best trials get LR and accuracy curves.")
@friendly_errors
def report(study_name, storage, tracking_uri, output, top_k):
    """Write index.html + summary.md + PNG plots answering the study's question; log them to
    the study's parent MLflow run under report/."""
    from sweep.views.report import write_report

    result = write_report(study_name, storage, tracking_uri, output, top_k)
    click.echo(mask_url(result.text))


@main.command()
@tracking_uri_option
@click.option("--study", "study_name", default=None, help="Print this study's experiment URL.")
@server_options(5000, "the UI")
@friendly_errors
def ui(tracking_uri, study_name, port, host):
    """Start the MLflow UI for the tracking store and print the study's experiment URL."""
    from sweep.views.ui import serve_mlflow

    sys.exit(serve_mlflow(tracking_uri, host, port, study_name, echo=click.echo))


@main.command()
@storage_option
@click.option("--study", "study_name", default=None, help="Print this study's page URL.")
@server_options(8080, "the dashboard")
@friendly_errors
def dashboard(storage, study_name, port, host):
    """Start optuna-dashboard on the Optuna storage (pip install 'sweep[dashboard]')."""
    from sweep.views.ui import serve_dashboard

    sys.exit(serve_dashboard(storage, host, port, study_name, echo=click.echo))


@main.command(name="list")
@storage_option
@friendly_errors
def list_command(storage):
    """Study files in studies/ and the studies in the storage (trials, best value)."""
    from sweep.views.ui import list_studies

    click.echo(mask_url(list_studies(storage)))


if __name__ == "__main__":
    main()
