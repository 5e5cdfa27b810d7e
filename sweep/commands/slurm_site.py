"""What one cluster asks of a job beyond sweep's own script: ``sweep submit``'s ``--account``,
``--qos``, ``--mem``, ``--constraint``, the ``--sbatch-option`` pass-through and the ``--setup``
lines run before the worker starts. Checked here (one line per problem, nothing created), then
rendered as ``#SBATCH`` lines and a set-up block of the batch script
(``slurm_script.render_script``).

Rules:

* ``--sbatch-option`` is one sbatch long option, ``--key`` or ``--key=value``, passed verbatim
  (a value with spaces, quotes or ``#`` is quoted so that sbatch's directive parser reads it
  back unchanged). Refused: a short option, ``--key value``, a control character, and the
  options sweep writes itself or offers a flag for (and their abbreviations, which sbatch
  accepts like getopt does): the script would contradict itself. Anything else, sbatch judges
  (``slurm.submit`` asks it with ``--test-only`` before anything is created).
* ``--setup`` is one shell line. Each runs in the batch shell, in order, before it ``exec``s
  the worker, so its exports, ``module load`` and ``source venv/bin/activate`` reach the
  worker. A line that fails (its last command's exit status is not 0) ends the task with that
  status and a line in its output file: no worker starts in an environment it was not given.
"""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
from dataclasses import dataclass

from sweep.errors import SubmitError

_NAME = re.compile(r"^[\w.-]+$")  # an account or QOS name
_MEM = re.compile(r"^\d+([KMGT]B?)?$", re.IGNORECASE)  # sbatch: MB when no unit; 0 = whole node
_CONSTRAINT = re.compile(r"^[\w.:&|*\[\]()!,-]+$")  # features joined by & | , [ ] ( ) *N
_OPTION = re.compile(r"^--([a-z][a-z0-9-]*)(?:=(.*))?$", re.DOTALL)
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_NEEDS_QUOTES = re.compile(r"[\s\"'\\#]")  # sbatch splits directives on these

# Options sweep's script sets itself or has a flag for: an --sbatch-option may not name them.
OWNED_OPTIONS = {
    "job-name": "sweep names the job sweep-STUDY itself",
    "array": "sweep writes --array itself (use sweep submit --array K)",
    "ntasks": "every array task is one worker (sweep writes --ntasks=1)",
    "output": "sweep writes each task's output into --job-dir",
    "error": "sweep writes each task's output and errors into one file in --job-dir",
    "chdir": "tasks start in the folder sweep submit runs in",
    "signal": "sweep asks for SIGTERM 60 s before the time limit itself",
    "open-mode": "sweep submit --requeue sets it",
    "wait": "it changes how sbatch runs, not the job",
    "test-only": "it changes how sbatch runs, not the job",
    "parsable": "it changes how sbatch runs, not the job",
    "wrap": "sweep writes the batch script itself",
    "help": "it changes how sbatch runs, not the job",
    "usage": "it changes how sbatch runs, not the job",
    "version": "it changes how sbatch runs, not the job",
    **{flag: f"use sweep submit --{flag}" for flag in (
        "partition", "time", "gpus-per-task", "cpus-per-task", "requeue", "account", "qos",
        "mem", "constraint")},
}
# Complete sbatch options that begin like an owned one (--gpus vs --gpus-per-task): allowed.
# tests/test_submit_options.py checks this list against the installed sbatch's --help.
SBATCH_OPTIONS_LIKE_OWNED = frozenset({"gpus"})


@dataclass(frozen=True)
class SiteOptions:
    """A cluster's requirements of a job (all optional). ``mem`` is per array task (one worker,
    one node's share), in sbatch's form: ``16G``, ``500M``, ``16000`` (MB)."""

    account: str | None = None
    qos: str | None = None
    mem: str | None = None
    constraint: str | None = None
    sbatch_options: tuple[str, ...] = ()
    setup: tuple[str, ...] = ()


def check_site(site: SiteOptions) -> None:
    """Raise SubmitError naming the first bad value and the fix; creates nothing."""
    for flag, value in (("--account", site.account), ("--qos", site.qos)):
        if value is not None and not _NAME.match(value):
            raise SubmitError(f"{flag} {value!r}: not a SLURM {flag[2:]} name (letters, digits, "
                              f"'_', '-', '.'); see sacctmgr show assoc user=$USER")
    if site.mem is not None and not _MEM.match(site.mem):
        raise SubmitError(f"--mem {site.mem!r}: use a whole number with an optional unit K, M, G "
                          f"or T, e.g. 16G (memory per array task)")
    if site.constraint is not None and not _CONSTRAINT.match(site.constraint):
        raise SubmitError(f"--constraint {site.constraint!r}: use node feature names joined by "
                          f"& | [ ] ( ) *N without spaces, e.g. 'a100|h100'; see sinfo -o '%N %f'")
    for option in site.sbatch_options:
        _check_sbatch_option(option)
    for line in site.setup:
        _check_setup_line(line)


def _check_sbatch_option(option: str) -> None:
    said = f"--sbatch-option {option!r}"
    if _CONTROL.search(option):
        raise SubmitError(f"{said}: holds a newline or another control character; pass one "
                          f"option per --sbatch-option")
    match = _OPTION.match(option)
    if not match:
        raise SubmitError(f"{said}: not one sbatch long option; write it as '--key=value' or "
                          f"'--key', e.g. --sbatch-option '--gres=gpu:a100:1'")
    name, value = match.group(1), match.group(2)
    if value == "":
        raise SubmitError(f"{said}: nothing after '='; give a value or drop the '='")
    owner = OWNED_OPTIONS.get(name) or next(
        (f"abbreviates --{owned}: {why}" for owned, why in OWNED_OPTIONS.items()
         if owned.startswith(name) and name not in SBATCH_OPTIONS_LIKE_OWNED), None)
    if owner:
        raise SubmitError(f"{said}: {owner}")


def _check_setup_line(line: str) -> None:
    said = f"--setup {line!r}"
    if _CONTROL.search(line.replace("\t", " ")):  # a tab is fine inside one line
        raise SubmitError(f"{said}: holds a newline or another control character; pass one "
                          f"shell line per --setup")
    if not line.strip() or line.lstrip().startswith("#"):
        raise SubmitError(f"{said}: nothing to run; give a shell command, e.g. "
                          f"--setup 'module load cuda/12.4'")
    bash = shutil.which("bash")
    if bash is None:  # the tasks' bash checks it then; a login node without bash is rare
        return
    done = subprocess.run([bash, "-n", "-c", line], capture_output=True, text=True, timeout=30)
    if done.returncode != 0:
        reason = (done.stderr.strip().splitlines() or ["syntax error"])[0]
        reason = re.sub(r"^.*?-c: line \d+: ", "", reason)  # "/usr/bin/bash: -c: line 1: "
        raise SubmitError(f"{said}: not a complete shell line ({reason}); close its quotes, "
                          f"brackets and if/fi")


def site_directives(site: SiteOptions) -> list[str]:
    """``#SBATCH`` lines for the site's requests, then the pass-through options verbatim."""
    lines = [f"#SBATCH --{flag}={value}" for flag, value in (
        ("account", site.account), ("qos", site.qos), ("mem", site.mem),
        ("constraint", site.constraint)) if value is not None]
    return lines + [f"#SBATCH {directive_word(option)}" for option in site.sbatch_options]


def directive_word(option: str) -> str:
    """``option`` as one word of an ``#SBATCH`` line: sbatch splits on whitespace, reads quotes
    and backslashes and ends the line at ``#``, so such a word is double-quoted and escaped."""
    if not _NEEDS_QUOTES.search(option):
        return option
    return '"' + option.replace("\\", "\\\\").replace('"', '\\"') + '"'


def setup_block(site: SiteOptions) -> list[str]:
    """The script lines that run ``site.setup`` in the batch shell (empty without set-up)."""
    if not site.setup:
        return []
    lines = ["# Set-up (--setup): each line runs in this shell, in order, so what it exports or",
             "# loads reaches the worker; a line that fails ends the task before the worker "
             "starts.",
             "sweep_setup_failed() {",
             '  echo "sweep: set-up line failed with exit status $1, the worker was not '
             'started: $2" >&2',
             '  exit "$1"',
             "}"]
    for line in site.setup:
        quoted = shlex.quote(line)
        lines.append(f"eval {quoted} || sweep_setup_failed $? {quoted}")
    return lines
