"""Shared fixtures: tiny CIFAR-format folders written by the tests, and the real subset."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parent.parent
if os.environ.get("SWEEP_DATA_DIR"):
    # Relative to where pytest was run (the README runs it with ../shared/...), as the CLI reads
    # it; made absolute once here, so sweep processes the tests start in other folders agree.
    os.environ["SWEEP_DATA_DIR"] = str(Path(os.environ["SWEEP_DATA_DIR"]).resolve())
SHARED_DATA = Path(os.environ.get("SWEEP_DATA_DIR", REPO.parent / "shared/data/cifar10-subset"))


def write_cifar(root: Path, per_batch: int = 40, test: int = 40, seed: int = 0) -> Path:
    """Write a CIFAR-10 folder in the official pickle format with ``per_batch`` records per
    training batch. Images are class-dependent noise, so a model can learn something."""
    rng = np.random.default_rng(seed)
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True, exist_ok=True)

    def batch(n: int) -> dict:
        labels = rng.integers(0, 10, n)
        base = (labels[:, None] * 23 % 256).astype(np.int16)
        data = np.clip(base + rng.integers(-40, 40, (n, 3072)), 0, 255).astype(np.uint8)
        return {"data": data, "labels": labels.tolist(), "batch_label": "synthetic"}

    for i in range(1, 6):
        with open(folder / f"data_batch_{i}", "wb") as f:
            pickle.dump(batch(per_batch), f)
    with open(folder / "test_batch", "wb") as f:
        pickle.dump(batch(test), f)
    return root


@pytest.fixture(scope="session")
def tiny_cifar(tmp_path_factory) -> Path:
    """A folder holding cifar-10-batches-py/ with 5 x 40 training and 40 test images."""
    return write_cifar(tmp_path_factory.mktemp("cifar"))


@pytest.fixture(scope="session")
def shared_cifar() -> Path:
    if not (SHARED_DATA / "cifar-10-batches-py" / "test_batch").is_file():
        pytest.skip(f"the shared CIFAR-10 subset is not at {SHARED_DATA} (set SWEEP_DATA_DIR)")
    return SHARED_DATA


@pytest.fixture
def in_tmp(tmp_path, monkeypatch) -> Path:
    """Run in an empty folder so the default ./sweep.db and ./mlflow.db land there."""
    monkeypatch.chdir(tmp_path)
    return tmp_path


PG_PASSWORD = "pw-Zq81-secret"  # a known password the secrets tests grep every output for


@pytest.fixture(scope="session")
def postgres_server():
    """A real PostgreSQL 15 on 127.0.0.1 (scripts/start_postgres.sh): (optuna URL, mlflow URL).

    Role ``sweep`` with password ``PG_PASSWORD`` owns databases ``optuna`` and ``mlflow``."""
    import shutil
    import socket
    import subprocess

    if not shutil.which("pg_ctlcluster") and not list(Path("/usr/lib/postgresql").glob("*/bin/initdb")):
        pytest.skip("PostgreSQL server binaries are absent (apt-get install postgresql)")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    script = REPO / "scripts" / "start_postgres.sh"
    out = subprocess.run(["bash", str(script), "start", str(port), PG_PASSWORD],
                         capture_output=True, text=True, timeout=120, check=True).stdout.split()
    folder, optuna_url, mlflow_url = out[-3:]
    yield optuna_url, mlflow_url
    subprocess.run(["bash", str(script), "stop", folder], capture_output=True, timeout=60)


@pytest.fixture(scope="session")
def slurm():
    """The SLURM_CONF of a fresh single-node cluster; stopped after the session. It declares 3
    CPUs (on 2 real cores) so that all three array tasks start at once, as on a real cluster."""
    import shutil
    import subprocess

    missing = [b for b in ("munged", "slurmctld", "slurmd", "sbatch")
               if not shutil.which(b) and not os.path.exists(f"/usr/sbin/{b}")]
    if missing:
        pytest.skip(f"SLURM/munge binaries absent ({', '.join(missing)}): "
                    f"apt-get install slurm-wlm munge")
    if os.geteuid() != 0:
        pytest.skip("the test SLURM cluster runs its daemons as root")
    done = subprocess.run([str(REPO / "scripts" / "start_test_cluster.sh"), "start", "3"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    folder, conf = done.stdout.split()
    yield conf.split("=", 1)[1]
    subprocess.run([str(REPO / "scripts" / "start_test_cluster.sh"), "stop", folder], timeout=60)
