"""A throwaway PostgreSQL server for the tests: Debian's `postgresql` package's initdb and pg_ctl,
a cluster in a temporary folder, listening on a free loopback port, trusted connections only.

PostgreSQL refuses to run as root, so as root (CI containers) the cluster belongs to `nobody`;
otherwise to the current user. `PostgresServer.find()` says why not where it cannot run.
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import uuid
from pathlib import Path


class PostgresServer:
    def __init__(self, bin_dir: Path):
        self.bin_dir = bin_dir
        self.folder = Path(tempfile.mkdtemp(prefix="clipseek-postgres-"))
        self.port = _free_port()
        self.user = "nobody" if os.geteuid() == 0 else None

    @staticmethod
    def find() -> tuple[Path | None, str]:
        """The folder of initdb and pg_ctl, or None and why PostgreSQL cannot run here."""
        found = shutil.which("initdb")
        candidates = [Path(found).resolve().parent] if found else []
        candidates += [Path(p) for p in sorted(glob.glob("/usr/lib/postgresql/*/bin"), reverse=True)]
        for folder in candidates:
            if (folder / "initdb").is_file() and (folder / "pg_ctl").is_file():
                if os.geteuid() == 0 and not shutil.which("runuser"):
                    return None, "PostgreSQL refuses to run as root, and runuser is not here to run it as nobody"
                return folder, ""
        return None, "PostgreSQL is not installed (Debian: apt-get install postgresql)"

    def _run(self, *command: str) -> None:
        prefix = ["runuser", "-u", self.user, "--"] if self.user else []
        subprocess.run([*prefix, *command], check=True, capture_output=True, cwd=self.folder, timeout=120)

    def start(self) -> PostgresServer:
        data = self.folder / "data"
        if self.user:
            entry = pwd.getpwnam(self.user)
            os.chown(self.folder, entry.pw_uid, entry.pw_gid)
        self._run(str(self.bin_dir / "initdb"), "-D", str(data), "-U", "clipseek", "--auth=trust", "-E", "UTF8")
        # fsync off: the tests' server dies with the tests; a crash test kills the client, not it.
        options = f"-p {self.port} -k {self.folder} -c listen_addresses=127.0.0.1 -c fsync=off -c max_connections=60"
        log = str(self.folder / "log")
        self._run(str(self.bin_dir / "pg_ctl"), "-D", str(data), "-o", options, "-l", log, "-w", "start")
        return self

    def stop(self) -> None:
        try:
            self._run(str(self.bin_dir / "pg_ctl"), "-D", str(self.folder / "data"), "-m", "immediate", "stop")
        finally:
            shutil.rmtree(self.folder, ignore_errors=True)

    def url(self, database: str = "postgres") -> str:
        return f"postgresql://clipseek@127.0.0.1:{self.port}/{database}"

    def new_database(self) -> str:
        """The URL of a new, empty database."""
        import psycopg

        name = f"test_{uuid.uuid4().hex[:12]}"
        with psycopg.connect(f"host=127.0.0.1 port={self.port} user=clipseek dbname=postgres", autocommit=True) as c:
            c.execute(f'CREATE DATABASE "{name}"')
        return self.url(name)


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]
