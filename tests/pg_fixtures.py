"""A throwaway PostgreSQL server for the tests that need one, and a fresh database per test.

    from pg_fixtures import pg_server, pg_url  # noqa: F401  (pytest finds fixtures in the test module)

    def test_x(pg_url):                        # postgresql://postgres@/t_3?host=/tmp/loradem-pg-…
        optuna.create_study(storage=pg_url)

`pg_server` (once per session) runs initdb on a cluster in a new folder under /tmp and starts
it listening on a unix socket in that folder only (no TCP port, nothing shared with a system
cluster); it is stopped and the folder deleted at the end of the session. As root the
cluster belongs to the `postgres` user (initdb refuses to run as root). The server binaries
come from /usr/lib/postgresql/*/bin or PATH; `tests/postgres.sh` installs them (root, apt-get).

Where there are none, or the server does not start, the tests skip, naming why — unless
LORADEM_REQUIRE_POSTGRES=1 (set by .ci/run), which turns the skip into a failure so CI cannot
pass without having run them.
"""

from __future__ import annotations

import glob
import itertools
import os
import pwd
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

REQUIRED = os.environ.get("LORADEM_REQUIRE_POSTGRES") == "1"
_counter = itertools.count()


def unavailable(reason: str):
    """Skip (or, when PostgreSQL is required, fail) with the reason."""
    if REQUIRED:
        pytest.fail(f"PostgreSQL required (LORADEM_REQUIRE_POSTGRES=1) but {reason}", pytrace=False)
    pytest.skip(f"PostgreSQL: {reason} (install it with `sh tests/postgres.sh` as root)")


def server_bindir() -> Path | None:
    """The newest /usr/lib/postgresql/<version>/bin with initdb (Debian's layout), else the folder of initdb on PATH."""
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(Path(p).parts[-3]) if Path(p).parts[-3].isdigit() else 0)
    if found:
        return Path(found[-1]).parent
    initdb = shutil.which("initdb")
    return Path(initdb).resolve().parent if initdb else None


def _as_owner(cmd: list[str], owner: str | None) -> list[str]:
    return ["runuser", "-u", owner, "--", *cmd] if owner else cmd


def _run(cmd: list[str], what: str) -> str | None:
    """Run a setup command; None when it worked, else the reason it did not (its last output line)."""
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode == 0:
        return None
    out = (proc.stderr or proc.stdout).strip().splitlines()
    return f"{what} failed: {out[-1] if out else f'exit status {proc.returncode}'}"


@pytest.fixture(scope="session")
def pg_server():
    """(socket folder, user) of a running throwaway server."""
    bindir = server_bindir()
    if bindir is None:
        unavailable("no server binaries (initdb) found")
    try:
        import psycopg  # noqa: F401 - the driver of postgresql:// URLs in SQLAlchemy 2.1
    except ImportError:
        unavailable("the psycopg driver is not installed (pip install -e '.[test]')")
    owner = None
    if os.geteuid() == 0:
        owner = "postgres"
        try:
            pw = pwd.getpwnam(owner)
        except KeyError:
            unavailable("running as root and there is no `postgres` user to own the cluster")
    root = Path(tempfile.mkdtemp(prefix="loradem-pg-"))  # under /tmp: the postgres user can reach it
    data, log = root / "data", root / "server.log"
    if owner:
        os.chown(root, pw.pw_uid, pw.pw_gid)
    user = owner or pwd.getpwuid(os.geteuid()).pw_name
    started = False
    try:
        problem = _run(_as_owner([str(bindir / "initdb"), "-D", str(data), "-U", user, "-A", "trust", "-E", "UTF8",
                                  "--locale=C", "--no-sync"], owner), "initdb")
        if problem is None:
            options = f"-k {root} -c listen_addresses='' -c fsync=off -c synchronous_commit=off -c full_page_writes=off"
            problem = _run(_as_owner([str(bindir / "pg_ctl"), "-D", str(data), "-l", str(log), "-o", options,
                                      "-w", "-t", "120", "start"], owner), "pg_ctl start")
            started = problem is None
        if problem:
            tail = log.read_text(errors="replace").strip().splitlines()[-1:] if log.exists() else []
            unavailable(problem + (f" ({tail[0]})" if tail else ""))
        yield root, user
    finally:
        if started:
            _run(_as_owner([str(bindir / "pg_ctl"), "-D", str(data), "-m", "immediate", "-w", "stop"], owner), "pg_ctl stop")
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def pg_url(pg_server) -> str:
    """The SQLAlchemy URL of a new, empty database on the throwaway server."""
    import sqlalchemy

    socket_dir, user = pg_server
    name = f"t_{os.getpid()}_{next(_counter)}"
    admin = sqlalchemy.create_engine(f"postgresql://{user}@/postgres?host={socket_dir}", isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.exec_driver_sql(f'CREATE DATABASE "{name}"')
    admin.dispose()
    return f"postgresql://{user}@/{name}?host={socket_dir}"
