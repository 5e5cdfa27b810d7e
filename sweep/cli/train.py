"""The commands that train: ``launch``, ``confirm``, ``worker`` and ``submit`` (SLURM)."""

from __future__ import annotations

from pathlib import Path
import sys
import click

from sweep.base.urls import mask_url
from sweep.cli.options import (friendly_errors, study_option, storage_option, tracking_uri_option, data_dir_option, device_option, set_option, trials_option, allow_space_change_option, allow_config_change_option, quiet_option, top_option, checkpoint_dir_option)


@click.command()
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


@click.command()
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


@click.command()
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


@click.command()
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
