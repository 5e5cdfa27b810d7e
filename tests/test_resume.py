"""Trials checkpoint at epoch ends and their retries resume exactly, on real processes with real
signals, real SQLite and MLflow stores and real training on tiny data. The files are written by
the process's checkpoint writer thread; a slow disk is a real delay before each write
(``SWEEP_CHECKPOINT_WRITE_DELAY_S``).

The reference for "exactly" is an uninterrupted launch of the same study in another folder (same
seeds, one thread, the same CPU): the retry's curves, metrics and Optuna values must equal its
trial's with ``==``. A single state left unsaved (BatchNorm statistics, momentum, plateau's
counters, the generator) makes them differ.
"""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
import torch
from mlflow.tracking import MlflowClient
from optuna.trial import TrialState

from helpers import queue_state, sweep_cmd, sweep_env, wait_array_ended, write_cifar

pytestmark = pytest.mark.slow

EPOCHS, STEPS = 6, 10  # 200 images / batch 20: 10 steps per epoch
STUDY = f"""
name: resume
seed: 0
trials: 2
objective: {{metric: val_acc, direction: maximize}}
sampler: {{type: random}}
pruner: {{type: none}}
data: {{train_size: 200, val_size: 40, test_size: 40}}
train: {{model: resnet8, width: 1, epochs: {EPOCHS}, batch_size: 20, sync_every_steps: 3}}
space:
  warmup_steps: 15   # ends inside the second epoch
  base_lr: {{type: float, low: 0.05, high: 0.4, log: true}}
  scheduler:
    # a reduction unless val_loss falls tenfold: plateau's counters matter
    plateau: {{gamma: 0.5, patience_epochs: 0, threshold: 0.9}}
"""


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return write_cifar(tmp_path_factory.mktemp("cifar"), per_batch=50)


@pytest.fixture
def study_file(tmp_path) -> Path:
    path = tmp_path / "resume.yaml"
    path.write_text(STUDY)
    return path


def env(data: Path, write_delay: float = 0.0) -> dict:
    # one thread: a tiny model on two threads only spins, and the reference must use as many
    return dict(sweep_env(data), OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore",
                SWEEP_CHECKPOINT_WRITE_DELAY_S=str(write_delay))


def start(folder: Path, data: Path, study_file: Path, fuse: int, trials: int,
          write_delay: float = 0.0, sets: tuple[str, ...] = ()) -> subprocess.Popen:
    """``sweep launch`` in ``folder``; ``write_delay``: seconds before each checkpoint write."""
    folder.mkdir(exist_ok=True)
    return subprocess.Popen(sweep_cmd("launch", "--study", str(study_file), "--quiet",
                                      "--trials", str(trials), "--set", f"train.fuse={fuse}",
                                      *[a for item in sets for a in ("--set", item)]),
                            cwd=folder, env=env(data, write_delay), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def finish(proc: subprocess.Popen, code: int = 0) -> tuple[str, str]:
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == code, err[-3000:]
    assert "Traceback" not in err, err[-3000:]
    return out, err


def wait_epochs(db: Path, proc: subprocess.Popen, epochs: int, timeout: float = 200) -> None:
    """Until every RUNNING trial has reported ``epochs`` epochs (read-only: the launch may still
    be creating the tables)."""
    query = ("SELECT t.trial_id, count(v.trial_id) FROM trials t LEFT JOIN "
             "trial_intermediate_values v ON v.trial_id = t.trial_id "
             "WHERE t.state = 'RUNNING' GROUP BY t.trial_id")
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.communicate()
        try:
            with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as conn:
                counts = [n for _, n in conn.execute(query).fetchall()]
            if counts and min(counts) >= epochs:
                return
        except sqlite3.OperationalError:
            pass
        time.sleep(0.05)
    raise AssertionError(f"no trial reached epoch {epochs}")


def wait_noted(db: Path, proc: subprocess.Popen, epochs: int, trials: int,
               timeout: float = 200) -> None:
    """Until ``trials`` RUNNING trials have noted a checkpoint of ``epochs`` epochs or more:
    the note the checkpoint writer records after the file, so the file is there (waiting for
    the reported epochs instead raced the writer on a loaded machine)."""
    query = ("SELECT a.value_json FROM trial_user_attributes a JOIN trials t ON "
             "t.trial_id = a.trial_id WHERE t.state = 'RUNNING' AND a.key = 'checkpoint_epochs'")
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.communicate()
        try:
            with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as conn:
                noted = [int(v) for (v,) in conn.execute(query).fetchall()]
            if len(noted) == trials and min(noted) >= epochs:
                return
        except sqlite3.OperationalError:
            pass
        time.sleep(0.05)
    raise AssertionError(f"no {trials} trials noted a checkpoint of {epochs} epochs")


def checkpoints_of(folder: Path) -> Path:
    """The study's checkpoint folder: ``sweep-checkpoints/resume-HASH`` (one study per test)."""
    (found,) = (folder / "sweep-checkpoints").glob("resume-*")
    return found


def stores(folder: Path):
    study = optuna.load_study(study_name="resume", storage=f"sqlite:///{folder}/sweep.db")
    return study, MlflowClient(tracking_uri=f"sqlite:///{folder}/mlflow.db")


def curves(client: MlflowClient, run_id: str) -> dict[str, list[tuple[int, float]]]:
    return {key: sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))
            for key in ("lr", "train_loss", "val_loss", "val_acc", "test_acc")}


def parent_run(folder: Path):
    client = MlflowClient(tracking_uri=f"sqlite:///{folder}/mlflow.db")
    experiment = client.get_experiment_by_name("resume").experiment_id
    (run,) = client.search_runs([experiment], "tags.`sweep.role` = 'study'")
    return run


def retry_of(study: optuna.Study, number: int) -> optuna.trial.FrozenTrial:
    (retry,) = [t for t in study.get_trials() if t.system_attrs.get("failed_trial") == number]
    return retry


def check_whole_curve(client: MlflowClient, trial: optuna.trial.FrozenTrial) -> dict:
    run_curves = curves(client, trial.user_attrs["mlflow_run_id"])
    for key in ("lr", "train_loss"):  # every step once: none missing, none twice
        assert [step for step, _ in run_curves[key]] == list(range(EPOCHS * STEPS)), key
    for key in ("val_loss", "val_acc"):
        assert [step for step, _ in run_curves[key]] == list(range(EPOCHS)), key
    assert sorted(trial.intermediate_values) == list(range(EPOCHS))
    return run_curves


SLOW_DISK_S = 2.0  # each checkpoint write waits this long first: longer than an epoch here


# your own network (docs/your-model.md) resumes as exactly as the built-ins
CUSTOM_MODEL = ("train.model=examples.tiny_cnn:build_net", "train.model_args={channels: 4}")


@pytest.mark.parametrize("fuse, sets", [(1, ()), (2, ()), (1, CUSTOM_MODEL)],
                         ids=["fuse1", "fuse2", "custom-model"])
def test_sigterm_mid_epoch_then_relaunch_resumes_bit_identically(tmp_path, data, study_file, fuse,
                                                                 sets):
    """On a slow disk (every write delayed longer than an epoch): the stop re-enqueues the
    trials, then waits for the checkpoints still pending; the retries resume from them exactly,
    and the pack's training thread never waited for a write."""
    ref = start(tmp_path / "ref", data, study_file, fuse, trials=fuse, sets=sets)  # alongside
    cut_dir = tmp_path / "cut"
    cut = start(cut_dir, data, study_file, fuse, trials=fuse, write_delay=SLOW_DISK_S, sets=sets)
    wait_epochs(cut_dir / "sweep.db", cut, 2)  # in the third epoch (or just past it)
    signalled = time.time()  # the last reported epoch's write waits SLOW_DISK_S from about now
    cut.send_signal(signal.SIGTERM)
    finish(cut, 128 + signal.SIGTERM)
    finish(ref)

    study, _ = stores(cut_dir)
    originals = [t for t in study.get_trials() if t.state == TrialState.FAIL]
    assert len(originals) == fuse
    saved = {t.number: len(t.intermediate_values) for t in originals}
    assert all(2 <= n < EPOCHS for n in saved.values()), saved
    for number, epochs in saved.items():
        path = checkpoints_of(cut_dir) / f"trial-{number}.pt"
        payload = torch.load(path, weights_only=True)
        # the checkpoint of every epoch the trial reported: the stop's flush wrote the write
        # still pending at the signal (it ended after the signal). The flush comes after the
        # trial was failed and re-enqueued, so its note may lag the file (a failed trial takes
        # no more notes); a retry trusts a file ahead of its note, never one behind it.
        assert payload["state"]["epochs"] == epochs
        assert study.trials[number].user_attrs.get("checkpoint_epochs", 0) <= epochs
        assert path.stat().st_mtime > signalled
    assert [t.state for t in study.trials[fuse:]] == [TrialState.WAITING] * fuse

    out, err = finish(start(cut_dir, data, study_file, fuse, trials=fuse,
                            write_delay=SLOW_DISK_S, sets=sets))
    assert f"{fuse}/{fuse} trials used" in out  # interrupted and resumed: counted once
    if fuse > 1:  # a pack: the parent run holds where its time went, checkpoints on their own
        metrics = parent_run(cut_dir).data.metrics
        # every boundary's copies together took less than one delayed write: the training
        # thread never waited for the writer, which spent the delay at least once
        assert 0 < metrics["pack_seconds_checkpoint"] < SLOW_DISK_S
        assert metrics["pack_seconds_checkpoint_writer"] >= SLOW_DISK_S
        assert "checkpoints: copies off the device" in out and "checkpoints: writer thread" in out
    study, client = stores(cut_dir)
    ref_study, ref_client = stores(tmp_path / "ref")
    for number, epochs in saved.items():
        retry, whole = retry_of(study, number), ref_study.trials[number]
        assert retry.state == TrialState.COMPLETE and retry.params == whole.params
        run = client.get_run(retry.user_attrs["mlflow_run_id"])
        assert run.data.tags["sweep.resumed_at_step"] == str(epochs * STEPS)
        assert retry.user_attrs["resumed_epochs"] == epochs
        resumed = check_whole_curve(client, retry)
        assert resumed == curves(ref_client, whole.user_attrs["mlflow_run_id"])  # bit-identical
        assert retry.intermediate_values == whole.intermediate_values
        assert retry.value == whole.value
        assert retry.user_attrs["test_acc"] == whole.user_attrs["test_acc"]
        assert retry.user_attrs["model"] == ("examples.tiny_cnn:build_net" if sets else "resnet8")
        after_warmup = [lr for step, lr in resumed["lr"] if step >= 15]
        assert min(after_warmup) < max(after_warmup)  # plateau reduced the LR: its state mattered
    assert not list((cut_dir / "sweep-checkpoints").rglob("*.pt"))  # removed once finished


def test_sigkill_resumes_from_the_last_saved_epoch_and_a_truncated_file_restarts(
        tmp_path, data, study_file):
    """kill -9 of a fused pack of 2 gives no chance to save: one retry resumes from the
    checkpoint written at the last epoch end before the kill; the other's file is truncated, so
    it restarts from step 0 after one clear line. The two share a pack, at different epochs."""
    cut = start(tmp_path, data, study_file, fuse=2, trials=2)
    wait_noted(tmp_path / "sweep.db", cut, 2, trials=2)
    cut.kill()
    cut.communicate(timeout=60)
    folder = checkpoints_of(tmp_path)
    epochs = torch.load(folder / "trial-0.pt", weights_only=True)["state"]["epochs"]
    assert 2 <= epochs < EPOCHS
    damaged = folder / "trial-1.pt"
    damaged.write_bytes(damaged.read_bytes()[: damaged.stat().st_size // 2])

    out, err = finish(start(tmp_path, data, study_file, fuse=2, trials=2))
    assert "2/2 trials used" in out
    study, client = stores(tmp_path)
    assert [t.state for t in study.trials[:2]] == [TrialState.FAIL] * 2
    resumed, restarted = retry_of(study, 0), retry_of(study, 1)
    for retry in (resumed, restarted):
        assert retry.state == TrialState.COMPLETE
        check_whole_curve(client, retry)
    tags = client.get_run(resumed.user_attrs["mlflow_run_id"]).data.tags
    assert tags.get("sweep.resumed_at_step") == str(epochs * STEPS), err[-3000:]
    # the epochs before the kill are the original's own, replayed once
    assert {e: v for e, v in resumed.intermediate_values.items() if e < epochs} == \
        {e: v for e, v in study.trials[0].intermediate_values.items() if e < epochs}
    (line,) = [ln for ln in err.splitlines() if "restarts from step 0" in ln]
    assert line.startswith(f"trial {restarted.number} (a retry of trial 1): checkpoint {damaged} "
                           f"is corrupt (unreadable ")
    tags = client.get_run(restarted.user_attrs["mlflow_run_id"]).data.tags
    assert "sweep.resumed_at_step" not in tags and "resumed_epochs" not in restarted.user_attrs
    assert not list(folder.glob("*.pt"))


def test_sigkill_while_a_write_is_pending_leaves_the_previous_checkpoint(tmp_path, data,
                                                                         study_file):
    """kill -9 while the writer holds a newer checkpoint than the file (a slow disk): the file
    is the previous checkpoint, whole."""
    from sweep.training.checkpoint import check_state, read

    cut = start(tmp_path, data, study_file, fuse=1, trials=1, write_delay=SLOW_DISK_S,
                sets=("train.epochs=40",))
    query = "SELECT count(*) FROM trial_intermediate_values"
    deadline = time.monotonic() + 200
    while True:  # until the trial has reported an epoch the file does not hold: its write waits
        assert cut.poll() is None and time.monotonic() < deadline, cut.communicate()
        try:
            with sqlite3.connect(f"file:{tmp_path}/sweep.db?mode=ro", uri=True) as conn:
                reported = conn.execute(query).fetchone()[0]
        except sqlite3.OperationalError:
            reported = 0
        folders = list((tmp_path / "sweep-checkpoints").glob("resume-*"))  # once it is written
        path = folders[0] / "trial-0.pt" if folders else tmp_path / "none"
        on_disk = read(path)["state"]["epochs"] if path.is_file() else 0
        if 0 < on_disk < reported:
            break
        time.sleep(0.05)
    cut.kill()
    cut.communicate(timeout=60)
    payload = read(path)  # whole, not torn (ValueError otherwise)
    check_state(payload["state"])
    with sqlite3.connect(f"file:{tmp_path}/sweep.db?mode=ro", uri=True) as conn:
        reported = conn.execute(query).fetchone()[0]
    assert 1 <= payload["state"]["epochs"] < reported  # the previous one: the newer never landed
    assert len(payload["lrs"]) == payload["state"]["steps"] == payload["state"]["epochs"] * STEPS


def test_scancelled_array_task_is_resumed_by_a_second_array(slurm, tmp_path, data, study_file):
    """`sweep submit --requeue`; the task is cancelled mid-trial (SIGTERM to the worker); a
    second array, started later, resumes the trial from its checkpoint."""
    job_env = dict(env(data), SLURM_CONF=slurm)
    storage, tracking = f"sqlite:///{tmp_path}/sweep.db", f"sqlite:///{tmp_path}/mlflow.db"

    def submit() -> str:
        done = subprocess.run(
            sweep_cmd("submit", "--study", str(study_file), "--array", "1", "--trials", "1",
                      "--storage", storage, "--tracking-uri", tracking, "--cpus-per-task", "1",
                      "--time", "00:10:00", "--data-dir", str(data), "--requeue",
                      "--python", sys.executable),
            env=job_env, cwd=tmp_path, capture_output=True, text=True, timeout=180)
        assert done.returncode == 0, done.stdout + done.stderr
        return done.stdout.split("submitted job ", 1)[1].split(":")[0]

    job = submit()
    script = (tmp_path / "sweep-jobs" / "sweep-resume.sbatch").read_text()
    assert "#SBATCH --requeue" in script
    assert f"--checkpoint-dir {tmp_path / 'sweep-checkpoints'}" in script
    # The task may wait in the queue behind an earlier test's job on a loaded machine: a long
    # window, and a failure that says what the queue held rather than a wait that falls through.
    deadline = time.time() + 420
    while True:
        try:
            study = optuna.load_study(study_name="resume", storage=storage)
            running = study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
            if running and len(running[0].intermediate_values) >= 2:
                break
        except KeyError:
            pass
        assert time.time() < deadline, \
            "no trial reached 2 epochs: " + queue_state(job, job_env, tmp_path / "sweep-jobs")
        time.sleep(0.1)
    subprocess.run(["scancel", job], env=job_env, check=True, timeout=60)
    wait_array_ended(job, job_env, time.time() + 240)
    study = optuna.load_study(study_name="resume", storage=storage)
    (original,) = study.get_trials(states=(TrialState.FAIL,))
    epochs = original.user_attrs["checkpoint_epochs"]
    assert 2 <= epochs < EPOCHS

    second = submit()
    wait_array_ended(second, job_env, time.time() + 240)
    outputs = "\n".join(p.read_text() for p in (tmp_path / "sweep-jobs").glob("*.out"))
    study, client = stores(tmp_path)
    retry = retry_of(study, original.number)
    assert retry.state == TrialState.COMPLETE, outputs[-3000:]
    tags = client.get_run(retry.user_attrs["mlflow_run_id"]).data.tags
    assert tags["sweep.resumed_at_step"] == str(epochs * STEPS)
    assert tags["sweep.host"] and os.path.exists(tmp_path / "sweep-checkpoints")
    check_whole_curve(client, retry)
    assert not list((tmp_path / "sweep-checkpoints").rglob("*.pt"))


def test_a_slot_file_that_does_not_fit_restarts_that_trial_alone(tmp_path, data, study_file):
    """A CPU pack of 2 stopped by SIGTERM after 2 of 6 epochs; one slot's file is then altered
    so that it loads (identity, counts and format intact) but does not fit the model (a weight
    gone). The next worker finishes both trials within the budget of 2: one resumed, one
    restarted from step 0 after one line, both runs holding their whole LR curve once."""
    cut = start(tmp_path, data, study_file, fuse=2, trials=2)
    wait_epochs(tmp_path / "sweep.db", cut, 2)
    cut.send_signal(signal.SIGTERM)
    finish(cut, 128 + signal.SIGTERM)
    folder = checkpoints_of(tmp_path)
    altered = folder / "trial-1.pt"
    payload = torch.load(altered, weights_only=True)
    del payload["state"]["model"]["conv1.weight" if "conv1.weight" in payload["state"]["model"]
                                  else next(iter(payload["state"]["model"]))]
    torch.save(payload, altered)
    kept = (folder / "trial-0.pt").read_bytes()

    out, err = finish(start(tmp_path, data, study_file, fuse=2, trials=2))
    assert "2/2 trials used" in out
    study, client = stores(tmp_path)
    resumed, restarted = retry_of(study, 0), retry_of(study, 1)
    assert [t.state for t in study.trials] == [TrialState.FAIL] * 2 + [TrialState.COMPLETE] * 2
    tags = client.get_run(resumed.user_attrs["mlflow_run_id"]).data.tags
    epochs = torch.load(__import__("io").BytesIO(kept), weights_only=True)["state"]["epochs"]
    assert int(tags["sweep.resumed_at_step"]) == epochs * STEPS > 0  # the other file was kept
    assert "sweep.resumed_at_step" not in client.get_run(
        restarted.user_attrs["mlflow_run_id"]).data.tags
    (line,) = [ln for ln in err.splitlines() if "restarts from step 0" in ln]
    assert line.startswith(f"trial {restarted.number} (a retry of trial 1): checkpoint {altered} "
                           f"does not fit the trial (")
    with sqlite3.connect(tmp_path / "mlflow.db") as conn:  # each step once, read by SQL
        for retry in (resumed, restarted):
            rows = conn.execute("SELECT step, count(*) FROM metrics WHERE run_uuid = ? AND "
                                "key = 'lr' GROUP BY step", (retry.user_attrs["mlflow_run_id"],))
            assert sorted(rows) == [(step, 1) for step in range(EPOCHS * STEPS)]
        check_whole_curve(client, retry)
    assert not list(folder.glob("*.pt"))


def test_a_stalled_original_leaves_its_retrys_checkpoint_alone(tmp_path, data, study_file):
    """Worker A is frozen (SIGSTOP) after an epoch, past the grace period; worker B fails its
    trial and resumes the retry from A's checkpoint. A is woken (SIGCONT) while B trains: at
    its next epoch end it finds its trial failed, so it neither overwrites nor removes the file
    B writes; B finishes from it."""
    beat = {"SWEEP_HEARTBEAT_INTERVAL": "1", "SWEEP_GRACE_PERIOD": "2"}

    def worker() -> subprocess.Popen:
        return subprocess.Popen(
            sweep_cmd("launch", "--study", str(study_file), "--quiet", "--trials", "1",
                      "--set", "train.epochs=5"),
            cwd=tmp_path, env=dict(env(data), **beat), stdout=subprocess.PIPE,
            stderr=subprocess.PIPE, text=True)

    a = worker()
    wait_epochs(tmp_path / "sweep.db", a, 1)
    # Frozen with its checkpoint note written: a process stopped inside an SQLite write keeps
    # the file locked for everyone (a real hazard of SQLite; PostgreSQL is the cluster store),
    # and the note is the write that follows an epoch end.
    noted = time.monotonic() + 60
    while optuna.load_study(study_name="resume", storage=f"sqlite:///{tmp_path}/sweep.db") \
            .trials[0].user_attrs.get("checkpoint_epochs", 0) < 1:
        assert a.poll() is None and time.monotonic() < noted, a.communicate()
        time.sleep(0.05)
    a.send_signal(signal.SIGSTOP)
    try:
        # Stale by definition once a stopped process has not beaten for the grace period: B must
        # start after that, or its launch counts A's RUNNING trial against the budget of 1 and
        # has nothing to run (seen on a loaded machine, where B's start raced the grace period).
        time.sleep(float(beat["SWEEP_GRACE_PERIOD"]) + 1)
        b = worker()
        storage = f"sqlite:///{tmp_path}/sweep.db"
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:  # B resumed the retry and saved an epoch of its own
            study = optuna.load_study(study_name="resume", storage=storage)
            retries = [t for t in study.get_trials() if t.system_attrs.get("failed_trial") == 0]
            if retries and retries[0].user_attrs.get("checkpoint_epochs", 0) > \
                    retries[0].user_attrs.get("resumed_epochs", 99):
                break
            assert b.poll() is None, b.communicate()
            time.sleep(0.1)
        (retry,) = retries
        resumed_at = retry.user_attrs["resumed_epochs"]
        assert resumed_at >= 1
    finally:
        a.send_signal(signal.SIGCONT)
    # A wakes, ends its epoch (its report to Optuna is refused: the trial is failed) and ends
    # its run; its checkpoint's remove came before that, its save before the report.
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path}/mlflow.db")
    original_run = study.trials[0].user_attrs["mlflow_run_id"]
    while time.monotonic() < deadline:
        if "UpdateFinishedTrialError" in client.get_run(original_run).data.tags.get(
                "sweep.error", ""):
            break
        time.sleep(0.1)
    else:
        raise AssertionError("the original never woke up")
    folder = checkpoints_of(tmp_path)
    if b.poll() is None:  # B still training: its file is there, and is B's own (past A's epochs)
        payload = torch.load(folder / "trial-0.pt", weights_only=True)
        assert payload["state"]["epochs"] > resumed_at
    finish(b)
    finish(a)
    study, client = stores(tmp_path)
    retry = retry_of(study, 0)
    assert retry.state == TrialState.COMPLETE
    assert client.get_run(retry.user_attrs["mlflow_run_id"]).data.tags[
        "sweep.resumed_at_step"] == str(resumed_at * STEPS)
    assert not list(folder.glob("*.pt"))  # B removed it; A wrote nothing after
