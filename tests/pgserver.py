"""A throwaway PostgreSQL server for the tests: Debian's binaries, a fresh cluster in a temporary folder,
listening on a Unix socket only (no TCP port at all), stopped at the end."""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import subprocess
from pathlib import Path


def pg_bin() -> Path | None:
    """The folder of initdb / pg_ctl (Debian puts them under /usr/lib/postgresql/<major>/bin), or None."""
    found = shutil.which("initdb")
    if found:
        return Path(found).parent
    candidates = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(p.split("/")[4]))
    return Path(candidates[-1]).parent if candidates else None


class PostgresServer:
    """``start()`` then ``url`` (SQLAlchemy, psycopg 3 over the socket), ``stop()``. As root, the server runs as
    the ``postgres`` user that Debian's package creates (PostgreSQL refuses to run as root)."""

    def __init__(self, folder: Path):
        self.bin = pg_bin()
        if self.bin is None:
            raise FileNotFoundError("PostgreSQL's initdb not found (apt-get install postgresql)")
        self.folder = folder
        self.data, self.socket = folder / "data", folder / "socket"
        self.user = "postgres" if os.geteuid() == 0 else pwd.getpwuid(os.geteuid()).pw_name

    def _run(self, *args: str) -> None:
        cmd = list(args)
        if os.geteuid() == 0:
            cmd = ["runuser", "-u", "postgres", "--", *cmd]
        subprocess.run(cmd, check=True, capture_output=True, text=True)

    def start(self) -> "PostgresServer":
        self.folder.mkdir(parents=True, exist_ok=True)
        self.socket.mkdir(exist_ok=True)
        if os.geteuid() == 0:
            shutil.chown(self.folder, "postgres")
            shutil.chown(self.socket, "postgres")
        self._run(str(self.bin / "initdb"), "-D", str(self.data), "-U", self.user, "--auth=trust", "-E", "UTF8")
        self._run(str(self.bin / "pg_ctl"), "-D", str(self.data), "-l", str(self.folder / "server.log"), "-w",
                  "-o", f"-c listen_addresses='' -k {self.socket}", "start")
        return self

    @property
    def url(self) -> str:
        return f"postgresql+psycopg://{self.user}@/postgres?host={self.socket}"

    def create_database(self, name: str) -> str:
        """A new empty database; its URL."""
        import sqlalchemy

        engine = sqlalchemy.create_engine(self.url, isolation_level="AUTOCOMMIT")
        with engine.connect() as conn:
            conn.execute(sqlalchemy.text(f'CREATE DATABASE "{name}"'))
        engine.dispose()
        return f"postgresql+psycopg://{self.user}@/{name}?host={self.socket}"

    def stop(self) -> None:
        self._run(str(self.bin / "pg_ctl"), "-D", str(self.data), "-m", "immediate", "-w", "stop")
