"""`sweep confirm` replicates the search with the settings the search ran with: the study keeps
them when it is created (real SQLite storage, no training)."""

from __future__ import annotations

import pytest

from sweep.errors import ConfirmError
from sweep.loop.confirm_plan import as_searched
from sweep.stores.storage import open_storage
from sweep.loop.study import open_study
from sweep.study.spec import load_study, parse_overrides

STUDY = """
name: settings_kept
seed: 1
trials: 4
data: {train_size: 1024, val_size: 256}
train: {model: resnet8, epochs: 6, batch_size: 64}
space:
  warmup_steps: {type: int, low: 0, high: 4}
  base_lr: {type: float, low: 0.05, high: 0.5, log: true}
  scheduler:
    cosine: {}
"""
SEARCHED = ["train.epochs=3", "data.train_size=512"]


@pytest.fixture
def searched(tmp_path):
    path = tmp_path / "settings_kept.yaml"
    path.write_text(STUDY)
    study = open_study(load_study(path, SEARCHED), open_storage(f"sqlite:///{tmp_path}/sweep.db"))
    return path, study


def test_confirm_without_flags_takes_the_search_settings(searched):
    path, study = searched
    spec, taken = as_searched(load_study(path), study, overrides_given=False)
    assert sorted(taken) == sorted(SEARCHED)
    assert (spec.train.epochs, spec.data.train_size) == (3, 512)


def test_the_same_flags_or_a_fuse_change_are_accepted(searched):
    path, study = searched
    spec, taken = as_searched(load_study(path, SEARCHED + ["train.fuse=2"]), study, True)
    assert taken == [] and spec.train.epochs == 3


def test_contradicting_flags_are_refused_naming_the_search_settings(searched):
    path, study = searched
    with pytest.raises(ConfirmError, match=r"--set train\.epochs=3"):
        as_searched(load_study(path, ["data.train_size=512"]), study, overrides_given=True)


def test_an_exponent_without_a_dot_is_a_number():
    assert parse_overrides(["divergence.ceiling_factor=1e12"]) == [(("divergence", "ceiling_factor"), 1e12)]
