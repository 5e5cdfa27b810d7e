"""Shared fixtures: tiny CIFAR-format folders written by the tests, the real subset, and the
real daemons (PostgreSQL, SLURM) the tests start. Plain helpers are in helpers.py."""

from __future__ import annotations

import itertools
import os
from pathlib import Path

import pytest

from helpers import PG_PASSWORD, REPO, free_port, write_cifar
if os.environ.get("SWEEP_DATA_DIR"):
    # Relative to where pytest was run (the README runs it with ../shared/...), as the CLI reads
    # it; made absolute once here, so sweep processes the tests start in other folders agree.
    os.environ["SWEEP_DATA_DIR"] = str(Path(os.environ["SWEEP_DATA_DIR"]).resolve())
SHARED_DATA = Path(os.environ.get("SWEEP_DATA_DIR", REPO.parent / "shared/data/cifar10-subset"))


@pytest.fixture(scope="session", autouse=True)
def _own_spool_root(tmp_path_factory):
    """The spools of servers (by default in the user's ``~/.cache/sweep/spool``, keyed by the
    store) go to a folder of this session, for the tests and every sweep process they start: a
    PostgreSQL database or server port reused by another run must not meet its spool."""
    os.environ["SWEEP_SPOOL_DIR"] = str(tmp_path_factory.mktemp("spool-root"))


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


@pytest.fixture
def postgres_server(_postgres_cluster):
    """(optuna URL, mlflow URL): two fresh databases on the session's real PostgreSQL, owned by
    role ``sweep`` (password ``helpers.PG_PASSWORD``). Fresh for every test: tests that use the
    same study name must not see each other's trials."""
    import subprocess

    folder, optuna_url, mlflow_url = _postgres_cluster
    n = next(_DATABASE_NUMBERS)
    port = optuna_url.rsplit(":", 1)[1].split("/")[0]
    urls = []
    for url in (optuna_url, mlflow_url):
        name = f"{url.rsplit('/', 1)[1]}_{n}"
        subprocess.run(["bash", str(REPO / "scripts" / "start_postgres.sh"), "createdb", folder,
                        port, name], capture_output=True, text=True, timeout=60, check=True)
        urls.append(f"{url.rsplit('/', 1)[0]}/{name}")
    return tuple(urls)


_DATABASE_NUMBERS = itertools.count()


@pytest.fixture(scope="session")
def _postgres_cluster():
    """A real PostgreSQL 15 on 127.0.0.1 (scripts/start_postgres.sh): (folder, optuna URL,
    mlflow URL); stopped after the session."""
    import shutil
    import subprocess

    if not shutil.which("pg_ctlcluster") and not list(Path("/usr/lib/postgresql").glob("*/bin/initdb")):
        pytest.skip("PostgreSQL server binaries are absent (apt-get install postgresql)")
    if os.geteuid() != 0:
        pytest.skip("the test PostgreSQL is started as the postgres user, which needs root")
    try:
        import psycopg  # noqa: F401  (SQLAlchemy 2.1's driver for postgresql://)
    except ImportError:
        pytest.skip("no PostgreSQL driver: pip install -e '.[postgres]'")
    script = REPO / "scripts" / "start_postgres.sh"
    out = subprocess.run(["bash", str(script), "start", str(free_port()), PG_PASSWORD],
                         capture_output=True, text=True, timeout=120, check=True).stdout.split()
    folder, optuna_url, mlflow_url = out[-3:]
    yield folder, optuna_url, mlflow_url
    subprocess.run(["bash", str(script), "stop", folder], capture_output=True, timeout=60)


@pytest.fixture(scope="session")
def slurm():
    """The SLURM_CONF of a fresh single-node cluster; stopped after the session. It declares 3
    CPUs (on 2 real cores) so that all three array tasks start at once, as on a real cluster,
    RealMemory=2000 (MB) and the node feature ``sweeptest``."""
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


@pytest.fixture
def float64():
    """Torch's default dtype float64 for one test: sweep's training code follows it (models,
    batches, optimizer state, losses), so equivalence tests compare runs where summation
    order costs ~1e-16, not a bound read off one machine (tests/test_fused.py)."""
    import torch

    before = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(before)
