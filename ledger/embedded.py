"""The embedded default: a private PostgreSQL cluster the ledger owns under ``LEDGER_HOME``.

With no ``LEDGER_DATABASE_URL`` the CLI initializes a cluster with the server binaries
found on the machine (``pg_config --bindir``, ``PATH``, ``/usr/lib/postgresql/*/bin``),
starts it on a free loopback port, and migrates it. ``initdb`` and ``postgres`` refuse
to run as root, so as root the cluster is owned by and run as the ``postgres`` system
user, and the directories above ``LEDGER_HOME`` are made traversable for it.
"""

from __future__ import annotations

import os
import pwd
import shutil
import socket
import subprocess
from dataclasses import dataclass
from pathlib import Path

from ledger.errors import EmbeddedPostgresError, ServerBinariesMissing

__all__ = ["EmbeddedPostgres", "find_bindir"]

_RUN_AS = "postgres"
_USER = "ledger"
_DBNAME = "ledger"


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
    def url(self) -> str:
        """Return the plain URL of the ledger database in this cluster."""
        return f"postgresql://{_USER}@127.0.0.1:{self.port}/{_DBNAME}"

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
                "--auth=trust",
                "-E",
                "UTF8",
                "--locale=C.UTF-8",
            ]
        )
        port = _free_port()
        with (self.datadir / "postgresql.conf").open("a") as conf:
            conf.write(
                "\n# position-ledger embedded cluster\n"
                "listen_addresses = '127.0.0.1'\n"
                f"port = {port}\n"
                "unix_socket_directories = ''\n"
                "idle_in_transaction_session_timeout = '5min'\n"
            )
        self.port_file.write_text(f"{port}\n")
        self._hand_over()
        return True

    def running(self) -> bool:
        """Return whether the cluster's server is running."""
        if not self.initialized:
            return False
        result = self._run(
            [str(find_bindir() / "pg_ctl"), "status", "-D", str(self.datadir)], check=False
        )
        return result.returncode == 0

    def start(self) -> bool:
        """Start the server if it is not running; return whether it was started."""
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

    def _ensure_database(self) -> None:
        psql = find_bindir() / "psql"
        base = ["-h", "127.0.0.1", "-p", str(self.port), "-U", _USER, "-d", "postgres", "-tAc"]
        if psql.is_file():
            found = self._run(
                [str(psql), *base, f"SELECT 1 FROM pg_database WHERE datname = '{_DBNAME}'"]
            ).stdout.strip()
            if found != "1":
                self._run([str(psql), *base, f'CREATE DATABASE "{_DBNAME}"'])
        else:
            createdb = find_bindir() / "createdb"
            self._run(
                [str(createdb), "-h", "127.0.0.1", "-p", str(self.port), "-U", _USER, _DBNAME],
                check=False,
            )
