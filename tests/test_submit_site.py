"""`sweep submit`'s cluster requirements: --account, --qos, --mem, --constraint, the
--sbatch-option pass-through and --setup lines.

Dry-run and bad input in-process with CliRunner (no SLURM needed); then on the real single-node
SLURM 22.05 test cluster (conftest's `slurm`; its node declares RealMemory=2000 and
Features=sweeptest): SLURM's own refusals arrive in one line before anything is written, and one
real array runs with every option at once. The test cluster has no accounting, so slurmctld
records --account as given and drops --qos (QOS=(null)): both are checked in the script.
"""

from __future__ import annotations

import re
import subprocess
import sys
import time

import optuna
import pytest
from click.testing import CliRunner
from optuna.trial import TrialState

from helpers import (TINY, check_consistent, submitted_job, sweep_cmd, sweep_env, trial_runs,
                     wait_array_ended)
from sweep.cli import main
from sweep.commands.slurm_site import OWNED_OPTIONS, SBATCH_OPTIONS_LIKE_OWNED

SITE = ["--account", "physics", "--qos", "normal", "--mem", "500M", "--constraint", "sweeptest",
        "--sbatch-option", '--comment=sweep "test" #1', "--sbatch-option", "--nice=7"]


def test_dry_run_shows_every_site_option_in_a_valid_script(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(main, [
        "submit", "--study", str(TINY), "--array", "2", "--single-node", *SITE,
        "--setup", "module load cuda/12.4", "--setup", "source ~/venvs/sweep/bin/activate",
        "--setup", "echo 'it''s ready'", "--dry-run"])
    assert result.exit_code == 0, result.output
    script = result.output.split("\n", 1)[1]
    lines = script.splitlines()
    for line in ("#SBATCH --account=physics", "#SBATCH --qos=normal", "#SBATCH --mem=500M",
                 "#SBATCH --constraint=sweeptest", '#SBATCH "--comment=sweep \\"test\\" #1"',
                 "#SBATCH --nice=7", "eval 'module load cuda/12.4' || sweep_setup_failed $? "
                 "'module load cuda/12.4'"):
        assert line in lines, script
    # the cluster's lines first (sbatch takes the last of two that disagree), set-up after the
    # URLs are read and before the worker replaces the shell, in the order given
    assert lines.index("#SBATCH --nice=7") < lines.index("#SBATCH --job-name=sweep-tiny")
    setup_at = [i for i, line in enumerate(lines) if line.startswith("eval ")]
    env_at = next(i for i, line in enumerate(lines) if line.startswith("set -a; ."))
    exec_at = next(i for i, line in enumerate(lines) if line.startswith("exec "))
    assert len(setup_at) == 3 and env_at < setup_at[0] and setup_at[-1] < exec_at
    assert "module load" in lines[setup_at[0]] and "activate" in lines[setup_at[1]]
    # bash itself reads the script, and each eval'd word back as the line given
    assert subprocess.run(["bash", "-n"], input=script, text=True).returncode == 0
    echoed = subprocess.run(["bash", "-c", lines[setup_at[2]].replace("eval ", "printf %s ", 1)],
                            capture_output=True, text=True)
    assert echoed.stdout == "echo 'it''s ready'"
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("args, message", [
    (["--sbatch-option", "--array=0-3"], "'--array=0-3': sweep writes --array itself"),
    (["--sbatch-option", "--outp=x.out"], "'--outp=x.out': abbreviates --output"),
    (["--sbatch-option", "--partition=gpu"], "use sweep submit --partition"),
    (["--sbatch-option", "--wait"], "changes how sbatch runs"),
    (["--sbatch-option", "-A physics"], "not one sbatch long option; write it as '--key=value'"),
    (["--sbatch-option", "--nodes 2"], "not one sbatch long option"),
    (["--sbatch-option", "--comment="], "nothing after '='"),
    (["--sbatch-option", "--comment=a\nb"], "'--comment=a\\nb': holds a newline"),
    (["--setup", "module load cuda\nexec bash"], "holds a newline"),
    (["--setup", "   "], "nothing to run"),
    (["--setup", 'source "venv/bin/activate'], "not a complete shell line"),
    (["--mem", "1.5G"], "--mem '1.5G': use a whole number"),
    (["--constraint", "a100 h100"], "--constraint 'a100 h100'"),
    (["--account", "phys;rm"], "--account 'phys;rm': not a SLURM account name"),
    (["--qos", ""], "--qos '': not a SLURM qos name"),
])
def test_bad_site_options_are_one_line_and_write_nothing(args, message, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(main, ["submit", "--study", str(TINY), "--array", "1", *args])
    assert result.exit_code == 2, result.output
    assert message in result.output and len(result.output.strip().splitlines()) == 1
    assert "Traceback" not in result.output and list(tmp_path.iterdir()) == []


@pytest.mark.slow
def test_owned_option_abbreviations_match_the_installed_sbatch(slurm):
    """An --sbatch-option that begins like an owned option is refused as its abbreviation unless
    it is a complete sbatch option itself: that list comes from sbatch's own --help."""
    shown = subprocess.run(["sbatch", "--help"], env={"SLURM_CONF": slurm, "PATH": "/usr/bin:/bin"},
                           capture_output=True, text=True, timeout=60).stdout
    options = set(re.findall(r"--([a-z][a-z0-9-]*)", shown))
    assert {"account", "qos", "mem", "constraint", "array", "gres"} <= options
    like_owned = {o for o in options
                  if any(o != owned and owned.startswith(o) for owned in OWNED_OPTIONS)}
    assert like_owned == SBATCH_OPTIONS_LIKE_OWNED


@pytest.mark.slow
@pytest.mark.parametrize("args, reason", [
    (["--constraint", "nothere"], "Invalid feature specification"),
    (["--mem", "64G"], "Requested node configuration is not available"),
    (["--sbatch-option", "--frobnicate=3"], "unrecognized option '--frobnicate=3'"),
])
def test_a_job_slurm_refuses_creates_nothing(args, reason, slurm, tmp_path, monkeypatch):
    """sbatch --test-only is asked before the stores: its refusal is the one line, and neither
    the study's SQLite files nor the job folder exist afterwards."""
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(main, ["submit", "--study", str(TINY), "--array", "2",
                                       "--single-node", *args], env={"SLURM_CONF": slurm})
    assert result.exit_code == 2, result.output
    assert f"sbatch refused the job: {reason}" in result.output
    assert len(result.output.strip().splitlines()) == 1 and "Traceback" not in result.output
    assert list(tmp_path.iterdir()) == []


def _job_fields(job_task: str, env: dict) -> dict[str, str]:
    shown = subprocess.run(["scontrol", "show", "job", job_task], env=env, capture_output=True,
                           text=True, timeout=60, check=True).stdout
    # "Comment=" runs to the end of its line (it may hold spaces); the rest are KEY=VALUE words
    fields = dict(re.findall(r"(?:^|\s)(\w+)=(\S*)", shown))
    fields["Comment"] = re.search(r"Comment=(.*)$", shown, re.MULTILINE).group(1).rstrip()
    return fields


@pytest.mark.slow
def test_array_with_every_site_option_runs_its_setup_in_the_worker(slurm, tiny_cifar, tmp_path):
    """Two tasks with all options at once. The set-up exports the data folder: the worker finds
    CIFAR only through it (none is given to submit, and the default cache holds a corrupt file,
    so nothing is downloaded either). Task 1's last set-up line fails: it ends FAILED with that
    line's status and starts no worker; task 0 trains the study's one trial."""
    cache = tmp_path / "cache"
    (cache / "sweep" / "data" / "cifar-10-batches-py").mkdir(parents=True)
    (cache / "sweep" / "data" / "cifar-10-batches-py" / "test_batch").write_text("not CIFAR")
    env = dict(sweep_env(tiny_cifar), SLURM_CONF=slurm, XDG_CACHE_HOME=str(cache))
    del env["SWEEP_DATA_DIR"]
    storage, tracking = f"sqlite:///{tmp_path}/optuna.db", f"sqlite:///{tmp_path}/mlflow.db"
    done = subprocess.run(sweep_cmd(
        "submit", "--study", str(TINY), "--array", "2", "--trials", "1", "--storage", storage,
        "--tracking-uri", tracking, "--cpus-per-task", "1", "--time", "00:10:00", *SITE,
        "--single-node", "--python", sys.executable,
        "--setup", f"export SWEEP_DATA_DIR={tiny_cifar}",
        "--setup", 'echo "sweep-setup: pid $$ data $SWEEP_DATA_DIR"',
        "--setup", 'test "$SLURM_ARRAY_TASK_ID" != 1'),
        env=env, cwd=tmp_path, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stdout + done.stderr
    job = submitted_job(done.stdout)
    wait_array_ended(job, env, time.time() + 200)

    jobs = tmp_path / "sweep-jobs"
    first, second = (_job_fields(f"{job}_{task}", env) for task in (0, 1))
    for fields in (first, second):
        assert fields["Account"] == "physics" and fields["MinMemoryNode"] == "500M"
        assert fields["Features"] == "sweeptest" and fields["Comment"] == 'sweep "test" #1'
        assert fields["Nice"] == "7"
    assert "#SBATCH --qos=normal" in (jobs / "sweep-tiny.sbatch").read_text()
    assert first["JobState"] == "COMPLETED" and first["ExitCode"] == "0:0"
    assert second["JobState"] == "FAILED" and second["ExitCode"] == "1:0"

    out0 = (jobs / f"sweep-tiny-{job}_0.out").read_text()
    out1 = (jobs / f"sweep-tiny-{job}_1.out").read_text()
    assert "sweep: set-up line failed with exit status 1, the worker was not started: " \
           "test \"$SLURM_ARRAY_TASK_ID\" != 1" in out1
    assert "sweep-setup: pid" in out1 and "set-up line failed" not in out0
    setup_pid = int(re.search(rf"sweep-setup: pid (\d+) data {tiny_cifar}\n", out0).group(1))

    study = optuna.load_study(study_name="tiny", storage=storage)
    check_consistent(study, trial_runs(tracking, "tiny"), 1)
    [trial] = study.get_trials(deepcopy=False)
    # the shell that ran the set-up became the worker (exec keeps the pid and the environment)
    assert trial.state == TrialState.COMPLETE and trial.user_attrs["pid"] == setup_pid
