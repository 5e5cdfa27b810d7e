"""Fuzz: mutated study files are either a valid spec or one StudyFileError line, never a
traceback; `sweep validate` and `sweep launch` on them exit 0/2 and write nothing."""

from __future__ import annotations

import copy
import os
from pathlib import Path

import yaml
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sweep.cli import main
from sweep.errors import StudyFileError
from sweep.study.spec import parse_study

BASE = yaml.safe_load((Path(__file__).resolve().parent.parent / "studies" / "smoke.yaml").read_text())

scalars = st.one_of(st.none(), st.booleans(), st.integers(-10**6, 10**6),
                    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=8))
values = st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=3),
                                                       st.dictionaries(st.text(max_size=6), inner, max_size=3)),
                      max_leaves=6)


def paths(doc, prefix=()):
    """Every key path in a nested document."""
    if isinstance(doc, dict):
        for key, value in doc.items():
            yield prefix + (key,)
            yield from paths(value, prefix + (key,))


ALL_PATHS = list(paths(BASE))


@st.composite
def mutated(draw):
    doc = copy.deepcopy(BASE)
    for _ in range(draw(st.integers(1, 3))):
        path = draw(st.sampled_from(ALL_PATHS))
        node = doc
        for key in path[:-1]:
            if not isinstance(node, dict) or key not in node:
                break
            node = node[key]
        else:
            if not isinstance(node, dict):
                continue
            action = draw(st.sampled_from(["replace", "delete", "add", "rename"]))
            if action == "replace" and path[-1] in node:
                node[path[-1]] = draw(values)
            elif action == "delete":
                node.pop(path[-1], None)
            elif action == "add":
                node[draw(st.text(min_size=1, max_size=8))] = draw(values)
            elif path[-1] in node:
                node[path[-1] + draw(st.sampled_from(["s", "_", "x"]))] = node.pop(path[-1])
    return yaml.safe_dump(doc, sort_keys=False)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(mutated())
def test_mutated_files_are_valid_or_one_line_errors(text):
    try:
        spec = parse_study(text, "fuzz.yaml", Path("fuzz.yaml"))
    except StudyFileError as err:
        message = str(err)
        assert message.startswith("fuzz.yaml") and "\n" not in message, message
    else:
        assert_usable(spec)


def assert_usable(spec) -> None:
    """What acceptance promises: every trial the spec can draw is a config the trainer can run,
    i.e. passes the schedule rules and has a finite, non-negative LR at every step (checked on a
    few random draws; the curve itself only when the run is short enough to compute quickly)."""
    import math

    import optuna

    from sweep.study.schedules import check_schedule, lr_curve
    from sweep.study.space import trial_config

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    for _ in range(3):
        cfg = trial_config(study.ask(), spec)
        assert math.isfinite(cfg.base_lr) and cfg.base_lr > 0, cfg
        check_schedule(cfg.schedule, spec.steps_per_epoch, spec.train.epochs, cfg.base_lr)
        if spec.total_steps <= 5_000:
            lrs = lr_curve(cfg.schedule, cfg.base_lr, spec.steps_per_epoch, spec.train.epochs)
            assert len(lrs) == spec.total_steps and all(math.isfinite(lr) and lr >= 0 for lr in lrs)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                  HealthCheck.function_scoped_fixture])
@given(mutated())
def test_cli_on_mutated_files_writes_nothing(tmp_path_factory, text):
    folder = tmp_path_factory.mktemp("fuzz")
    study = folder / "fuzz.yaml"
    study.write_text(text)
    run = folder / "run"
    run.mkdir()
    old = os.getcwd()
    os.chdir(run)
    try:
        result = CliRunner().invoke(main, ["validate", str(study)])
        assert result.exit_code in (0, 2), result.output
        if result.exit_code == 2:
            lines = result.stderr.strip().splitlines()
            assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
            launched = CliRunner().invoke(main, ["launch", "--study", str(study), "--quiet",
                                                 "--data-dir", str(folder / "no-data")])
            assert launched.exit_code == 2 and "Traceback" not in launched.output
            assert os.listdir(run) == [] and not (folder / "no-data").exists()
    finally:
        os.chdir(old)
