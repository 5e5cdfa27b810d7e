"""Study files: every file in studies/ validates; bad files give one-line errors naming the key."""

from __future__ import annotations

from pathlib import Path

import pytest

from sweep.errors import OverrideError, StudyFileError
from sweep.study.specs import CategoricalParam, FloatParam, IntParam
from sweep.study.spec import available_studies, load_study
from sweep.study.spec import parse_study

STUDIES = sorted((Path(__file__).resolve().parent.parent / "studies").glob("*.yaml"))

GOOD = """
name: t
trials: 3
data: {train_size: 200, val_size: 50}
train: {model: resnet8, epochs: 2, batch_size: 50}
space:
  warmup_steps: {type: int, low: 0, high: 4}
  base_lr: {type: float, low: 0.01, high: 1.0, log: true}
  scheduler:
    step: {gamma: {type: float, low: 0.1, high: 0.5}, step_size_epochs: 1}
    cosine: {}
"""


def parse(text: str, overrides=()):
    return parse_study(text, "s.yaml", Path("s.yaml"), overrides)


@pytest.mark.parametrize("path", STUDIES, ids=[p.stem for p in STUDIES])
def test_every_study_file_validates(path):
    spec = load_study(str(path))
    assert spec.trials >= 1 and spec.space.scheduler
    assert 0 < spec.total_steps


def test_studies_are_found_by_name():
    assert {"smoke", "warmup_vs_plateau"} <= set(available_studies())
    assert load_study("smoke").name == "smoke"


def test_warmup_vs_plateau_space_is_the_question():
    spec = load_study("warmup_vs_plateau")
    assert {"step", "multistep", "exponential", "cosine", "plateau"} <= set(spec.space.scheduler)
    assert isinstance(spec.space.base_lr, FloatParam) and spec.space.base_lr.log
    assert isinstance(spec.space.warmup_steps, IntParam) and spec.space.warmup_steps.low == 0
    assert "gamma" not in spec.space.scheduler["cosine"]
    assert "patience_epochs" in spec.space.scheduler["plateau"]
    assert spec.train.model == "resnet20"


def test_shrunk_warmup_vs_plateau_stays_valid():
    spec = load_study("warmup_vs_plateau", ["train.epochs=3", "data.train_size=3000"])
    assert spec.train.epochs == 3 and spec.steps_per_epoch == 3000 // 128
    assert spec.space.warmup_steps.high <= spec.total_steps - 1


def test_good_file_parses_into_typed_specs():
    spec = parse(GOOD)
    assert spec.steps_per_epoch == 4 and spec.total_steps == 8
    assert isinstance(spec.space.scheduler["step"]["gamma"], FloatParam)
    assert spec.space.scheduler["step"]["step_size_epochs"].value == 1


@pytest.mark.parametrize("change, key, fragment", [
    (("trials: 3", "trails: 3"), "trails", "did you mean 'trials'"),
    (("model: resnet8", "model: resnet9"), "train.model", "must be one of"),
    (("step_size_epochs: 1}", "step_size_epochs: 1, min_lr: 0.1}"), "space.scheduler.step.min_lr",
     "not a parameter of scheduler 'step'"),
    (("cosine: {}", "cosin: {}"), "space.scheduler.cosin", "did you mean 'cosine'"),
    (("high: 4}", "high: 8}"), "space.warmup_steps", "must lie in [0, 7]"),
    (("low: 0.01, high: 1.0, log: true", "low: 0.0, high: 1.0, log: true"), "space.base_lr.low",
     "log range needs low > 0"),
    (("low: 0.1, high: 0.5}", "low: 0.5, high: 0.1}"), "space.scheduler.step.gamma", "low (0.5) > high"),
    (("batch_size: 50", "batch_size: 500"), "train.batch_size", "larger than the training split"),
    (("trials: 3", "trials: 3\nobjective: {metric: accuracy}"), "objective.metric", "val_acc"),
    (("trials: 3", "trials: 3\nobjective: {direction: up}"), "objective.direction", "maximize"),
    (("{gamma: {type: float, low: 0.1, high: 0.5}", "{gamma: {type: float, low: 0.1, high: 1.5}"),
     "space.scheduler.step.gamma", "(0, 1]"),
])
def test_bad_files_name_the_key(change, key, fragment):
    with pytest.raises(StudyFileError) as err:
        parse(GOOD.replace(*change))
    message = str(err.value)
    assert message.startswith(f"s.yaml: {key}"), message
    assert fragment in message and "\n" not in message


def test_line_numbers_are_reported():
    with pytest.raises(StudyFileError, match=r"train.model \(line 5\)"):
        parse(GOOD.replace("model: resnet8", "model: vgg"))


def test_yaml_syntax_error_is_one_line():
    with pytest.raises(StudyFileError, match=r"s.yaml \(line \d+\): not valid YAML"):
        parse(GOOD + "\n  bad: [unclosed\n")


def test_duplicate_choices_rejected():
    text = GOOD.replace("step_size_epochs: 1}", "step_size_epochs: {type: categorical, choices: [1, 1]}}")
    with pytest.raises(StudyFileError, match="duplicate choices"):
        parse(text)


def test_overrides_apply_and_validate():
    spec = parse(GOOD, ["train.epochs=3", "seed=7", "pruner.type=none"])
    assert spec.train.epochs == 3 and spec.seed == 7 and spec.pruner.type == "none"
    with pytest.raises(OverrideError, match="did you mean 'epochs'"):
        parse(GOOD, ["train.epoch=3"])
    with pytest.raises(StudyFileError, match="train.epochs.*must be an integer"):
        parse(GOOD, ["train.epochs=three"])
    with pytest.raises(OverrideError, match="expected KEY=VALUE"):
        parse(GOOD, ["train.epochs"])


def test_unknown_study_lists_the_available_ones():
    with pytest.raises(StudyFileError, match="available studies: .*smoke"):
        load_study("no_such_study")


def test_categorical_param():
    spec = parse(GOOD.replace("step_size_epochs: 1}", "step_size_epochs: {type: categorical, choices: [1, 2]}}"))
    assert spec.space.scheduler["step"]["step_size_epochs"] == CategoricalParam((1, 2))
