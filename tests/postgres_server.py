"""A throwaway PostgreSQL server for the tests of `tunelab tune --storage postgresql://...`: a fresh cluster in a
temporary folder (trust auth, no password), on a free loopback port, with its unix socket in that folder.

PostgreSQL refuses to run as root, and CI runs as root: then the server's commands run as an unprivileged user
(`postgres` where Debian's package made one, else `nobody`), who owns the folder. subprocess's `user=`/`group=`
switch to it, so no runuser or sudo is needed. fsync is off: the data is thrown away, and start-up stays at a
second or two."""

from __future__ import annotations

import os
import pwd
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from studio import free_port

INSTALL_HINT = "PostgreSQL is not installed: apt-get install postgresql"
DEBIAN_BIN_DIRS = Path("/usr/lib/postgresql")  # Debian keeps initdb and pg_ctl off PATH: <version>/bin
START_TIMEOUT = 30  # seconds pg_ctl waits for the server to accept connections
USER = "tunelab"  # the cluster's superuser, and the database the URL names
PORT_TRIES = 3  # another free port when the one probed was taken before the server bound it


def find_postgres_bin() -> Path | None:
    """The folder holding initdb, pg_ctl and postgres: from PATH (links resolved), else Debian's newest version."""
    on_path = shutil.which("initdb")
    candidates = [Path(on_path).resolve().parent] if on_path else []
    versions = sorted(DEBIAN_BIN_DIRS.glob("*/bin"), key=lambda folder: _version_key(folder.parent.name), reverse=True)
    for folder in candidates + versions:
        if all((folder / name).is_file() for name in ("initdb", "pg_ctl", "postgres")):
            return folder
    return None


def _version_key(name: str) -> tuple[int, ...]:
    """The sort key of a version folder's name: 15 -> (15,), 9.6 -> (9, 6), anything else first."""
    try:
        return tuple(int(part) for part in name.split("."))
    except ValueError:
        return ()


def server_account() -> pwd.struct_passwd | None:
    """Who runs the server's commands: None (ourselves) unless we are root, whom PostgreSQL refuses."""
    if os.geteuid() != 0:
        return None
    for name in ("postgres", "nobody"):
        try:
            return pwd.getpwnam(name)
        except KeyError:
            continue
    raise RuntimeError("running as root, and neither a 'postgres' nor a 'nobody' user exists to run PostgreSQL as")


def _run(command: list[str], account: pwd.struct_passwd | None, cwd: Path, timeout: float, check: bool = True) -> None:
    """Run one of the server's commands (as `account` when given); unless `check` is off, a failure raises with
    its output."""
    as_user = {"user": account.pw_uid, "group": account.pw_gid, "extra_groups": []} if account else {}
    env = {key: value for key, value in os.environ.items() if not key.startswith("PG")}  # no stray PGHOST etc.
    result = subprocess.run(command, cwd=cwd, env={**env, "LC_ALL": "C"}, capture_output=True, text=True,
                            timeout=timeout, **as_user)
    if check and result.returncode != 0:
        who = f" as user {account.pw_name}" if account else ""
        raise RuntimeError(f"{' '.join(command)}{who} failed ({result.returncode}):\n{result.stdout}{result.stderr}")


def _log_tail(log: Path, lines: int = 20) -> str:
    """The end of the server's log, for a failure message."""
    return "\n".join(log.read_text(errors="replace").splitlines()[-lines:]) if log.is_file() else "(no log)"


@contextmanager
def running_postgres(bin_dir: Path) -> Iterator[str]:
    """Start a fresh PostgreSQL cluster, yield a SQLAlchemy URL to its empty database, then stop it and delete it."""
    account = server_account()
    folder = Path(tempfile.mkdtemp(prefix="tunelab-pg-"))  # short: a unix socket path is limited to 107 bytes
    data, log = folder / "data", folder / "server.log"
    if account:
        os.chown(folder, account.pw_uid, account.pw_gid)
    try:
        _run([str(bin_dir / "initdb"), "-D", str(data), "-U", USER, "--auth=trust", "--encoding=UTF8",
              "--no-locale", "--no-sync"], account, folder, timeout=120)
        for attempt in range(PORT_TRIES):
            port = free_port()
            log.unlink(missing_ok=True)
            options = f"-h 127.0.0.1 -p {port} -k '{folder}' -F -c full_page_writes=off -c synchronous_commit=off"
            try:
                _run([str(bin_dir / "pg_ctl"), "start", "-D", str(data), "-l", str(log), "-o", options, "-w",
                      "-t", str(START_TIMEOUT)], account, folder, timeout=START_TIMEOUT + 10)
                break
            except (RuntimeError, subprocess.TimeoutExpired) as error:
                taken = "could not bind" in _log_tail(log) or "already in use" in _log_tail(log)
                if not taken or attempt == PORT_TRIES - 1:
                    raise RuntimeError(f"could not start PostgreSQL on 127.0.0.1:{port} (pg_ctl waited up to "
                                       f"{START_TIMEOUT} s): {error}\nserver log:\n{_log_tail(log)}") from error
        _run([str(bin_dir / "createdb"), "-h", "127.0.0.1", "-p", str(port), "-U", USER, USER], None, folder,
             timeout=30)
        yield f"postgresql+psycopg://{USER}@127.0.0.1:{port}/{USER}"
    finally:
        if (data / "postmaster.pid").exists():  # also after a start that failed or timed out half-way
            _run([str(bin_dir / "pg_ctl"), "stop", "-D", str(data), "-m", "fast", "-w"], account, folder, timeout=60,
                 check=False)
        shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture(scope="session")
def postgres_url() -> Iterator[str]:
    """A SQLAlchemy URL (postgresql+psycopg://, psycopg 3) to an empty database on a PostgreSQL server of the
    session's own. Skipped where PostgreSQL is not installed, except under CI (.ci/run installs it): there it fails."""
    bin_dir = find_postgres_bin()
    if bin_dir is None:
        if os.environ.get("CI"):
            pytest.fail(INSTALL_HINT)
        pytest.skip(INSTALL_HINT)
    with running_postgres(bin_dir) as url:
        yield url
