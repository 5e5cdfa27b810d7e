"""The rules around trial checkpoints, on real Optuna studies without training (issue 19): how
often an interrupted trial is retried, which checkpoint a retry trusts, and the one line it
prints when it does not. The end-to-end resumption is in test_resume.py."""

from __future__ import annotations

import dataclasses
import time

import optuna
import torch
from optuna.trial import TrialState

from pathlib import Path

from sweep.stores.checkpoint_writer import CheckpointWriter
from sweep.stores.checkpoints import CheckpointDir, waiting_with_checkpoint
from sweep.study.schedules import LRSchedule
from sweep.stores.retry import CHECKPOINT_EPOCHS, RESUMED_EPOCHS, retry_later
from sweep.study.space import trial_config
from sweep.study.spec import load_study
from sweep.training.checkpoint import unfused_state, write_atomic
from sweep.training.models import build_model
from sweep.training.train import build_optimizer


def _interrupted(study: optuna.Study, checkpoint_epochs: int | None = None,
                 resumed_epochs: int | None = None) -> optuna.trial.FrozenTrial:
    """Ask the next trial (a queued retry first), record its checkpoint attributes, fail it."""
    trial = study.ask()
    trial.suggest_float("x", 0, 1)
    trial.set_user_attr("seed", 40 + trial.number)
    if checkpoint_epochs is not None:
        trial.set_user_attr(CHECKPOINT_EPOCHS, checkpoint_epochs)
    if resumed_epochs is not None:
        trial.set_user_attr(RESUMED_EPOCHS, resumed_epochs)
    study.tell(trial, state=TrialState.FAIL)
    return study.get_trials()[trial.number]


def test_a_retry_is_retried_again_only_when_it_made_progress():
    study = optuna.create_study()
    original = _interrupted(study, checkpoint_epochs=2)
    assert retry_later(study, original)
    assert retry_later(study, original)  # idempotent: no second retry of the same trial
    (first,) = study.get_trials(states=(TrialState.WAITING,))
    assert first.system_attrs["retry_history"] == [0]
    assert first.user_attrs["sweep.seed"] == 40  # the same trial continued: the same seed

    progressed = _interrupted(study, checkpoint_epochs=4, resumed_epochs=2)
    assert progressed.number == first.number and retry_later(study, progressed)
    (second,) = study.get_trials(states=(TrialState.WAITING,))
    assert second.system_attrs["retry_history"] == [0, first.number]
    assert second.user_attrs["sweep.seed"] == 40

    stuck = _interrupted(study, checkpoint_epochs=4, resumed_epochs=4)  # no epoch further
    assert not retry_later(study, stuck)
    assert not study.get_trials(states=(TrialState.WAITING,))
    fresh = _interrupted(study)  # never checkpointed: its one retry, as before
    assert retry_later(study, fresh)
    never_ran = study.get_trials(states=(TrialState.WAITING,))[0]
    assert not retry_later(study, never_ran)  # a retry that trained nothing: once is enough
    # ... unless its own worker stopped it on a signal (preempted twice within one epoch):
    preempted = _interrupted(study)  # the retry ran and was stopped again before an epoch
    assert preempted.number == never_ran.number and not retry_later(study, preempted)
    assert retry_later(study, preempted, signalled=True)
    (again,) = study.get_trials(states=(TrialState.WAITING,))
    assert again.system_attrs["retry_history"][-1] == preempted.number


def _retry_and_dir(tmp_path, code="1.0+abc", epochs=2, checkpoint_epochs=1):
    spec = load_study("smoke")
    spec = dataclasses.replace(spec, train=dataclasses.replace(spec.train, epochs=epochs))
    study = optuna.create_study(study_name="smoke")
    study.set_user_attr("sweep.space", "the space")
    original = study.ask()
    cfg = trial_config(original, spec)
    original.set_user_attr("seed", cfg.seed)
    original.set_user_attr(CHECKPOINT_EPOCHS, checkpoint_epochs)
    study.tell(original, state=TrialState.FAIL)
    retry_later(study, study.get_trials()[0])
    assert waiting_with_checkpoint(study.get_trials()) == [(1, checkpoint_epochs)]
    retry = study.ask()
    lines: list[str] = []
    folder = CheckpointDir(tmp_path, code, "cpu", log=lines.append)
    return folder, retry, trial_config(retry, spec), lines


STEPS = 10  # the smoke study's steps per epoch


def _state(cfg, epochs: int = 1) -> dict:
    """A real training state of ``cfg``'s model after ``epochs`` epochs (fresh weights)."""
    model = build_model(cfg.train.model, cfg.train.width)
    schedule = LRSchedule(cfg.schedule, STEPS, cfg.train.epochs)
    return unfused_state(model, build_optimizer(model, cfg), schedule, torch.Generator(), epochs,
                         epochs * STEPS, [{"val_loss": 1.0, "val_acc": 0.5}] * epochs)


def _open(folder: CheckpointDir, retry, cfg):
    return folder.open(retry, cfg, on_saved=lambda n: None, steps_per_epoch=STEPS)


def _write(folder: CheckpointDir, retry, cfg, lines: list[str], config: dict | None = None,
           state: dict | None = None, **identity) -> None:
    """The checkpoint the interrupted trial would have written (its identity is the retry's,
    which ``open`` computes), with ``identity``'s and ``config``'s entries changed."""
    written = _open(folder, retry, cfg)
    identity = {**written.identity, **identity}
    identity["config"] = {**identity["config"], **(config or {})}
    state = state if state is not None else _state(cfg)
    write_atomic(written.path, {"format": 1, "identity": identity, "state": state,
                                "lrs": [0.1] * state["steps"], "losses": [2.0] * state["steps"]})
    lines.clear()


def test_a_retry_resumes_its_own_checkpoint(tmp_path):
    folder, retry, cfg, lines = _retry_and_dir(tmp_path)
    assert retry.number == 1 and cfg.seed == 0  # the original's seed, not seed + 1
    _write(folder, retry, cfg, lines)
    found = _open(folder, retry, cfg)
    assert found.path == folder.folder(retry.study) / "trial-0.pt"
    assert found.path.parent.name.startswith("smoke-")
    assert found.resume["epochs"] == 1 and found.record.lrs == [0.1] * STEPS and not lines


def test_a_foreign_or_missing_checkpoint_is_one_line_and_a_restart(tmp_path):
    folder, retry, cfg, lines = _retry_and_dir(tmp_path)
    path = folder.folder(retry.study) / "trial-0.pt"
    assert _open(folder, retry, cfg).resume is None
    assert lines == [f"trial 1 (a retry of trial 0): its checkpoint {path} "
                     f"(epoch 1) is missing; it restarts from step 0"]
    for identity, says in (({"code": "0.9+old"}, "another code version ('0.9+old', this is "
                                                 "'1.0+abc')"),
                           ({"space": "0123"}, "another search space"),
                           ({"study_uid": "other"}, "an earlier study of the same name"),
                           ({"config": {"epochs": 99}},
                            "another configuration (epochs 99, now 2)")):
        _write(folder, retry, cfg, lines, **identity)
        assert _open(folder, retry, cfg).resume is None
        (line,) = lines
        assert line.startswith(f"trial 1 (a retry of trial 0): checkpoint {path} was written "
                               f"for {says}"), line
        assert line.endswith("; it restarts from step 0")


def test_a_file_that_loads_but_does_not_fit_or_disagrees_is_one_line_and_a_restart(tmp_path):
    """What the file says is checked against itself, its trial's record and the trial's model
    before anything is replayed: each problem costs a restart from step 0, never the trial."""
    folder, retry, cfg, lines = _retry_and_dir(tmp_path, epochs=4, checkpoint_epochs=2)
    path = folder.folder(retry.study) / "trial-0.pt"
    no_weight = _state(cfg, 2)
    del no_weight["model"][next(iter(no_weight["model"]))]
    wrong_buffer = _state(cfg, 2)
    name = next(n for n, _ in build_model(cfg.train.model, cfg.train.width).named_parameters())
    wrong_buffer["optimizer"]["buffers"][name] = {"momentum_buffer": torch.zeros(3)}
    short_history = {**_state(cfg, 2), "history": [{"val_loss": 1.0, "val_acc": 0.5}]}
    odd_steps = {**_state(cfg, 2), "steps": 2 * STEPS - 1}
    cases = [(no_weight, "does not fit the trial (ValueError: weights of another model"),
             (wrong_buffer, f"does not fit the trial (ValueError: optimizer state {name}."),
             (short_history, "does not fit the trial (ValueError: a history of 1 epochs for 2)"),
             (odd_steps, f"does not fit the trial (ValueError: {2 * STEPS - 1} steps for 2 "
                         f"epochs of {STEPS})"),
             (_state(cfg, 4), "does not fit the trial (ValueError: it holds 4 finished epochs, "
                              "not 1 to 3)"),  # at the end: it would complete with no training
             (_state(cfg, 1), "holds 1 epochs, older than the 2 its trial recorded")]
    for state, says in cases:
        _write(folder, retry, cfg, lines, state=state)
        assert _open(folder, retry, cfg).resume is None
        (line,) = lines
        assert line.startswith(f"trial 1 (a retry of trial 0): checkpoint {path} {says}"), line
        assert line.endswith("; it restarts from step 0")
    _write(folder, retry, cfg, lines, state=_state(cfg, 3))  # a note that lags the write
    assert _open(folder, retry, cfg).resume["epochs"] == 3 and not lines


def test_no_two_studies_share_or_escape_a_checkpoint_folder(tmp_path):
    """Names that sanitise alike, one name in two storages, a re-created study, and '..'."""
    from sweep.stores.checkpoints import STUDY_UID, storage_key

    root = tmp_path / "ckpt"
    written = {}
    for db, name in (("a", "exp 1"), ("a", "exp_1"), ("b", "exp_1"), ("a", ".."), ("a", "x/../y")):
        url = f"sqlite:///{tmp_path}/{db}.db"
        study = optuna.create_study(study_name=name, storage=url)
        study.set_user_attr(STUDY_UID, f"uid-{db}-{name}")
        trial = study.ask()
        trial.suggest_float("x", 0, 1)
        cfg = trial_config(trial, load_study("smoke"))
        folder = CheckpointDir(root, "v", "cpu", storage_key(url))
        found = folder.open(trial, cfg, on_saved=lambda n: None, steps_per_epoch=STEPS)
        found.save(_state(cfg))
        written[(db, name)] = found.path
    paths = list(written.values())
    assert len({p.parent for p in paths}) == len(paths)  # one folder each
    assert all(p.is_file() and p.resolve().parent.parent == root for p in paths)  # none escapes
    assert written[("a", "exp 1")].name == written[("a", "exp_1")].name == "trial-0.pt"
    # a study deleted and created again under the same name gets a new folder
    url = f"sqlite:///{tmp_path}/a.db"
    optuna.delete_study(study_name="exp_1", storage=url)
    again = optuna.create_study(study_name="exp_1", storage=url)
    again.set_user_attr(STUDY_UID, "uid-new")
    assert CheckpointDir(root, "v", "cpu", storage_key(url)).folder(again) != \
        written[("a", "exp_1")].parent


def _fresh(tmp_path, storage=None):
    """A fresh trial of the smoke study and its checkpoint (its log lines kept)."""
    study = optuna.create_study(storage=storage)
    trial = study.ask()
    trial.suggest_float("x", 0, 1)
    cfg = trial_config(trial, load_study("smoke"))
    lines: list[str] = []
    found = CheckpointDir(tmp_path, "v", "cpu", log=lines.append).open(
        trial, cfg, on_saved=lambda n: None, steps_per_epoch=STEPS)
    return study, trial, cfg, found, lines


def test_only_the_owning_trial_writes_or_removes_its_file(tmp_path):
    """A stalled worker's trial failed by another: its save and remove leave the file alone
    (the end-to-end case with SIGSTOP/SIGCONT: test_resume.py)."""
    study, trial, cfg, found, lines = _fresh(tmp_path, f"sqlite:///{tmp_path}/s.db")
    found.save(_state(cfg))
    assert found.path.is_file()
    retrys_file = found.path.read_bytes() + b""
    study._storage.set_trial_state_values(trial._trial_id, state=TrialState.FAIL)  # stale check
    found.save(_state(cfg, 2))
    writer = CheckpointWriter()
    found.remove_after(writer)
    writer.close(time.monotonic() + 30)
    assert found.path.read_bytes() == retrys_file and not lines


def test_a_trial_that_ends_removes_its_own_file_after_its_pending_write(tmp_path):
    """Ownership is asked at the trial's end, while it is RUNNING; the writer removes the file
    later, when Optuna has already heard the result (the trial owns nothing by then)."""
    study, trial, cfg, found, lines = _fresh(tmp_path, f"sqlite:///{tmp_path}/s.db")
    writer = CheckpointWriter()
    writer.save(found, lambda: _state(cfg))
    assert writer.flush(time.monotonic() + 30) and found.path.is_file()
    found.remove_after(writer)
    study.tell(trial, 0.5)  # told before the writer gets to the removal
    writer.close(time.monotonic() + 30)
    assert not found.path.exists() and not lines


def test_a_write_that_fails_is_a_warning_and_training_goes_on(tmp_path):
    """Any error of the write or of the note after it (not only OSError): one warning."""
    _, _, cfg, found, lines = _fresh(tmp_path)
    unpicklable = {**_state(cfg), "history": [{"val_loss": lambda: 0}]}  # pickle refuses it
    found.save(unpicklable)
    found.save(unpicklable)
    (line,) = lines
    assert line.startswith(f"warning: checkpoint {found.path} not written (")
    assert not list(found.path.parent.glob(".*.tmp"))  # its temporary is gone too

    def store_away(epochs):
        raise optuna.exceptions.StorageInternalError("database is locked")

    lines.clear()
    found.on_saved, found._warned = store_away, False
    found.save(_state(cfg))
    (line,) = lines
    assert found.path.is_file() and "written, but its epoch count was not recorded" in line


def test_temporaries_are_unique_exclusive_and_leave_nothing(tmp_path):
    import os
    import socket

    from sweep.training.atomic import temporary_name

    target = tmp_path / "trial-0.pt"
    names = {temporary_name(target) for _ in range(50)}
    assert len(names) == 50
    name = next(iter(names)).name
    assert name.startswith(f".trial-0.pt.{socket.gethostname()}.{os.getpid()}.")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.write_bytes(b"not a checkpoint")
    target.symlink_to(elsewhere)  # planted: the write replaces the link, never writes through it
    write_atomic(target, {"a": 1})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["elsewhere", "trial-0.pt"]
    assert not target.is_symlink() and elsewhere.read_bytes() == b"not a checkpoint"


def test_precision_is_the_study_s_never_the_pack_s():
    """A pack trains in its jobs' configured precision, a pack of one included, whoever joins
    it; compiled vs eager is not part of a checkpoint's identity."""
    from sweep.stores.checkpoints import _NOT_IDENTITY
    from sweep.training.fused import pack_bf16
    from sweep.training.train import trial_precision

    assert pack_bf16("auto", True, True)  # alone too: train.bf16 on CUDA is bf16
    assert not pack_bf16("auto", True, False)
    assert not pack_bf16("auto", False, True)  # the CPU: always fp32
    assert not pack_bf16("fp32", True, True) and pack_bf16("bf16", True, False)  # as asked
    bf16 = dataclasses.replace(load_study("smoke").train, bf16=True)
    assert trial_precision(bf16, torch.device("cuda")) == "bf16"
    assert trial_precision(bf16, torch.device("cpu")) == "fp32"
    assert trial_precision(dataclasses.replace(bf16, bf16=False), torch.device("cuda")) == "fp32"
    assert "compile" in _NOT_IDENTITY


def test_a_retry_recorded_in_another_precision_restarts_from_step_0_in_one_line(tmp_path):
    """A state whose steps ran in bf16 (a CUDA pack under the earlier rule) cannot go on in
    the fp32 this trial trains in here: one line, and the retry restarts from step 0."""
    folder, retry, cfg, lines = _retry_and_dir(tmp_path)
    path = folder.folder(retry.study) / "trial-0.pt"
    _write(folder, retry, cfg, lines, state={**_state(cfg), "precision": "bf16"})
    assert _open(folder, retry, cfg).resume is None
    assert lines == [f"trial 1 (a retry of trial 0): checkpoint {path} does not fit the trial "
                     f"(ValueError: its steps ran in bf16, and the study trains in fp32 on cpu "
                     f"(train.bf16: {str(cfg.train.bf16).lower()})); it restarts from step 0"]
    _write(folder, retry, cfg, lines, state={**_state(cfg), "precision": "fp32"})
    assert _open(folder, retry, cfg).resume["epochs"] == 1 and not lines


def test_status_lists_checkpoint_files_of_no_live_trial_and_repair_removes_them(tmp_path):
    """A shared folder after kills and deletions: files of finished trials, a temporary left by
    a SIGKILL, a deleted study's folder, beside live trials' files and another storage's study.
    `sweep status` (a real process) lists exactly the orphans; --repair removes them."""
    import json
    import os
    import subprocess
    import time

    from click.testing import CliRunner

    from helpers import REPO, sweep_cmd
    from sweep.cli import main
    from sweep.stores.checkpoints import MANIFEST, STUDY_UID, storage_key

    url, root = f"sqlite:///{tmp_path}/s.db", tmp_path / "ckpt"
    study = optuna.create_study(study_name="orph", storage=url)
    study.set_user_attr(STUDY_UID, "u1")
    for state in (TrialState.COMPLETE, TrialState.RUNNING, TrialState.FAIL):
        trial = study.ask()
        trial.suggest_float("x", 0, 1)
        if state != TrialState.RUNNING:
            study.tell(trial, 1.0 if state == TrialState.COMPLETE else None, state=state)
    retry_later(study, study.get_trials()[2])  # #3 waits to resume #2's file
    folder = CheckpointDir(root, "v", "cpu", storage_key(url)).folder(study)
    folder.mkdir(parents=True)
    for n in range(3):
        (folder / f"trial-{n}.pt").write_bytes(b"x")
    (folder / MANIFEST).write_text(json.dumps({"storage": storage_key(url), "study": "orph",
                                               "study_id": study._study_id, "uid": "u1"}))
    killed = folder / ".trial-1.pt.node7.4242.0a1b2c.tmp"  # a SIGKILLed writer's, an hour old
    killed.write_bytes(b"half")
    os.utime(killed, (time.time() - 3600,) * 2)
    writing = folder / ".trial-1.pt.node8.4242.3d4e5f.tmp"  # being written by the live trial
    writing.write_bytes(b"half")
    gone, foreign = root / "deleted-0123", root / "elsewhere-4567"
    for other, storage in ((gone, storage_key(url)), (foreign, "file:/other/storage.db")):
        other.mkdir()
        (other / "trial-0.pt").write_bytes(b"x")
        (other / MANIFEST).write_text(json.dumps({"storage": storage, "study": "old",
                                                  "study_id": 99, "uid": "u0"}))
    orphans = [folder / "trial-0.pt", killed, gone / MANIFEST, gone / "trial-0.pt"]

    args = ["status", "--study", "orph", "--storage", url, "--tracking-uri",
            f"sqlite:///{tmp_path}/mlflow.db", "--checkpoint-dir", str(root)]
    done = subprocess.run(sweep_cmd(*args), capture_output=True, text=True, timeout=120,
                          env=dict(os.environ, PYTHONPATH=str(REPO)))
    assert done.returncode == 0 and "Traceback" not in done.stderr, done.stderr
    out = done.stdout
    listed = [Path(line.strip()) for line in out.splitlines() if line.startswith("    /")]
    assert sorted(listed) == sorted(orphans), out
    assert f"4 checkpoint file(s) of no live trial under {root}:" in out
    assert "fix: sweep status --repair" in out
    repaired = CliRunner().invoke(main, [*args, "--repair"])  # in this process: one start less
    assert repaired.exit_code == 0, repaired.output
    assert f"repaired: removed 4 checkpoint file(s) of no live trial under {root}" in \
        repaired.output
    assert not any(p.exists() for p in orphans) and not gone.exists()
    assert sorted(p.name for p in folder.iterdir()) == sorted(
        [MANIFEST, "trial-1.pt", "trial-2.pt", writing.name])
    assert (foreign / "trial-0.pt").is_file()  # another storage's: never ours to judge


def test_workers_starting_together_all_find_the_checkpoint_folder_writable(tmp_path):
    """Four workers resolve one new checkpoint folder at the same moment (threads: the race is
    in the filesystem calls, which run in parallel), 30 times: each probe removes the folders
    it made, and none may make another's check fail (a folder another worker's probe still
    used may stay: it is the folder they all write to)."""
    import threading

    from sweep.stores.checkpoints import resolve_dir

    failures: list[str] = []
    for round_ in range(30):
        folder = tmp_path / f"round{round_}" / "sweep-checkpoints"
        start = threading.Barrier(4)

        def resolve():
            start.wait()
            try:
                resolve_dir(str(folder), f"sqlite:///{tmp_path}/s.db")
            except Exception as err:
                failures.append(str(err))

        workers = [threading.Thread(target=resolve) for _ in range(4)]
        for w in workers:
            w.start()
        for w in workers:
            w.join()
    assert not failures, failures[:3]
    assert not [p for p in tmp_path.rglob("*") if p.is_file()], "a probe was left behind"


def test_checkpoint_identity_has_no_secret_and_ignores_spelling():
    """A password in the user part or the query never reaches the key written to study.json;
    a driver alias, a default port or an added query is the same database."""
    from sweep.stores.checkpoints import storage_key
    from tests.helpers import PG_PASSWORD

    spellings = (f"postgresql://sweep:{PG_PASSWORD}@DB.example:5432/optuna",
                 f"postgresql+psycopg2://db.example/optuna?password={PG_PASSWORD}&sslmode=require",
                 "postgresql://db.example/optuna/")
    keys = {storage_key(url) for url in spellings}
    assert keys == {"postgresql://db.example:5432/optuna"}
    assert storage_key("postgresql://db.example/other") not in keys
