"""``sweep ui``, ``sweep dashboard`` and ``sweep list``: look at studies that already ran.

Both servers bind 127.0.0.1 unless ``--host`` asks for another interface, and neither creates a
store: they refuse a missing SQLite file instead of serving a fresh empty one.

* ``sweep ui`` runs ``mlflow server`` for the tracking store in a child process (one worker;
  MLflow's GenAI job runner is switched off since it starts a dozen processes this UI does not
  need) and prints the URL of the study's experiment in the classic runs view
  (``?workflowType=machine_learning``; MLflow 3 otherwise opens the GenAI trace overview).
* ``sweep dashboard`` serves optuna-dashboard (``pip install -e '.[dashboard]'`` in the checkout) in-process.
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from typing import Callable

from sweep.errors import StorageError, SweepError, TrackingError
from sweep.stores import open_existing_storage
from sweep.record import open_existing_tracker
from sweep.base.urls import mask_url, sqlite_path

LOCALHOST = "127.0.0.1"
START_TIMEOUT_S = 180  # mlflow server imports a lot; on a loaded 2-core machine it takes ~20 s


def experiment_url(base: str, experiment_id: str) -> str:
    """The MLflow 3 UI page listing an experiment's runs (parent and nested trial runs)."""
    return f"{base}/#/experiments/{experiment_id}/runs?workflowType=machine_learning"


def check_port(host: str, port: int) -> int:
    """``port`` if it can be bound on ``host`` (0: pick a free one). Raises SweepError."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        try:
            s.bind((host, port))
        except OSError as err:
            raise SweepError(f"cannot listen on {host}:{port} ({err.strerror}); "
                             f"pass another --port") from None
        return s.getsockname()[1]


def _public_note(host: str) -> str | None:
    try:
        if ipaddress.ip_address(host).is_loopback:
            return None
    except ValueError:
        if host == "localhost":
            return None
    return f"note: listening on {host}, reachable from other machines; there is no login"


def _url_host(host: str) -> str:
    if host in ("0.0.0.0", "::"):
        return LOCALHOST
    return f"[{host}]" if ":" in host else host


def resolve_experiments(tracking_uri: str, study: str | None) -> list[tuple[str, str]]:
    """(name, experiment id) of the study, or of every non-empty experiment when no study is
    named. Raises TrackingError for a missing store or an unknown study."""
    tracker = open_existing_tracker(tracking_uri)
    if study is not None:
        found = tracker.client.get_experiment_by_name(study)
        if found is None:
            names = [e.name for e in tracker.client.search_experiments() if e.name != "Default"]
            raise TrackingError(f"no MLflow experiment {study!r} in {mask_url(tracking_uri)}; "
                                f"experiments there: {', '.join(names) or 'none'}")
        return [(found.name, found.experiment_id)]
    return [(e.name, e.experiment_id) for e in tracker.client.search_experiments()
            if e.name != "Default"]


def serve_mlflow(tracking_uri: str, host: str = LOCALHOST, port: int = 5000,
                 study: str | None = None, echo: Callable[[str], None] = print) -> int:
    """Run the MLflow UI for ``tracking_uri`` until interrupted; returns the exit status."""
    if tracking_uri.startswith(("http://", "https://")):
        raise TrackingError(f"tracking URI {mask_url(tracking_uri)} is already an MLflow server: "
                            f"open it in a browser")
    experiments = resolve_experiments(tracking_uri, study)
    previous = signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))  # stops the server below
    try:
        with mlflow_server(tracking_uri, host, port) as (proc, base):
            echo(f"MLflow UI for {mask_url(tracking_uri)} at {base}/ (Ctrl-C stops it)")
            for name, exp_id in experiments:
                echo(f"experiment {name}: {experiment_url(base, exp_id)}")
            if not experiments:
                echo("no experiment yet: run `sweep launch` first")
            note = _public_note(host)
            if note:
                echo(note)
            sys.stdout.flush()
            return 0 if proc.wait() == 0 else 1
    except KeyboardInterrupt:
        return 0
    finally:
        signal.signal(signal.SIGTERM, previous)


@contextlib.contextmanager
def mlflow_server(backend_uri: str, host: str = LOCALHOST, port: int = 0,
                  artifacts_destination: str | None = None, workers: int = 1):
    """``mlflow server`` for ``backend_uri`` in a child process: yields (process, base URL) once
    ``/health`` answers, and stops it on exit. With ``artifacts_destination`` the server stores
    artifacts there and clients upload them over HTTP (``--serve-artifacts``), as a tracking
    server shared by cluster nodes does; without, a SQLite store keeps them beside itself.
    ``workers``: the server's processes (each handles requests on one core)."""
    port = check_port(host, port)
    base = f"http://{_url_host(host)}:{port}"
    cmd = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", backend_uri,
           "--host", host, "--port", str(port), "--workers", str(workers)]
    path = sqlite_path(backend_uri)
    if artifacts_destination is not None:
        cmd += ["--serve-artifacts", "--artifacts-destination", artifacts_destination]
    elif path is not None:  # new experiments made from the UI keep artifacts beside the store
        cmd += ["--default-artifact-root", (path.resolve().parent / "mlartifacts").as_uri()]
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    log = tempfile.TemporaryFile(mode="w+")  # the server's log, quoted if it fails to start
    proc = subprocess.Popen(cmd, env=env, stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                            text=True)
    try:
        _wait_ready(proc, log, f"{base}/health", "mlflow server")
        yield proc, base
    finally:
        _stop(proc)
        log.close()


def _wait_ready(proc: subprocess.Popen, log, url: str, what: str) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            log.seek(0)
            lines = [ln for ln in log.read().splitlines() if ln.strip()]
            raise SweepError(f"{what} exited with status {proc.returncode}: "
                             f"{mask_url(lines[-1] if lines else 'no message')[:300]}")
        try:
            with urllib.request.urlopen(url, timeout=2) as resp:
                if resp.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.5)
    raise SweepError(f"{what} did not answer at {url} within {START_TIMEOUT_S} s")


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.terminate()  # mlflow server forwards SIGTERM to its uvicorn worker
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def serve_dashboard(storage_url: str, host: str = LOCALHOST, port: int = 8080,
                    study: str | None = None, echo: Callable[[str], None] = print) -> int:
    """Run optuna-dashboard on the Optuna storage until interrupted."""
    try:
        from optuna_dashboard import wsgi
    except ImportError:
        raise SweepError("optuna-dashboard is not installed; install it with: pip install -e "
                         "'.[dashboard]' in the sweep checkout (or pip install optuna-dashboard)") from None
    from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

    storage = open_existing_storage(storage_url)
    path = ""
    if study is not None:
        try:
            path = f"studies/{storage.get_study_id_from_name(study)}"
        except KeyError:
            raise StorageError(f"no study {study!r} in storage {mask_url(storage_url)} "
                               f"(see `sweep list`)") from None
    check_port(host, port)

    class Quiet(WSGIRequestHandler):
        def log_message(self, *args):  # one line per request would drown the URL
            pass

    server_class = WSGIServer
    if ":" in host:
        class V6(WSGIServer):
            address_family = socket.AF_INET6
        server_class = V6
    server = make_server(host, port, wsgi(storage), server_class=server_class, handler_class=Quiet)
    base = f"http://{_url_host(host)}:{server.server_port}"
    echo(f"optuna-dashboard for {mask_url(storage_url)} at {base}/dashboard/{path} (Ctrl-C stops it)")
    note = _public_note(host)
    if note:
        echo(note)
    sys.stdout.flush()
    # Ctrl-C or SIGTERM stop the loop from another thread: an exception raised by the signal
    # handler could land inside a request, where wsgiref's catch-all would swallow it.
    def stop(*_):
        threading.Thread(target=server.shutdown, daemon=True).start()

    previous = {sig: signal.signal(sig, stop) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        server.serve_forever()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        server.server_close()
    return 0


def list_data(storage_url: str) -> dict:
    """The stable keys of ``sweep list --json`` (docs/scripting.md): the study files in
    ``studies/`` and the studies in the storage (``None`` when its SQLite file does not exist
    yet). Creates no store."""
    import optuna

    from sweep.study.spec import STUDIES_DIR, available_studies, load_study

    files = []
    for name in available_studies():
        try:
            spec = load_study(name)
            files.append({"name": name, "path": str(spec.path), "trials": spec.trials,
                          "description": " ".join(spec.description.split()), "error": None})
        except SweepError as err:
            files.append({"name": name, "path": None, "trials": None, "description": None,
                          "error": str(err)})
    out = {"studies_dir": str(STUDIES_DIR), "study_files": files,
           "storage": mask_url(storage_url), "studies": None}
    path = sqlite_path(storage_url)
    if path is not None and not path.is_file():
        return out
    storage = open_existing_storage(storage_url)
    out["studies"] = []
    for s in sorted(optuna.get_all_study_summaries(storage, include_best_trial=True),
                    key=lambda s: s.study_name):
        best = s.best_trial
        out["studies"].append({
            "name": s.study_name, "trials": s.n_trials,
            "direction": s.direction.name.lower() if s.direction is not None else None,
            "best_value": best.value if best else None,
            "best_trial": best.number if best else None})
    return out


def list_studies(storage_url: str) -> str:
    """The study files in ``studies/`` and the studies in the storage (trials, best value)."""
    data = list_data(storage_url)
    lines = [f"study files in {data['studies_dir']}:"]
    for f in data["study_files"]:
        lines.append(f"  {f['name']:<22} invalid: {f['error']}" if f["error"] else
                     f"  {f['name']:<22} {f['trials']:>4} trials  {f['description'][:80]}")
    where = data["storage"]
    if data["studies"] is None:
        lines.append(f"storage {where}: no such file yet (no study launched here)")
        return "\n".join(lines)
    lines.append(f"studies in {where}:" if data["studies"] else f"studies in {where}: none")
    for s in data["studies"]:
        lines.append(f"  {s['name']:<22} {s['trials']:>4} trials  best "
                     + (f"{s['best_value']:.4g} (trial #{s['best_trial']}, {s['direction'] or '?'})"
                        if s["best_trial"] is not None else "-"))
    return "\n".join(lines)
