"""``sweep submit``: one SLURM job array whose tasks are ``sweep worker`` processes.

Everything that can fail on user input is checked before anything is created; then the study,
the MLflow experiment and the parent run are created up front (so K tasks starting at once
only open existing stores); then two files are written into the job folder:

* ``sweep-NAME.STAMP.env`` (mode 0600, one per submission, created whole): ``SWEEP_STORAGE`` and
  ``MLFLOW_TRACKING_URI`` with their real credentials. The batch script sources it, so the
  script itself, which SLURM copies into its spool and shows via ``scontrol write
  batch_script``, carries no password; pending tasks of an earlier array keep reading theirs.
* ``sweep-NAME.sbatch``: the array (``slurm_script`` writes it: quoting, ``--time``, the
  interpreter). The task ``exec``s the worker, so the worker *is* the batch shell: ``scancel``,
  preemption and ``--signal=B:TERM@60`` (60 s before the time limit) deliver SIGTERM to it,
  and it ends its trial FAIL (re-enqueued) / KILLED in MLflow.

What a particular cluster asks for (account, QOS, memory, features, other sbatch options, set-up
lines) is checked and rendered by ``slurm_site``. Before anything is created, ``sbatch
--test-only`` shows the script to slurmctld, so a job the cluster would refuse (an unknown
feature, more memory than any node has, a bad partition, an account it refuses) is refused in
one line with nothing written. A SQLite or journal storage is refused for an array of more than
one task (its lock holds on one host) unless ``--single-node`` throttles it to one task at a
time. Nothing here talks to slurmctld except ``sbatch`` itself
(``SLURM_CONF`` is honoured).
"""

from __future__ import annotations

import os
import re
import secrets
import shlex
import shutil
import subprocess
import time
from pathlib import Path

from sweep.base.urls import journal_path, local_file, mask_url, sqlite_path
from sweep.commands.slurm_script import (SubmitOptions, check_flags, check_names, render_script,
                                         worker_program)
from sweep.errors import SubmitError
from sweep.record import spool_root as find_spool_root

__all__ = ["SubmitOptions", "submit"]



def check_submit(opts: SubmitOptions, study_name: str, storage: str) -> None:
    """Validate the flags, the names the script carries and the storage; creates nothing."""
    check_flags(opts)
    check_names(study_name, opts.job_dir, Path.cwd())
    if opts.array > 1 and not opts.single_node and local_file(storage) is not None:
        kind = "journal" if journal_path(storage) is not None else "SQLite"
        raise SubmitError(
            f"--array {opts.array} with {kind} storage {mask_url(storage)}: its lock that keeps "
            f"two workers from taking one trial holds on one host only, and tasks may run on "
            f"several nodes; use a PostgreSQL storage (--storage postgresql://USER@HOST/DB), or "
            f"pass --single-node to run the tasks one at a time")
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


def write_private(path: Path, text: str) -> None:
    """Create ``path`` holding ``text``, readable by the owner only, all at once: written to a
    fresh temporary file (O_EXCL, 0600) beside it, flushed, then renamed into place, so a reader
    sees either no file or the whole of it, never a truncated one."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    temp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.fchmod(fd, 0o600)  # whatever the umask
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.rename(temp, path)
    except BaseException:
        temp.unlink(missing_ok=True)
        raise


def submission_files(job_dir: Path, study_name: str) -> tuple[Path, Path]:
    """(env file, script) of one submission. The env file's name is this submission's own
    (time and a random part), so pending tasks of an earlier array keep reading theirs; the
    script is ``sweep-NAME.sbatch``, the latest (sbatch keeps its own copy of each)."""
    stamp = f"{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(3)}"
    name = f"sweep-{study_name}"
    return job_dir / f"{name}.{stamp}.env", job_dir / f"{name}.sbatch"


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

    from sweep.stores import resolve_dir
    from sweep.commands.launch import open_study_stores, worker_command
    from sweep.stores import check_storage_url
    from sweep.record import check_tracking_uri

    check_submit(opts, spec.name, launch_opts.storage)
    launch_opts = replace(launch_opts, storage=absolute_url(launch_opts.storage),
                          tracking_uri=absolute_url(launch_opts.tracking_uri))
    # every task, on whichever node, checkpoints to the same folder (it must be shared)
    checkpoints = resolve_dir(launch_opts.checkpoint_dir, launch_opts.storage)
    launch_opts = replace(launch_opts, checkpoint_dir=str(checkpoints))
    storage, tracking = launch_opts.storage, launch_opts.tracking_uri
    check_storage_url(storage)
    check_tracking_uri(tracking)
    name = f"sweep-{spec.name}"
    env_file, script_file = submission_files(opts.job_dir, spec.name)
    worker = worker_command(spec, launch_opts, overrides, program=worker_program(opts.python))
    script = render_script(spec.name, worker, opts, env_file)
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
    write_private(script_file, script)  # no secret in it; written whole, like the env file
    script_file.chmod(0o644)
    job_id = sbatch(script_file)
    # shell-ready: a name or folder with spaces or quotes is pasted as one word
    out = shlex.quote(str(opts.job_dir.resolve() / f"{name}-{job_id}_")) + "*.out"
    workers = f"{opts.array} worker{'s' if opts.array > 1 else ''}"
    note = ("\nnote: --single-node: SLURM runs the tasks one at a time, so one node at a time "
            "holds the study's file store; PostgreSQL runs them together (see docs/clusters.md)"
            if opts.single_node and opts.array > 1 else "")
    return (f"submitted job {job_id}: array of {workers} for study {spec.name!r} "
            f"(budget {budget} trials)\n"
            f"  script: {script_file} (URLs from {env_file}, mode 0600)\n"
            f"  follow: squeue -j {job_id}    tail -f {out}\n"
            f"  status: sweep status --study {shlex.quote(spec.name)} "
            f"--storage {shlex.quote(mask_url(storage))} "
            f"--tracking-uri {shlex.quote(mask_url(tracking))}\n"
            f"  checkpoints: {checkpoints} (must be on a file system every node shares)\n"
            f"  MLflow spool: {spool_root} (shared too; `sweep status --repair` replays it)\n"
            f"  cancel: scancel {job_id} (running trials end FAIL/KILLED and are re-enqueued; "
            f"their retries resume from their last finished epoch)"
            + note)
