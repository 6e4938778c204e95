"""The embedded default: a private PostgreSQL cluster the ledger owns under ``LEDGER_HOME``.

With no ``LEDGER_DATABASE_URL`` the CLI initializes a cluster with the server binaries
found on the machine (``pg_config --bindir``, ``PATH``, ``/usr/lib/postgresql/*/bin``),
starts it, and migrates it. ``initdb`` and ``postgres`` refuse to run as root, so as
root the cluster is owned by and run as the ``postgres`` system user, and the
directories above ``LEDGER_HOME`` are made traversable for it.

Only its owner can reach it: the server listens on no TCP port at all, only on a Unix
socket in ``LEDGER_HOME/run``, a directory only the cluster's system user can enter
(mode 0700; root passes any permission). Another local user cannot even reach the
socket, so the trust authentication behind it is the owner's alone. A cluster made by
an older version (trust on 127.0.0.1, open to every local user) is closed the same way
the next time a command starts it.

Day-to-day commands connect as ``ledger_app`` (:attr:`EmbeddedPostgres.url`): SELECT
and INSERT on the log, the DML the projections need, no DDL, no triggers to switch off.
Migrations run as the cluster's owner ``ledger`` (:attr:`EmbeddedPostgres.owner_url`).
"""

from __future__ import annotations

import hashlib
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

import asyncpg

from ledger.errors import EmbeddedPostgresError, ServerBinariesMissing

__all__ = ["EmbeddedPostgres", "find_bindir"]

_RUN_AS = "postgres"
_USER = "ledger"
_APP_USER = "ledger_app"
_DBNAME = "ledger"
_PRIVATE = "# position-ledger: private socket only"
# A Unix socket's path (sun_path) holds 107 bytes: a longer LEDGER_HOME gets its socket
# directory under the temporary directory instead.
_MAX_SOCKET_PATH = 100


def find_bindir() -> Path:
    """Return the directory holding ``initdb`` and ``pg_ctl``.

    Raises:
        ServerBinariesMissing: none of the usual places has both.
    """
    candidates: list[Path] = []
    pg_config = shutil.which("pg_config")
    if pg_config:
        try:
            out = subprocess.run(
                [pg_config, "--bindir"], capture_output=True, text=True, check=True, timeout=10
            ).stdout.strip()
            candidates.append(Path(out))
        except (OSError, subprocess.SubprocessError):
            pass
    initdb = shutil.which("initdb")
    if initdb:
        candidates.append(Path(initdb).resolve().parent)
    versions = sorted(
        Path("/usr/lib/postgresql").glob("*/bin"),
        key=lambda p: int(p.parent.name) if p.parent.name.isdigit() else 0,
        reverse=True,
    )
    candidates.extend(versions)
    for bindir in candidates:
        if (bindir / "initdb").is_file() and (bindir / "pg_ctl").is_file():
            return bindir
    looked = ", ".join(str(c) for c in candidates) or "nothing found"
    raise ServerBinariesMissing(
        "no PostgreSQL server binaries (initdb and pg_ctl) on this machine: looked at "
        f"`pg_config --bindir`, PATH and /usr/lib/postgresql/*/bin ({looked}). Install them "
        "(Debian: `apt-get install postgresql`) or set LEDGER_DATABASE_URL to a server."
    )


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@dataclass
class EmbeddedPostgres:
    """A private cluster under ``home``: data in ``home/pgdata``, log in ``home/postgres.log``."""

    home: Path

    @property
    def datadir(self) -> Path:
        return self.home / "pgdata"

    @property
    def logfile(self) -> Path:
        return self.home / "postgres.log"

    @property
    def port_file(self) -> Path:
        return self.home / "port"

    @property
    def port(self) -> int:
        return int(self.port_file.read_text().strip())

    @property
    def socket_dir(self) -> Path:
        """Return the directory of the server's socket (only the owner can enter it)."""
        inside = self.home / "run"
        if len(str(inside / f".s.PGSQL.{self.port}")) <= _MAX_SOCKET_PATH:
            return inside
        tag = hashlib.sha256(str(self.home.resolve()).encode()).hexdigest()[:16]
        return Path(tempfile.gettempdir()) / f"position-ledger-{tag}"

    def _url(self, user: str) -> str:
        # the port names the socket file (.s.PGSQL.<port>); nothing listens on TCP
        return f"postgresql://{user}@/{_DBNAME}?host={self.socket_dir}&port={self.port}"

    @property
    def url(self) -> str:
        """Return the URL day-to-day commands use: the ledger database as ``ledger_app``."""
        return self._url(_APP_USER)

    @property
    def owner_url(self) -> str:
        """Return the URL of the cluster's owner (for migrations)."""
        return self._url(_USER)

    @property
    def initialized(self) -> bool:
        return (self.datadir / "PG_VERSION").is_file() and self.port_file.is_file()

    def _as_root(self) -> bool:
        return os.geteuid() == 0

    def _run(self, args: list[str], *, check: bool = True) -> subprocess.CompletedProcess[str]:
        if self._as_root():
            args = ["runuser", "-u", _RUN_AS, "--", *args]
        env = {**os.environ, "LC_ALL": "C.UTF-8", "LANG": "C.UTF-8"}
        try:
            result = subprocess.run(
                args, capture_output=True, text=True, env=env, timeout=120, check=False
            )
        except (OSError, subprocess.SubprocessError) as exc:
            raise EmbeddedPostgresError(f"cannot run {args[0]}: {exc}") from exc
        if check and result.returncode != 0:
            raise EmbeddedPostgresError(
                f"{' '.join(args)} failed (exit {result.returncode}): "
                f"{(result.stderr or result.stdout).strip()[-2000:]}"
            )
        return result

    def _hand_over(self) -> None:
        """As root, give the cluster's directory to ``postgres`` and let it walk there."""
        if not self._as_root():
            return
        try:
            owner = pwd.getpwnam(_RUN_AS)
        except KeyError:
            raise EmbeddedPostgresError(
                f"running as root, but there is no `{_RUN_AS}` system user to run the server "
                "as (initdb refuses root): install PostgreSQL from the distribution's packages "
                "or run the ledger as an ordinary user"
            ) from None
        for path in (self.home, *self.home.parents):
            mode = path.stat().st_mode
            if not mode & 0o001:
                path.chmod(mode | 0o001)
        os.chown(self.home, owner.pw_uid, owner.pw_gid)
        for item in self.home.rglob("*"):
            os.chown(item, owner.pw_uid, owner.pw_gid)

    def init(self) -> bool:
        """Create the cluster if it does not exist; return whether it was created."""
        if self.initialized:
            return False
        bindir = find_bindir()
        self.home.mkdir(parents=True, exist_ok=True)
        if self.datadir.exists():  # a half-made cluster from an interrupted init
            shutil.rmtree(self.datadir)
        self._hand_over()
        self._run(
            [
                str(bindir / "initdb"),
                "-D",
                str(self.datadir),
                "-U",
                _USER,
                "--auth-local=trust",
                "--auth-host=reject",
                "-E",
                "UTF8",
                "--locale=C.UTF-8",
            ]
        )
        port = _free_port()
        with (self.datadir / "postgresql.conf").open("a") as conf:
            conf.write(
                "\n# position-ledger embedded cluster\n"
                f"port = {port}\n"
                "idle_in_transaction_session_timeout = '5min'\n"
            )
        self.port_file.write_text(f"{port}\n")
        self._make_private()
        self._hand_over()
        return True

    def _make_private(self) -> bool:
        """Close the cluster to every local user but its owner; return whether it changed.

        No TCP listener; the socket in a directory of mode 0700; only local (socket)
        lines in pg_hba.conf. Idempotent: a cluster already closed is left as it is.
        """
        conf = self.datadir / "postgresql.conf"
        text = conf.read_text()
        changed = False
        if _PRIVATE not in text:
            with conf.open("a") as out:  # later settings override earlier ones
                out.write(
                    f"\n{_PRIVATE}\n"
                    "listen_addresses = ''\n"
                    f"unix_socket_directories = '{self.socket_dir}'\n"
                    "unix_socket_permissions = 0700\n"
                )
            changed = True
        hba = self.datadir / "pg_hba.conf"
        wanted = f"{_PRIVATE}\nlocal all all trust\n"
        if hba.read_text() != wanted:
            hba.write_text(wanted)
            changed = True
        self._socket_dir_for_owner()
        return changed

    def _socket_dir_for_owner(self) -> None:
        """Create the socket directory, mode 0700, owned by the server's user."""
        directory = self.socket_dir
        directory.mkdir(mode=0o700, exist_ok=True)
        if directory.is_symlink() or not directory.is_dir():
            raise EmbeddedPostgresError(f"{directory} is not a directory the ledger can own")
        uid = pwd.getpwnam(_RUN_AS).pw_uid if self._as_root() else os.geteuid()
        if self._as_root():
            os.chown(directory, uid, -1)
        if directory.stat().st_uid != uid:
            raise EmbeddedPostgresError(
                f"{directory} belongs to another user: remove it (the cluster's socket "
                "goes there, and only the cluster's owner may enter it)"
            )
        directory.chmod(0o700)

    def running(self) -> bool:
        """Return whether the cluster's server is running."""
        if not self.initialized:
            return False
        result = self._run(
            [str(find_bindir() / "pg_ctl"), "status", "-D", str(self.datadir)], check=False
        )
        return result.returncode == 0

    def start(self) -> bool:
        """Start the server if it is not running; return whether it was started.

        A cluster still open to other local users (made by an older version) is closed
        first, and restarted if it runs.
        """
        if self._make_private() and self.running():
            self._hand_over()
            self._run(
                [str(find_bindir() / "pg_ctl"), "restart", "-w", "-t", "60", "-m", "fast",
                 "-D", str(self.datadir), "-l", str(self.logfile)]
            )  # fmt: skip
            return True
        if self.running():
            return False
        self._hand_over()
        self._run(
            [
                str(find_bindir() / "pg_ctl"),
                "start",
                "-w",
                "-t",
                "60",
                "-D",
                str(self.datadir),
                "-l",
                str(self.logfile),
            ]
        )
        self._ensure_database()
        return True

    def stop(self) -> bool:
        """Stop the server if it is running; return whether it was stopped."""
        if not self.running():
            return False
        self._run(
            [str(find_bindir() / "pg_ctl"), "stop", "-w", "-m", "fast", "-D", str(self.datadir)]
        )
        return True

    async def allow_app_login(self) -> None:
        """Let ``ledger_app`` (created by the first migration) log in; idempotent."""
        conn = await asyncpg.connect(self.owner_url)
        try:
            can = await conn.fetchval(
                "SELECT rolcanlogin FROM pg_roles WHERE rolname = $1", _APP_USER
            )
            if can is False:
                await conn.execute(f"ALTER ROLE {_APP_USER} LOGIN")
        finally:
            await conn.close()

    def _ensure_database(self) -> None:
        psql = find_bindir() / "psql"
        base = [
            "-h",
            str(self.socket_dir),
            "-p",
            str(self.port),
            "-U",
            _USER,
            "-d",
            "postgres",
            "-tAc",
        ]
        if psql.is_file():
            found = self._run(
                [str(psql), *base, f"SELECT 1 FROM pg_database WHERE datname = '{_DBNAME}'"]
            ).stdout.strip()
            if found != "1":
                self._run([str(psql), *base, f'CREATE DATABASE "{_DBNAME}"'])
        else:
            createdb = find_bindir() / "createdb"
            self._run(
                [str(createdb), "-h", str(self.socket_dir), "-p", str(self.port), "-U", _USER,
                 _DBNAME],
                check=False,
            )  # fmt: skip
