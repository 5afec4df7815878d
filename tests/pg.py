"""A throwaway PostgreSQL server for the tests: a real ``postgres`` on a unix socket in a temp folder.

- The server binaries (``initdb``, ``pg_ctl``, ``postgres``) are found in ``$NICD_PG_BIN``, on ``PATH``, or in
  Debian's ``/usr/lib/postgresql/<version>/bin`` (newest first). Missing binaries FAIL the tests with the
  command that installs them: they must never skip silently in CI.
- initdb refuses to run as root, and the tests run as root: when we are root, the cluster is created and
  run as ``nobody`` (uid/gid 65534), in a temp folder owned by it.
- No TCP (``listen_addresses=''``), ``trust`` authentication on the socket, ``fsync=off`` and friends:
  speed over durability, the cluster is thrown away at the end (``pg_ctl stop -m immediate``).

Fixtures: ``pg_server`` (one cluster per test session) and ``pg_url`` (a fresh, empty database per
test, as a ``postgresql+psycopg://`` SQLAlchemy URL; dropped afterwards).

Usage in a test module: ``from pg import pg_server, pg_url  # noqa: F401`` (fixtures are found by name).
"""

from __future__ import annotations

import glob
import os
import re
import shutil
import subprocess
import tempfile
import uuid
from pathlib import Path

import pytest

SUPERUSER = "nicd"
UNPRIVILEGED = 65534  # nobody / nogroup on Debian
INSTALL_HINT = ("command -v initdb >/dev/null || ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || "
                "(apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends postgresql)")
SERVER_BINARIES = ("initdb", "pg_ctl", "postgres")


def _has_all(d: str | os.PathLike) -> bool:
    return all(os.access(os.path.join(d, b), os.X_OK) for b in SERVER_BINARIES)


def find_pg_bin() -> Path | None:
    """The folder holding initdb, pg_ctl and postgres, or None."""
    env = os.environ.get("NICD_PG_BIN")
    if env:
        return Path(env) if _has_all(env) else None
    on_path = shutil.which("initdb")
    if on_path:
        d = os.path.dirname(os.path.realpath(on_path))  # /usr/local/bin/initdb may be a link into the versioned dir
        if _has_all(d):
            return Path(d)
        if _has_all(os.path.dirname(on_path)):
            return Path(os.path.dirname(on_path))

    def version(d: str) -> tuple[int, ...]:
        m = re.search(r"/postgresql/([\d.]+)/", d)
        return tuple(int(x) for x in m.group(1).split(".")) if m else (0,)

    for d in sorted(glob.glob("/usr/lib/postgresql/*/bin/"), key=version, reverse=True):
        if _has_all(d):
            return Path(d)
    return None


class PgCluster:
    def __init__(self, bindir: Path):
        self.bindir = bindir
        self.as_root = os.geteuid() == 0
        self.base = Path(tempfile.mkdtemp(prefix="nicdpg-", dir="/tmp"))  # short: a socket path has <108 bytes
        self.data = self.base / "data"
        self.sockdir = str(self.base)
        self.log = self.base / "server.log"
        self.started = False

    # -- running the server binaries as the unprivileged user ------------------------------------------
    def _run(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
        kw: dict = {}
        if self.as_root:
            kw = {"user": UNPRIVILEGED, "group": UNPRIVILEGED, "extra_groups": []}
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LC_ALL": "C", "LANG": "C", "HOME": str(self.base)}
        return subprocess.run([str(self.bindir / args[0]), *args[1:]], cwd=str(self.base), env=env, capture_output=True,
                              text=True, timeout=timeout, **kw)

    def _check(self, what: str, res: subprocess.CompletedProcess) -> None:
        if res.returncode != 0:
            tail = ""
            if self.log.exists():
                tail = "\n--- server log ---\n" + self.log.read_text(errors="replace")[-3000:]
            raise RuntimeError(f"{what} failed (exit {res.returncode}):\n{res.stdout}\n{res.stderr}{tail}")

    def start(self) -> None:
        if self.as_root:
            os.chown(self.base, UNPRIVILEGED, UNPRIVILEGED)
        os.chmod(self.base, 0o700)
        self._check("initdb", self._run("initdb", "-D", str(self.data), "-U", SUPERUSER, "--auth=trust", "-E", "UTF8",
                                        "--no-locale", "--no-sync", "--no-instructions"))
        opts = " ".join([
            "-c listen_addresses=''",
            f"-c unix_socket_directories='{self.sockdir}'",
            "-c fsync=off", "-c synchronous_commit=off", "-c full_page_writes=off",
            "-c max_connections=50", "-c shared_buffers=32MB",
        ])
        self.started = True  # from here on, stop() must run whatever happens
        self._check("pg_ctl start", self._run("pg_ctl", "-D", str(self.data), "-l", str(self.log), "-o", opts,
                                              "-w", "-t", "60", "start"))

    def stop(self) -> None:
        try:
            if self.started:
                self._run("pg_ctl", "-D", str(self.data), "-m", "immediate", "-w", "-t", "30", "stop", timeout=60)
        finally:
            shutil.rmtree(self.base, ignore_errors=True)

    # -- URLs and databases ---------------------------------------------------------------------------
    def url(self, dbname: str, driver: str = "psycopg") -> str:
        return f"postgresql+{driver}://{SUPERUSER}@/{dbname}?host={self.sockdir}"

    def _admin(self):
        import psycopg

        return psycopg.connect(host=self.sockdir, user=SUPERUSER, dbname="postgres", autocommit=True)

    def create_database(self) -> str:
        name = "t_" + uuid.uuid4().hex[:12]
        with self._admin() as con:
            con.execute(f'CREATE DATABASE "{name}"')
        return name

    def drop_database(self, name: str) -> None:
        with self._admin() as con:
            con.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(scope="session")
def pg_server():
    bindir = find_pg_bin()
    if bindir is None:
        pytest.fail(
            "PostgreSQL server binaries (initdb, pg_ctl, postgres) not found in $NICD_PG_BIN, on PATH or in "
            "/usr/lib/postgresql/*/bin. Install them (as root): " + INSTALL_HINT,
            pytrace=False,
        )
    try:
        import psycopg  # noqa: F401
    except ImportError:
        pytest.fail('the PostgreSQL driver is missing: pip install "psycopg[binary]>=3.1" (the test extra)',
                    pytrace=False)
    cluster = PgCluster(bindir)
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture
def pg_url(pg_server):
    name = pg_server.create_database()
    yield pg_server.url(name)
    pg_server.drop_database(name)
