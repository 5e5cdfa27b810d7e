"""The batch script `sweep submit` writes, for any study name and folder (issue 34, items 1-6).

Scripts are judged by the programs that read them: `bash -n`, and the suite's real SLURM 22.05
(conftest's `slurm`): `sbatch --test-only`, a held submission read back with `scontrol show
job`, and one real array on the suite's PostgreSQL whose worker comes from the node's PATH.
Refusals are one line, exit 2, nothing written (CliRunner, no SLURM needed).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
import yaml
from click.testing import CliRunner
from optuna.trial import TrialState

from helpers import (PG_PASSWORD, TINY, check_consistent, submitted_job, sweep_cmd, sweep_env,
                     trial_runs, wait_array_ended)
from sweep.cli import main
from sweep.commands.slurm_script import valid_time

# What an #SBATCH line or a shell line could misread: spaces, '#', '%' patterns, both quotes,
# '$' expansions, a backquote.
HOSTILE_NAMES = ["exp 1", "lr #2 %A_%a %j", """it's "q" $HOME `id` ;x"""]
HOSTILE_FOLDER = """w %x #3 "dq" 'sq' $PWD"""


def _study(folder: Path, name: str) -> Path:
    """The TINY study under another name (its file named plainly: the name is the YAML's)."""
    doc = yaml.safe_load(TINY.read_text())
    doc["name"] = name
    path = folder / "study.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


def _dry_run(study: Path, *args: str, env: dict | None = None) -> str:
    result = CliRunner().invoke(main, ["submit", "--study", str(study), *args, "--dry-run"],
                                env=env)
    assert result.exit_code == 0, result.output
    return result.output.split("\n", 1)[1]


def _fields(job: str, env: dict) -> dict[str, str]:
    shown = subprocess.run(["scontrol", "show", "job", job], env=env, capture_output=True,
                           text=True, timeout=60, check=True).stdout
    fields = dict(re.findall(r"(?:^|\s)([\w/]+)=(\S*)", shown))
    # JobName= and WorkDir= may hold spaces: each runs to the end of its line's field
    fields["JobName"] = re.search(r"JobName=(.*)$", shown, re.MULTILINE).group(1)
    fields["WorkDir"] = re.search(r"WorkDir=(.*)$", shown, re.MULTILINE).group(1)
    return fields


@pytest.mark.slow
@pytest.mark.parametrize("name", HOSTILE_NAMES)
def test_hostile_names_and_folders_keep_every_directive(name, slurm, tmp_path, monkeypatch):
    """bash parses the script, sbatch --test-only accepts it, and a held submission carries the
    name verbatim and every directive written after it (array, throttle, requeue, time, CPUs,
    working folder): nothing was cut off at a '#' or a quote."""
    work = tmp_path / HOSTILE_FOLDER
    work.mkdir()
    monkeypatch.chdir(work)
    env = dict(os.environ, SLURM_CONF=slurm)
    script = _dry_run(_study(tmp_path, name), "--array", "3", "--single-node", "--requeue",
                      "--time", "1:00", "--cpus-per-task", "1", "--job-dir", HOSTILE_FOLDER)
    assert subprocess.run(["bash", "-n"], input=script, text=True).returncode == 0
    tested = subprocess.run(["sbatch", "--test-only"], input=script, env=env, text=True,
                            capture_output=True, timeout=60)
    assert tested.returncode == 0 and "to start at" in tested.stderr, tested.stderr
    held = subprocess.run(["sbatch", "--hold", "--parsable"], input=script, env=env, text=True,
                          capture_output=True, timeout=60)
    assert held.returncode == 0, held.stderr
    job = held.stdout.strip()
    try:
        fields = _fields(job, env)
    finally:
        subprocess.run(["scancel", job], env=env, timeout=60)
    assert fields["JobName"] == f"sweep-{name}"
    assert fields["ArrayTaskId"] == "0-2%1"  # three tasks, one at a time
    assert fields["Requeue"] == "1" and fields["TimeLimit"] == "00:01:00"
    assert fields["CPUs/Task"] == "1" and fields["WorkDir"] == str(work)
    assert list(work.iterdir()) == []  # a dry run writes nothing


@pytest.mark.slow
def test_output_file_lands_where_named_for_percent_and_quotes(slurm, tmp_path, monkeypatch):
    """The output file's name is a pattern for slurmd: '%' in the name and folder reach the file
    verbatim (written '%%'), and %A_%a still expand. The task runs --python /bin/echo, so the
    'worker' is one echo: no stores, no training."""
    monkeypatch.chdir(tmp_path)
    env = dict(os.environ, SLURM_CONF=slurm)
    name = "lr #2 %x %j 'q'"
    jobs = tmp_path / HOSTILE_FOLDER
    jobs.mkdir()
    script = _dry_run(_study(tmp_path, name), "--array", "1", "--python", "/bin/echo",
                      "--job-dir", HOSTILE_FOLDER)
    env_file = re.search(r"^set -a; \. ('[^\n]*?'|\S+) \|\|", script, re.MULTILINE).group(1)
    env_path = Path(subprocess.run(["bash", "-c", f"printf %s {env_file}"], text=True,
                                   capture_output=True).stdout)
    assert env_path.parent == jobs
    env_path.write_text("SWEEP_STORAGE=sqlite:///unused.db\n")
    done = subprocess.run(["sbatch", "--parsable"], input=script, env=env, text=True,
                          capture_output=True, timeout=60)
    assert done.returncode == 0, done.stderr
    job = done.stdout.strip()
    wait_array_ended(job, env, time.time() + 120)
    out = jobs / f"sweep-{name}-{job}_0.out"
    assert out.is_file(), sorted(p.name for p in jobs.iterdir())
    assert f"-m sweep.cli worker --study {tmp_path / 'study.yaml'}" in out.read_text()


GOOD_TIMES = ["60", "0", "1:00", "05:30", "1:99", "04:00:00", "2-0", "2-12", "1-02:03",
              "1-02:03:04", "UNLIMITED", "infinite", "Unlimited", "-1"]
BAD_TIMES = ["4h", "1.5", "", " 60", "1:2:3:4", "1-2-3", "1-2:3:4:5", "+5", "0x10", "1:-1",
             "abc", "1d", "60m"]


@pytest.mark.slow
def test_time_forms_get_sbatch_s_own_verdict(slurm):
    """sweep's --time check and sbatch --test-only agree on every form in both lists."""
    env = dict(os.environ, SLURM_CONF=slurm)
    for value in GOOD_TIMES + BAD_TIMES:
        done = subprocess.run(["sbatch", "--test-only", f"--time={value}"],
                              input="#!/bin/bash\ntrue\n", env=env, text=True,
                              capture_output=True, timeout=60)
        refused = "Invalid --time specification" in done.stderr
        assert (done.returncode != 0) == refused, done.stderr
        assert valid_time(value) == (not refused) == (value in GOOD_TIMES), value


@pytest.mark.parametrize("value", GOOD_TIMES[:6])
def test_sbatch_time_forms_reach_the_script(value, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert f"#SBATCH --time={value}\n" in _dry_run(TINY, "--array", "1", "--time", value)


def _refused(args: list[str], study: Path = TINY) -> str:
    result = CliRunner().invoke(main, ["submit", "--study", str(study), *args])
    assert result.exit_code == 2, result.output
    assert len(result.output.strip().splitlines()) == 1 and "Traceback" not in result.output
    return result.output


@pytest.mark.parametrize("storage, kind", [("sqlite:///optuna.db", "SQLite"),
                                           ("journal:///optuna.log", "journal")])
def test_file_storage_across_nodes_is_refused(storage, kind, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    said = _refused(["--array", "2", "--storage", storage])
    assert f"--array 2 with {kind} storage" in said and "PostgreSQL" in said
    assert "--single-node" in said and list(tmp_path.iterdir()) == []
    # one task is one node; --single-node throttles the array to one task at a time
    assert "#SBATCH --array=0-0\n" in _dry_run(TINY, "--array", "1", "--storage", storage)
    pinned = _dry_run(TINY, "--array", "4", "--storage", storage, "--single-node")
    assert "#SBATCH --array=0-3%1\n" in pinned
    server = _dry_run(TINY, "--array", "4", "--storage", "postgresql://u@db.example/optuna")
    assert "#SBATCH --array=0-3\n" in server
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("name, folder, message", [
    ("exp\n1", "jobs", "study name 'exp\\n1': holds a newline"),
    ("exp\t1", "jobs", "study name 'exp\\t1': holds a newline or another control character"),
    ("a/b", "jobs", "study name 'a/b': holds '/'"),
    ("ok", "jobs\n#SBATCH --x", "holds a newline"),
    ("ok", "a\\b", "holds a backslash, which turns off sbatch's %A_%a"),
    ("a\\b", "jobs", "study name 'a\\\\b': holds a backslash"),
])
def test_names_no_sbatch_line_can_carry_are_refused(name, folder, message, tmp_path,
                                                    monkeypatch):
    study = _study(tmp_path, name)
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    assert message in _refused(["--array", "1", "--job-dir", folder, "--dry-run"], study)
    assert list(work.iterdir()) == []


def test_the_worker_is_the_nodes_sweep_unless_asked(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    default = _dry_run(TINY, "--array", "1", "--setup", "source venv/bin/activate")
    lines = default.splitlines()
    at = {key: next(i for i, line in enumerate(lines) if line.startswith(key))
          for key in ("eval 'source venv", "command -v sweep ", "exec sweep worker --study ")}
    assert at["eval 'source venv"] < at["command -v sweep "] < at["exec sweep worker --study "]
    assert sys.executable not in default
    assert f"exec {sys.executable} -m sweep.cli worker " in _dry_run(
        TINY, "--array", "1", "--python", "current")
    given = _dry_run(TINY, "--array", "1", "--python", "/opt/node env/bin/python")
    assert "exec '/opt/node env/bin/python' -m sweep.cli worker " in given
    assert "command -v '/opt/node env/bin/python' " in given
    assert "--python '': give the path" in _refused(["--array", "1", "--python", "", "--dry-run"])


def _hold_submit(tmp_path: Path, env: dict) -> str:
    done = subprocess.run(
        sweep_cmd("submit", "--study", str(TINY), "--array", "1", "--trials", "1",
                  "--storage", f"sqlite:///{tmp_path}/optuna.db",
                  "--tracking-uri", f"sqlite:///{tmp_path}/mlflow.db",
                  "--python", sys.executable, "--sbatch-option", "--hold"),
        env=env, cwd=tmp_path, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stdout + done.stderr
    return submitted_job(done.stdout)


@pytest.mark.slow
def test_each_submission_has_its_own_env_file(slurm, tiny_cifar, tmp_path):
    """Two submissions of one study (held, so nothing runs): the first array's env file is
    untouched by the second, and each array's script (SLURM's own copy) sources its own."""
    env = dict(sweep_env(tiny_cifar), SLURM_CONF=slurm)
    jobs_dir = tmp_path / "sweep-jobs"
    first = _hold_submit(tmp_path, env)
    [first_env] = jobs_dir.glob("sweep-tiny.*.env")
    before = (first_env.read_bytes(), first_env.stat())
    second = _hold_submit(tmp_path, env)
    try:
        env_files = sorted(jobs_dir.glob("sweep-tiny.*.env"))
        assert len(env_files) == 2 and first_env in env_files
        after = first_env.stat()
        assert first_env.read_bytes() == before[0] and after.st_ino == before[1].st_ino
        assert after.st_mtime_ns == before[1].st_mtime_ns
        for path in env_files:
            assert path.stat().st_mode & 0o777 == 0o600
        assert not list(jobs_dir.glob(".*.tmp"))  # no temporary left behind
        scripts = [subprocess.run(["scontrol", "write", "batch_script", job, "-"], env=env,
                                  capture_output=True, text=True, timeout=60, check=True).stdout
                   for job in (first, second)]
    finally:
        subprocess.run(["scancel", first, second], env=env, timeout=60)
    [(second_env,)] = [[p for p in env_files if p != first_env]]
    assert f". {first_env} ||" in scripts[0] and f". {second_env} ||" in scripts[1]


def _sweep_on_path(folder: Path) -> Path:
    """A folder holding a `sweep` command (as a venv's bin/ would) that says it ran."""
    bin_dir = folder / "node-bin"
    bin_dir.mkdir()
    (bin_dir / "sweep").write_text(f'#!/bin/bash\necho "node sweep: $0"\n'
                                   f'exec {sys.executable} -m sweep.cli "$@"\n')
    (bin_dir / "sweep").chmod(0o755)
    return bin_dir


@pytest.mark.slow
def test_real_array_on_postgres_runs_the_nodes_sweep_and_writes_no_secret(
        postgres_server, slurm, tiny_cifar, tmp_path):
    """A study named 'exp 1' submitted for real from a folder and into a job folder with
    spaces, '#', '%' and '$'; Optuna's URL carries the password in its query, MLflow's in
    its user part. Task 0's set-up puts a `sweep` on the PATH, which trains the trial; task 1's
    PATH has none: it ends FAILED with one line and exit 127. Then no file under the folder
    (checkpoints, spool, job folder, artifacts), the env files aside, holds the password."""
    optuna_url, mlflow_url = postgres_server
    assert f":{PG_PASSWORD}@" in mlflow_url
    storage = optuna_url.replace(f":{PG_PASSWORD}@", "@") + f"?password={PG_PASSWORD}"
    # no quotes here: MLflow 3.17 creating an experiment on PostgreSQL fails on a quote in its
    # artifact folder (./mlruns under the working folder) with an SQL syntax error
    work = tmp_path / "w %x #3 $PWD"
    work.mkdir()
    bin_dir = _sweep_on_path(tmp_path)
    env = dict(sweep_env(tiny_cifar), SLURM_CONF=slurm,
               PATH="/usr/bin:/bin", SWEEP_SPOOL_DIR=str(work / "spool"))
    done = subprocess.run(sweep_cmd(
        "submit", "--study", str(_study(tmp_path, "exp 1")), "--array", "2", "--trials", "1",
        "--storage", storage, "--tracking-uri", mlflow_url, "--cpus-per-task", "1",
        "--time", "10", "--data-dir", str(tiny_cifar), "--job-dir", "jobs #1 %x",
        "--set", "train.epochs=2",  # a checkpoint after epoch 1: study.json is written
        "--setup", f'if [ "$SLURM_ARRAY_TASK_ID" = 0 ]; then export PATH={bin_dir}:$PATH; fi'),
        env=env, cwd=work, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stdout + done.stderr
    assert PG_PASSWORD not in done.stdout + done.stderr
    job = submitted_job(done.stdout)
    wait_array_ended(job, env, time.time() + 240)

    jobs = work / "jobs #1 %x"
    out0 = (jobs / f"sweep-exp 1-{job}_0.out").read_text()
    out1 = (jobs / f"sweep-exp 1-{job}_1.out").read_text()
    assert f"node sweep: {bin_dir / 'sweep'}" in out0, out0[-2000:]
    assert "sweep: no 'sweep' command on the PATH of " in out1 and "node sweep" not in out1
    failed = _fields(f"{job}_1", env)
    assert failed["JobState"] == "FAILED" and failed["ExitCode"] == "127:0"
    study = optuna.load_study(study_name="exp 1", storage=storage)
    check_consistent(study, trial_runs(mlflow_url, "exp 1"), 1)
    assert study.get_trials(deepcopy=False)[0].state == TrialState.COMPLETE

    written = [p for p in tmp_path.rglob("*") if p.is_file() and p.suffix != ".env"]
    assert any(p.name == "study.json" for p in written)  # the checkpoint folder's own file
    leaked = [p for p in written if PG_PASSWORD.encode() in p.read_bytes()]
    assert not leaked, leaked
    [env_file] = jobs.glob("sweep-exp 1.*.env")
    assert env_file.stat().st_mode & 0o777 == 0o600 and PG_PASSWORD in env_file.read_text()
