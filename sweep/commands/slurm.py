"""``sweep submit``: one SLURM job array whose tasks are ``sweep worker`` processes.

Everything that can fail on user input is checked before anything is created; then the study,
the MLflow experiment and the parent run are created up front (so K tasks starting at once
only open existing stores); then two files are written into the job folder:

* ``NAME.env`` (mode 0600): ``SWEEP_STORAGE`` and ``MLFLOW_TRACKING_URI`` with their real
  credentials. The batch script sources it, so the script itself, which SLURM copies into its
  spool and shows via ``scontrol write batch_script``, carries no password.
* ``NAME.sbatch``: the array. The task ``exec``s the worker, so the worker *is* the batch
  shell: ``scancel``, preemption and ``--signal=B:TERM@60`` (60 s before the time limit)
  deliver SIGTERM to it, and it ends its trial FAIL (re-enqueued) / KILLED in MLflow.

What a particular cluster asks for (account, QOS, memory, features, other sbatch options, set-up
lines) is checked and rendered by ``slurm_site``. Before anything is created, ``sbatch
--test-only`` shows the script to slurmctld, so a job the cluster would refuse (an unknown
feature, more memory than any node has, a bad partition, an account it refuses) is refused in
one line with nothing written. Nothing here talks to slurmctld except ``sbatch`` itself
(``SLURM_CONF`` is honoured).
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from sweep.errors import SubmitError
from sweep.commands.slurm_site import SiteOptions, check_site, setup_block, site_directives
from sweep.record import spool_root as find_spool_root
from sweep.base.urls import journal_path, mask_url, sqlite_path

_TIME = re.compile(r"^(\d+-)?\d{1,3}:[0-5]\d:[0-5]\d$")
_PARTITION = re.compile(r"^[\w.,-]+$")
KILL_NOTICE_S = 60  # SIGTERM this long before the time limit: enough to end a trial cleanly


@dataclass(frozen=True)
class SubmitOptions:
    array: int
    job_dir: Path
    partition: str | None = None
    gpus_per_task: int = 0
    time: str | None = None
    cpus_per_task: int | None = None
    dry_run: bool = False
    requeue: bool = False  # SLURM requeues a preempted task / one on a failed node
    site: SiteOptions = SiteOptions()  # account, QOS, memory, features, pass-through, set-up


def check_submit(opts: SubmitOptions) -> None:
    """Validate the flags; creates nothing."""
    if opts.array < 1:
        raise SubmitError(f"--array {opts.array}: must be at least 1 (one worker per task)")
    if opts.time is not None and not _TIME.match(opts.time):
        raise SubmitError(f"--time {opts.time!r}: use HH:MM:SS or D-HH:MM:SS, e.g. 04:00:00")
    if opts.partition is not None and not _PARTITION.match(opts.partition):
        raise SubmitError(f"--partition {opts.partition!r}: not a SLURM partition name")
    if opts.gpus_per_task < 0 or (opts.cpus_per_task is not None and opts.cpus_per_task < 1):
        raise SubmitError("--gpus-per-task must be >= 0 and --cpus-per-task >= 1")
    check_site(opts.site)
    if not opts.dry_run and shutil.which("sbatch") is None:
        raise SubmitError("sbatch not found on PATH; run sweep submit on a SLURM login node, or "
                          "use --dry-run to see the script")
    parent = opts.job_dir if opts.job_dir.exists() else opts.job_dir.parent
    if not os.access(parent if str(parent) else ".", os.W_OK):
        raise SubmitError(f"job folder {opts.job_dir} is not writable; pass --job-dir DIR")


def absolute_url(url: str) -> str:
    """``sqlite:///rel.db`` / ``journal:///rel.log`` -> absolute paths (tasks run elsewhere)."""
    path = sqlite_path(url)
    if path is not None:
        return f"sqlite:///{path.resolve()}"
    journal = journal_path(url)
    if journal is not None:
        return f"journal:///{journal.resolve()}"
    return url


def render_script(study_name: str, worker_cmd: list[str], opts: SubmitOptions,
                  env_file: Path) -> str:
    """The sbatch script (no credentials in it)."""
    job = f"sweep-{study_name}"
    out = opts.job_dir.resolve() / f"{job}-%A_%a.out"
    lines = ["#!/bin/bash",
             f"# sweep submit: {opts.array} workers of study {study_name!r}, one per array task.",
             *site_directives(opts.site),  # first: where two lines disagree, sbatch takes the last
             f"#SBATCH --job-name={job}",
             f"#SBATCH --array=0-{opts.array - 1}",
             "#SBATCH --ntasks=1",
             f"#SBATCH --output={out}",
             f"#SBATCH --chdir={Path.cwd()}",
             # SIGTERM to the batch shell (the worker, see exec below) before the time limit.
             f"#SBATCH --signal=B:TERM@{KILL_NOTICE_S}"]
    if opts.partition:
        lines.append(f"#SBATCH --partition={opts.partition}")
    if opts.time:
        lines.append(f"#SBATCH --time={opts.time}")
    if opts.gpus_per_task:
        lines.append(f"#SBATCH --gpus-per-task={opts.gpus_per_task}")
    if opts.cpus_per_task:
        lines.append(f"#SBATCH --cpus-per-task={opts.cpus_per_task}")
    if opts.requeue:
        # A requeued task starts its worker again, which resumes the trials it was training
        # from their checkpoints; append: the output file keeps every run of the task.
        lines += ["#SBATCH --requeue", "#SBATCH --open-mode=append"]
    lines += [
        "",
        "# Storage and tracking URLs (with credentials) live in a mode-0600 file, not here.",
        f"set -a; . {shlex.quote(str(env_file.resolve()))}; set +a",
        "# torch uses this many threads on the CPU: the task's CPUs, not the node's.",
        'export OMP_NUM_THREADS="${OMP_NUM_THREADS:-${SLURM_CPUS_PER_TASK:-1}}"',
        'echo "task ${SLURM_ARRAY_TASK_ID} on $(hostname): job ${SLURM_JOB_ID}"',
        *setup_block(opts.site),
        "# exec: the worker replaces this shell, so scancel/preemption SIGTERM reaches it.",
        "exec " + " ".join(shlex.quote(a) for a in worker_cmd),
        "",
    ]
    return "\n".join(lines)


def write_private(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` readable by the owner only (created 0600, never wider)."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    os.fchmod(fd, 0o600)  # an existing file keeps its mode under O_CREAT
    with os.fdopen(fd, "w") as f:
        f.write(text)


def env_text(values: dict[str, str]) -> str:
    return "".join(f"{key}={shlex.quote(value)}\n" for key, value in values.items())


def _run_sbatch(args: list[str], script_text: str | None = None) -> subprocess.CompletedProcess:
    try:
        return subprocess.run(["sbatch", *args], input=script_text, capture_output=True,
                              text=True, timeout=120)
    except (OSError, subprocess.TimeoutExpired) as err:
        raise SubmitError(f"sbatch could not run ({type(err).__name__}); check the SLURM "
                          f"client setup (SLURM_CONF)") from None


def _refusal(done: subprocess.CompletedProcess) -> str:
    """sbatch's reason on one line: its messages joined, without the "Try sbatch --help" hint."""
    said = []
    for line in (done.stderr + "\n" + done.stdout).splitlines():
        line = re.sub(r"^(sbatch: (error|fatal): |sbatch: |allocation failure: )", "", line.strip())
        if line and not line.startswith("Try ") and line not in said:
            said.append(line)
    return mask_url("; ".join(said) or f"exit status {done.returncode}, no message")


def sbatch_test_only(script_text: str) -> None:
    """Ask slurmctld whether it would accept the job (``sbatch --test-only``: nothing is queued).
    Raises SubmitError with sbatch's own reason when it would not."""
    done = _run_sbatch(["--test-only"], script_text)
    if done.returncode != 0:
        raise SubmitError(f"sbatch refused the job: {_refusal(done)} (checked with sbatch "
                          f"--test-only; nothing was created, written or submitted)")


def sbatch(script: Path) -> str:
    """Submit ``script``; returns the job id. Raises SubmitError with sbatch's own reason."""
    done = _run_sbatch(["--parsable", str(script)])
    if done.returncode != 0:
        raise SubmitError(f"sbatch refused the job: {_refusal(done)}; the script is {script}")
    return done.stdout.strip().split(";")[0]


def submit(spec, launch_opts, opts: SubmitOptions, overrides: list[str]) -> str:
    """Check, create the stores, write env file + script, then ``sbatch`` (or, with
    ``dry_run``, only print the script: nothing is created or written). Returns the text to show."""
    from dataclasses import replace

    from sweep.stores.checkpoints import resolve_dir
    from sweep.commands.launch import open_study_stores, worker_command
    from sweep.stores.storage import check_storage_url
    from sweep.record import check_tracking_uri

    check_submit(opts)
    launch_opts = replace(launch_opts, storage=absolute_url(launch_opts.storage),
                          tracking_uri=absolute_url(launch_opts.tracking_uri))
    # every task, on whichever node, checkpoints to the same folder (it must be shared)
    checkpoints = resolve_dir(launch_opts.checkpoint_dir, launch_opts.storage)
    launch_opts = replace(launch_opts, checkpoint_dir=str(checkpoints))
    storage, tracking = launch_opts.storage, launch_opts.tracking_uri
    check_storage_url(storage)
    check_tracking_uri(tracking)
    name = f"sweep-{spec.name}"
    env_file, script_file = opts.job_dir / f"{name}.env", opts.job_dir / f"{name}.sbatch"
    script = render_script(spec.name, worker_command(spec, launch_opts, overrides), opts, env_file)
    if opts.dry_run:
        return (f"# dry run: nothing created, written or submitted. The job would read the "
                f"storage and tracking URLs from {env_file} (mode 0600).\n" + script)
    sbatch_test_only(script)  # before the stores: a job SLURM refuses creates nothing
    budget = open_study_stores(spec, launch_opts, check_device=False, load_data=False).budget
    # Every task, on whichever node, spools to one folder the submit host can replay from: the
    # one `sweep status` finds here (SWEEP_SPOOL_DIR, else the per-user cache folder).
    spool_root = find_spool_root()
    values = {"SWEEP_STORAGE": storage, "MLFLOW_TRACKING_URI": tracking,
              "SWEEP_SPOOL_DIR": str(spool_root)}
    write_private(env_file, env_text(values))
    script_file.write_text(script)
    job_id = sbatch(script_file)
    out = opts.job_dir.resolve() / f"{name}-{job_id}_*.out"
    note = ("\nnote: SQLite on a cluster's shared file system is fragile; prefer postgresql:// "
            "(see docs/clusters.md)" if storage.startswith("sqlite") else "")
    return (f"submitted job {job_id}: array of {opts.array} workers for study {spec.name!r} "
            f"(budget {budget} trials)\n"
            f"  script: {script_file} (URLs from {env_file}, mode 0600)\n"
            f"  follow: squeue -j {job_id}    tail -f {out}\n"
            f"  status: sweep status --study {spec.name} --storage {mask_url(storage)} "
            f"--tracking-uri {mask_url(tracking)}\n"
            f"  checkpoints: {checkpoints} (must be on a file system every node shares)\n"
            f"  MLflow spool: {spool_root} (shared too; `sweep status --repair` replays it)\n"
            f"  cancel: scancel {job_id} (running trials end FAIL/KILLED and are re-enqueued; "
            f"their retries resume from their last finished epoch)"
            + note)
