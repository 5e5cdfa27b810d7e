"""The batch script ``sweep submit`` writes, and the checks that make it right for any study
name, any folder and any ``--time``.

sbatch reads ``#SBATCH`` lines with its own small parser: a word ends at whitespace unless it is
inside quotes, a backslash escapes the next character, an unquoted ``#`` ends the line, and the
directives end at the first line that is not a comment. So every value sweep writes there from
user input (the job name, the output file, the working folder) is written as one double-quoted
word with ``\\`` and ``"`` escaped; in the output file's name, which sbatch expands as a
pattern, a literal ``%`` is written ``%%``. What sbatch cannot take at all is refused in one
line before anything is created: a newline or other control character (it would end the
directives there; the rest would run as shell lines), a backslash in the output file's name (it
turns sbatch's pattern expansion off, so every task would write one file), and a ``/`` in the
study name (the script and env files are named after it).

The worker: by default the ``sweep`` command found on the compute node's ``PATH`` after the
set-up lines ran (so ``--setup 'module load ...'`` or ``source .../activate`` choose it); with
``--python PATH`` that interpreter on the node runs ``-m sweep.cli``; ``--python current`` is
the interpreter running ``sweep submit`` (right only where the nodes see the same path and
image). Where no such program exists the task ends with one line in its output file.
"""

from __future__ import annotations

import re
import shlex
import sys
from dataclasses import dataclass, field
from pathlib import Path

from sweep.commands.slurm_site import (SiteOptions, check_site, directive_word, setup_block,
                                       site_directives)
from sweep.errors import SubmitError

# sbatch's --time forms (man sbatch): minutes, minutes:seconds, hours:minutes:seconds,
# days-hours, days-hours:minutes, days-hours:minutes:seconds; each field any number of digits
# (sbatch reads 1:99 as 1 min 99 s). 0 and -1 / INFINITE / UNLIMITED: no limit.
_TIME = re.compile(r"^(\d+|\d+:\d+|\d+:\d+:\d+|\d+-\d+|\d+-\d+:\d+|\d+-\d+:\d+:\d+|-1)$")
_NO_LIMIT = {"infinite", "unlimited"}
_PARTITION = re.compile(r"^[\w.,-]+$")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
KILL_NOTICE_S = 60  # SIGTERM this long before the time limit: enough to end a trial cleanly
CURRENT_PYTHON = "current"  # --python current: the interpreter that runs sweep submit


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
    site: SiteOptions = field(default_factory=SiteOptions)  # account, QOS, memory, set-up...
    python: str | None = None  # None: `sweep` on the node's PATH; "current"; or a path there
    single_node: bool = False  # one node at a time (the array runs one task at a time)


def valid_time(value: str) -> bool:
    """Whether sbatch takes ``value`` as ``--time`` (``tests/test_submit_script.py`` asks the
    real sbatch the same list)."""
    return value.lower() in _NO_LIMIT or bool(_TIME.match(value))


def check_flags(opts: SubmitOptions) -> None:
    """Validate the flags; creates nothing."""
    if opts.array < 1:
        raise SubmitError(f"--array {opts.array}: must be at least 1 (one worker per task)")
    if opts.time is not None and not valid_time(opts.time):
        raise SubmitError(f"--time {opts.time!r}: not a SLURM time; use MINUTES, MM:SS, HH:MM:SS, "
                          f"D-HH, D-HH:MM, D-HH:MM:SS or UNLIMITED, e.g. 04:00:00")
    if opts.partition is not None and not _PARTITION.match(opts.partition):
        raise SubmitError(f"--partition {opts.partition!r}: not a SLURM partition name")
    if opts.gpus_per_task < 0 or (opts.cpus_per_task is not None and opts.cpus_per_task < 1):
        raise SubmitError("--gpus-per-task must be >= 0 and --cpus-per-task >= 1")
    if opts.python is not None and opts.python != CURRENT_PYTHON:
        check_text("--python", opts.python)
        if not opts.python.strip():
            raise SubmitError("--python '': give the path of the Python on the compute nodes, "
                              "or 'current' for this one")
    check_site(opts.site)


def check_text(what: str, value: str, in_output: bool = False) -> None:
    """Refuse what no ``#SBATCH`` line can carry: control characters anywhere; a backslash in
    the output file's name (sbatch then expands none of its ``%A_%a``)."""
    if _CONTROL.search(value):
        raise SubmitError(f"{what} {value!r}: holds a newline or another control character, "
                          f"which an #SBATCH line cannot carry; rename it")
    if in_output and "\\" in value:
        raise SubmitError(f"{what} {value!r}: holds a backslash, which turns off sbatch's "
                          f"%A_%a in the output file's name; rename it")


def check_names(study_name: str, job_dir: Path, workdir: Path) -> None:
    """The study name and the folders, as the script will carry them (one line per problem)."""
    check_text("study name", study_name, in_output=True)
    if "/" in study_name:
        raise SubmitError(f"study name {study_name!r}: holds '/', and the job's script and env "
                          f"file are named after it; rename the study")
    check_text("--job-dir", str(job_dir.resolve()), in_output=True)
    check_text("working folder", str(workdir))


def _pattern_literal(text: str) -> str:
    """``text`` inside an sbatch file-name pattern, read back verbatim (``%`` -> ``%%``)."""
    return text.replace("%", "%%")


def worker_program(python: str | None) -> list[str]:
    """The words that start ``sweep`` in the task, before ``worker ...``."""
    if python is None:
        return ["sweep"]
    return [sys.executable if python == CURRENT_PYTHON else python, "-m", "sweep.cli"]


def _program_check(program: str) -> list[str]:
    """Script lines that end the task with one line when the worker's program is absent."""
    first = shlex.quote(program)
    if program == "sweep":
        said = ('"sweep: no \'sweep\' command on the PATH of $(hostname) after the set-up lines; '
                'activate its environment with --setup (e.g. --setup \'source '
                '~/venvs/sweep/bin/activate\') or pass --python PATH"')
    else:  # the path is the user's: single-quoted between the double-quoted parts
        said = (f'"sweep: the Python "{first}" given to sweep submit --python is not an '
                f'executable on $(hostname); pass the path of the nodes\' Python"')
    return ["# The worker's program must exist on this node (sweep submit --python chooses it).",
            f"command -v {first} >/dev/null 2>&1 || {{ echo {said} >&2; exit 127; }}"]


def array_directive(opts: SubmitOptions) -> str:
    # %1: SLURM runs one task at a time, so one node at a time holds the SQLite file.
    return f"#SBATCH --array=0-{opts.array - 1}" + ("%1" if opts.single_node else "")


def render_script(study_name: str, worker_cmd: list[str], opts: SubmitOptions,
                  env_file: Path) -> str:
    """The sbatch script (no credentials in it). ``worker_cmd`` starts with
    ``worker_program(opts.python)``; the names and folders passed ``check_names``."""
    job = f"sweep-{study_name}"
    out = f"{_pattern_literal(str(opts.job_dir.resolve() / job))}-%A_%a.out"
    lines = ["#!/bin/bash",
             f"# sweep submit: {opts.array} worker(s) of study {study_name!r}, one per array task.",
             *site_directives(opts.site),  # first: where two lines disagree, sbatch takes the last
             f"#SBATCH --job-name={directive_word(job)}",
             array_directive(opts),
             "#SBATCH --ntasks=1",
             f"#SBATCH --output={directive_word(out)}",
             f"#SBATCH --chdir={directive_word(str(Path.cwd()))}",
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
    env = shlex.quote(str(env_file.resolve()))
    lines += [
        "",
        "# Storage and tracking URLs (with credentials) live in a mode-0600 file, this",
        "# submission's own, not here. Unreadable or without a storage: stop, never a default.",
        f"set -a; . {env} || {{ echo \"sweep: cannot read the env file \"{env} >&2; exit 1; }}"
        "; set +a",
        '[ -n "${SWEEP_STORAGE:-}" ] || { echo "sweep: no SWEEP_STORAGE in the env file" >&2; '
        "exit 1; }",
        "# torch uses this many threads on the CPU: the task's CPUs, not the node's.",
        'export OMP_NUM_THREADS="${OMP_NUM_THREADS:-${SLURM_CPUS_PER_TASK:-1}}"',
        'echo "task ${SLURM_ARRAY_TASK_ID} on $(hostname): job ${SLURM_JOB_ID}"',
        *setup_block(opts.site),
        *_program_check(worker_cmd[0]),
        "# exec: the worker replaces this shell, so scancel/preemption SIGTERM reaches it.",
        "exec " + " ".join(shlex.quote(a) for a in worker_cmd),
        "",
    ]
    return "\n".join(lines)
