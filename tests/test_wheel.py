"""A built wheel runs the shipped studies from a clean environment (issue 12, part 3).

``studies/`` lives at the top of the repo; pyproject.toml maps it into the wheel as
``sweep/studies/``. The wheel is built offline (no build isolation) from a copy of the source
files, installed into a fresh virtual environment that sees the system's torch/optuna/mlflow but
not this checkout, and run from an empty folder.

Why not ``venv --system-site-packages``: the system site-packages hold the editable install of
this checkout, whose ``.pth`` hook appends a finder that would serve any module the wheel lacks
from the checkout, hiding exactly the defect under test. A ``.pth`` that only *names* the system
site-packages puts them on ``sys.path`` without running their ``.pth`` hooks.
"""

from __future__ import annotations

import os
import shutil
import site
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

REPO = Path(__file__).resolve().parent.parent
SOURCES = ("pyproject.toml", "README.md", "sweep", "studies")  # what a build reads


def test_listed_packages_are_every_subpackage_plus_the_studies():
    """pyproject lists packages by hand (a mapped folder rules out `find`): none may be missed."""
    from setuptools import find_packages

    listed = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]
    on_disk = find_packages(where=str(REPO), include=["sweep", "sweep.*"])
    assert sorted(listed) == sorted(on_disk + ["sweep.studies"])


def _clean_env() -> dict:
    """No PYTHONPATH (the other tests put the checkout there), no sweep/MLflow settings."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("PYTHON", "SWEEP_", "MLFLOW_"))}
    return dict(env, PYTHONNOUSERSITE="1", PYTHONUNBUFFERED="1")


@pytest.fixture(scope="module")
def wheel_env(tmp_path_factory) -> tuple[Path, Path]:
    """(the built wheel, the venv it is installed in)."""
    root = tmp_path_factory.mktemp("wheel")
    src = root / "src"
    for name in SOURCES:
        source = REPO / name
        if source.is_dir():
            shutil.copytree(source, src / name,
                            ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
        else:
            src.mkdir(exist_ok=True)
            shutil.copy2(source, src / name)
    built = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-index",
                            "--no-build-isolation", ".", "-w", str(root / "dist")],
                           cwd=src, env=_clean_env(), capture_output=True, text=True, timeout=300)
    assert built.returncode == 0, built.stdout[-2000:] + built.stderr[-2000:]
    wheel = next((root / "dist").glob("sweep-*.whl"))

    venv = root / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True,
                   timeout=120)
    python = venv / "bin" / "python"
    purelib = Path(subprocess.run([str(python), "-c", "import sysconfig; "
                                   "print(sysconfig.get_paths()['purelib'])"],
                                  capture_output=True, text=True, check=True).stdout.strip())
    (purelib / "system-site.pth").write_text("\n".join(site.getsitepackages()) + "\n")
    installed = subprocess.run([str(python), "-m", "pip", "install", "--no-deps", "--no-index",
                                str(wheel)], cwd=root, env=_clean_env(), capture_output=True,
                               text=True, timeout=300)
    assert installed.returncode == 0, installed.stdout[-2000:] + installed.stderr[-2000:]
    return wheel, venv


@pytest.mark.slow
def test_wheel_holds_every_module_and_every_shipped_study(wheel_env):
    wheel, _ = wheel_env
    names = set(zipfile.ZipFile(wheel).namelist())
    modules = {p.relative_to(REPO).as_posix() for p in (REPO / "sweep").rglob("*.py")}
    studies = {f"sweep/studies/{p.name}" for p in (REPO / "studies").glob("*.yaml")}
    assert studies, "no shipped studies found in the checkout"
    assert not modules - names, f"modules missing from the wheel: {sorted(modules - names)}"
    assert not studies - names, f"studies missing from the wheel: {sorted(studies - names)}"


@pytest.mark.slow
def test_installed_wheel_validates_and_launches_shipped_studies(wheel_env, shared_cifar,
                                                                tmp_path):
    _, venv = wheel_env
    env = _clean_env()
    where = subprocess.run(
        [str(venv / "bin" / "python"), "-c",
         "import sys, sweep.cli; from sweep.study.spec import STUDIES_DIR; "
         "print(sweep.__file__); print(STUDIES_DIR); "
         "print(any('editable' in type(f).__module__ + repr(f) for f in sys.meta_path))"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert where.returncode == 0, where.stderr[-2000:]
    module_file, studies_dir, editable_hook = where.stdout.split("\n")[:3]
    assert Path(module_file).is_relative_to(venv), module_file
    assert Path(studies_dir).is_relative_to(venv), studies_dir
    assert editable_hook == "False", "the checkout's editable finder is active in the venv"

    sweep = str(venv / "bin" / "sweep")
    shipped = sorted(p.stem for p in (REPO / "studies").glob("*.yaml"))
    valid = subprocess.run([sweep, "validate", *shipped], cwd=tmp_path, env=env,
                           capture_output=True, text=True, timeout=120)
    assert valid.returncode == 0, valid.stdout + valid.stderr
    for name in shipped:
        assert f"(study {name!r}," in valid.stdout
        assert str(venv) in valid.stdout  # found inside the installed package

    listed = subprocess.run([sweep, "list", "--storage", f"sqlite:///{tmp_path}/none.db"],
                            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert listed.returncode == 0, listed.stderr
    assert [line.split()[0] for line in listed.stdout.splitlines()[1:1 + len(shipped)]] == shipped

    storage = f"sqlite:///{tmp_path}/optuna.db"
    launched = subprocess.run(
        [sweep, "launch", "--study", "smoke", "--trials", "2", "--data-dir", str(shared_cifar),
         "--storage", storage, "--tracking-uri", f"sqlite:///{tmp_path}/mlflow.db",
         "--device", "cpu", "--quiet"],
        cwd=tmp_path, env=dict(env, OMP_NUM_THREADS="1"), capture_output=True, text=True,
        timeout=600)
    assert launched.returncode == 0, launched.stdout[-3000:] + launched.stderr[-3000:]
    study = optuna.load_study(study_name="smoke", storage=storage)
    states = [t.state for t in study.get_trials(deepcopy=False)]
    # The smoke study's median pruner starts after 2 trials: both must complete.
    assert states == [TrialState.COMPLETE, TrialState.COMPLETE], states
