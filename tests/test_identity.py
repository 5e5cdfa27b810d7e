"""A study is one experiment: a relaunch whose training settings differ is refused in one line
(nothing written), unless ``--allow-config-change`` records the change; the README's shrunk
study runs under its own name, so the real study's dry run afterwards in the same folder finds
the full budget."""

from __future__ import annotations

import re
import sqlite3
import subprocess

import optuna
import pytest
from click.testing import CliRunner

from helpers import REPO, sweep_cmd, sweep_env
from sweep.cli import main
from sweep.errors import ConfigChangedError
from sweep.loop.identity import CHANGES, IDENTITY, identity_of
from sweep.loop.budget import SETTINGS
from sweep.loop.study import open_study
from sweep.stores.storage import open_storage
from sweep.study.spec import load_study


def storage(tmp_path):
    return open_storage(f"sqlite:///{tmp_path}/sweep.db")


def attrs(tmp_path) -> dict:
    return optuna.load_study(study_name="smoke", storage=f"sqlite:///{tmp_path}/sweep.db").user_attrs


def test_the_identity_holds_every_training_setting_but_fuse():
    spec = load_study("smoke")
    found = identity_of(spec)
    for key in ("train.epochs", "train.model", "train.weight_decay", "data.train_size",
                "objective.metric", "divergence.enabled", "pruner.type", "seed"):
        assert key in found, key
    assert "train.fuse" not in found
    assert identity_of(load_study("smoke", ["train.fuse=4"])) == found  # same computation fused
    assert identity_of(load_study("smoke", ["train.epochs=3"]))["train.epochs"] == 3


def test_a_changed_setting_is_refused_naming_the_key_and_nothing_is_written(tmp_path):
    open_study(load_study("smoke"), storage(tmp_path))
    before = attrs(tmp_path)
    with pytest.raises(ConfigChangedError) as err:
        open_study(load_study("smoke", ["train.epochs=3"]), storage(tmp_path))
    text = str(err.value)
    assert "train.epochs=2" in text and "train.epochs=3" in text
    assert "--allow-config-change" in text and "--set name=" in text
    assert attrs(tmp_path) == before  # nothing recorded, nothing adopted


@pytest.mark.parametrize("override", ["data.train_size=500", "objective.metric=val_loss",
                                      "pruner.n_warmup_steps=0", "seed=7", "divergence.enabled=false"])
def test_each_part_of_the_identity_is_checked(tmp_path, override):
    open_study(load_study("smoke"), storage(tmp_path))
    with pytest.raises(ConfigChangedError, match=re.escape(override.split("=")[0])):
        open_study(load_study("smoke", [override]), storage(tmp_path))


def test_fuse_and_an_explicit_default_are_no_change(tmp_path):
    open_study(load_study("smoke"), storage(tmp_path))
    open_study(load_study("smoke", ["train.fuse=2"]), storage(tmp_path))
    default_decay = load_study("smoke").train.weight_decay
    open_study(load_study("smoke", [f"train.weight_decay={default_decay}"]), storage(tmp_path))
    assert CHANGES not in attrs(tmp_path)


def test_an_allowed_change_is_recorded_and_adopted(tmp_path):
    open_study(load_study("smoke"), storage(tmp_path))
    open_study(load_study("smoke", ["train.epochs=3"]), storage(tmp_path),
               allow_config_change=True)
    stored = attrs(tmp_path)
    (change,) = stored[CHANGES]
    assert change["changed"] == {"train.epochs": {"from": 2, "to": 3}}
    assert stored[IDENTITY]["train.epochs"] == 3
    assert stored[SETTINGS]["train"]["epochs"] == 3  # what sweep confirm replicates now
    open_study(load_study("smoke", ["train.epochs=3"]), storage(tmp_path))  # the new normal


def test_a_study_created_before_the_rule_adopts_its_identity(tmp_path):
    study = open_study(load_study("smoke"), storage(tmp_path))
    with sqlite3.connect(tmp_path / "sweep.db") as db:  # as an older sweep left it
        db.execute("DELETE FROM study_user_attributes WHERE key = ?", (IDENTITY,))
    assert IDENTITY not in attrs(tmp_path)
    open_study(load_study("smoke", ["train.epochs=3"]), storage(tmp_path))
    assert attrs(tmp_path)[IDENTITY]["train.epochs"] == 3
    assert study.study_name == "smoke"


def test_the_cli_refuses_in_one_line_with_exit_2_and_no_mlflow_store(tmp_path, monkeypatch,
                                                                     shared_cifar):
    monkeypatch.chdir(tmp_path)
    open_study(load_study("smoke"), storage(tmp_path))
    result = CliRunner().invoke(main, ["launch", "--study", "smoke", "--set", "train.epochs=3",
                                      "--data-dir", str(shared_cifar)])
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: study 'smoke' was created with")
    assert not (tmp_path / "mlflow.db").exists()
    dry = CliRunner().invoke(main, ["launch", "--study", "smoke", "--set", "train.epochs=3",
                                    "--dry-run"])
    assert dry.exit_code == 0 and "a launch refuses this" in dry.output


def readme_shrunk_command() -> list[str]:
    """The README's shrunk copy of the real study, as a reader copies it."""
    text = re.sub(r"\s+", " ", (REPO / "README.md").read_text())  # lines wrap inside `...`
    found = re.search(r"`(sweep launch --study warmup_vs_plateau --set name=\S+[^`]*)`", text)
    assert found, "the README's shrunk study must run under its own name (--set name=...)"
    return found.group(1).split()[1:]


@pytest.mark.slow
def test_the_readme_tour_then_the_real_studys_dry_run_in_one_folder(tmp_path, shared_cifar):
    args = readme_shrunk_command()
    # Smaller still, so that the test trains seconds, not minutes: later flags win.
    args += ["--trials", "1", "--set", "train.epochs=1", "--set", "data.train_size=256",
             "--set", "data.val_size=64", "--set", "data.test_size=64",
             "--set", "train.model=resnet8", "--quiet"]
    done = subprocess.run(sweep_cmd(*args), cwd=tmp_path, env=sweep_env(shared_cifar),
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    real = subprocess.run(sweep_cmd("launch", "--study", "warmup_vs_plateau", "--dry-run"),
                          cwd=tmp_path, env=sweep_env(shared_cifar), capture_output=True,
                          text=True, timeout=300)
    assert real.returncode == 0, real.stdout + real.stderr
    assert "creates the study" in real.stdout
    assert "budget: 40 trials, 0 used, 40 left" in real.stdout
