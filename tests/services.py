"""Real backing services for the registry tests: a private PostgreSQL cluster and a local S3 server (moto).

``start_postgres`` runs initdb + pg_ctl from the Debian ``postgresql`` package (highest version under
/usr/lib/postgresql) on a free loopback port, as the ``postgres`` user when we are root (PostgreSQL refuses to
run as root). ``MODELSERVE_TEST_POSTGRES_URL`` (a server-level URL such as
``postgresql+psycopg://user:pw@host:5432/postgres``) uses an existing server instead.

``start_moto`` runs moto's S3 in server mode in a thread on a free loopback port; clients reach it over HTTP
with the credentials in ``storage_options()``, so nothing is patched in-process.

Both raise ``ServiceUnavailable`` with a readable reason when the service cannot be started.
"""

from __future__ import annotations

import glob
import os
import re
import shutil
import socket
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

POSTGRES_URL_ENV = "MODELSERVE_TEST_POSTGRES_URL"


class ServiceUnavailable(RuntimeError):
    """A test service could not be started; the message says why."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --- PostgreSQL ---------------------------------------------------------------------------------------------


@dataclass
class PostgresServer:
    server_url: str  # SQLAlchemy URL of the server's maintenance database
    pg_ctl: list[str] = field(default_factory=list)  # command prefix to stop it; empty for an external server
    data_dir: Path | None = None
    cleanup_dir: Path | None = None  # a temporary directory this helper made and must remove

    def url(self, dbname: str) -> str:
        """SQLAlchemy URL (postgresql+psycopg://...) of database ``dbname`` on this server."""
        from sqlalchemy.engine import make_url

        return make_url(self.server_url).set(database=dbname).render_as_string(hide_password=False)

    def _admin(self):
        import psycopg
        from sqlalchemy.engine import make_url

        libpq = make_url(self.server_url).set(drivername="postgresql").render_as_string(hide_password=False)
        return psycopg.connect(libpq, autocommit=True)

    def create_database(self, name: str) -> str:
        from psycopg import sql

        with self._admin() as conn:
            conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
        return self.url(name)

    def drop_database(self, name: str) -> None:
        from psycopg import sql

        with self._admin() as conn:
            conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))

    def stop(self) -> None:
        if self.pg_ctl and self.data_dir is not None:
            subprocess.run([*self.pg_ctl, "-D", str(self.data_dir), "-m", "fast", "-w", "stop"],
                           capture_output=True, cwd=self.data_dir.parent)
            self.pg_ctl = []
        if self.cleanup_dir is not None:
            shutil.rmtree(self.cleanup_dir, ignore_errors=True)
            self.cleanup_dir = None


def _pg_bindir() -> Path:
    def version(path: str) -> tuple[int, ...]:
        return tuple(int(n) for n in re.findall(r"\d+", Path(path).parent.parent.name))

    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=version)
    if not found:
        raise ServiceUnavailable("PostgreSQL not installed: no /usr/lib/postgresql/*/bin/initdb "
                                 f"(apt-get install postgresql, or set {POSTGRES_URL_ENV})")
    return Path(found[-1]).parent


def start_postgres(tmp_dir: Path) -> PostgresServer:
    """A private PostgreSQL cluster (trust auth, fsync off) on 127.0.0.1, or the server named by the env var."""
    try:
        import psycopg  # noqa: F401
    except ImportError:
        raise ServiceUnavailable("psycopg not installed (pip install 'modelserve[postgres]')") from None
    if os.environ.get(POSTGRES_URL_ENV):
        server = PostgresServer(os.environ[POSTGRES_URL_ENV])
        try:
            server._admin().close()
        except Exception as e:
            raise ServiceUnavailable(f"cannot connect to {POSTGRES_URL_ENV}: {e}") from None
        return server

    bindir = _pg_bindir()
    as_user: list[str] = []
    cleanup = None
    if os.geteuid() == 0:
        if shutil.which("runuser") is None:
            raise ServiceUnavailable("running as root and runuser is missing: PostgreSQL will not run as root")
        try:
            import pwd

            pg_user = pwd.getpwnam("postgres")
        except KeyError:
            raise ServiceUnavailable("running as root and there is no 'postgres' user to run PostgreSQL") from None
        # pytest's temporary directories are private to root: the cluster lives in its own directory in /tmp
        tmp_dir = cleanup = Path(tempfile.mkdtemp(prefix="modelserve-pg-"))
        os.chown(tmp_dir, pg_user.pw_uid, pg_user.pw_gid)
        as_user = ["runuser", "-u", "postgres", "--"]

    data, sock, log = tmp_dir / "data", tmp_dir / "sock", tmp_dir / "postgres.log"
    port = free_port()

    def run(*cmd: str) -> None:
        done = subprocess.run([*as_user, *cmd], capture_output=True, text=True, cwd=tmp_dir)
        if done.returncode != 0:
            logged = log.read_text(errors="replace")[-2000:] if log.exists() else ""
            raise ServiceUnavailable(f"{Path(cmd[0]).name} failed ({done.returncode}):\n"
                                     f"{done.stdout}{done.stderr}{logged}".rstrip())

    try:
        run("mkdir", "-p", str(sock))
        run(str(bindir / "initdb"), "-D", str(data), "-A", "trust", "-U", "postgres", "--no-sync", "-E", "UTF8")
        options = f"-p {port} -k {sock} -c listen_addresses=127.0.0.1 -c fsync=off -c max_connections=100"
        run(str(bindir / "pg_ctl"), "-w", "-t", "60", "-D", str(data), "-o", options, "-l", str(log), "start")
    except BaseException:
        PostgresServer("", [*as_user, str(bindir / "pg_ctl")], data, cleanup).stop()
        raise
    return PostgresServer(f"postgresql+psycopg://postgres@127.0.0.1:{port}/postgres",
                          [*as_user, str(bindir / "pg_ctl")], data, cleanup)


# --- S3 (moto server mode) -----------------------------------------------------------------------------------


@dataclass
class S3Server:
    endpoint_url: str
    _server: object = None
    region: str = "us-east-1"
    key: str = "testing"
    secret: str = "testing"

    def storage_options(self) -> dict:
        """Keyword arguments for ``fsspec.filesystem("s3", ...)`` / ``storage_options=`` pointing at this server."""
        return {"key": self.key, "secret": self.secret,
                "client_kwargs": {"endpoint_url": self.endpoint_url, "region_name": self.region}}

    def create_bucket(self, name: str) -> str:
        import boto3

        client = boto3.client("s3", endpoint_url=self.endpoint_url, region_name=self.region,
                              aws_access_key_id=self.key, aws_secret_access_key=self.secret)
        client.create_bucket(Bucket=name)
        return name

    def stop(self) -> None:
        if self._server is not None:
            self._server.stop()
            self._server = None


def start_moto(port: int = 0) -> S3Server:
    """moto's S3 in server mode on 127.0.0.1 (a free port when ``port`` is 0), in a background thread."""
    try:
        from moto.server import ThreadedMotoServer
    except ImportError as e:
        raise ServiceUnavailable(f"moto[server] not installed ({e}): pip install 'moto[server]'") from None
    try:
        import s3fs  # noqa: F401
    except ImportError:
        raise ServiceUnavailable("s3fs not installed (pip install 'modelserve[s3]')") from None
    if port:  # the threaded server would wait forever on a port it cannot bind: check first
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError as e:
                raise ServiceUnavailable(f"moto server: cannot bind 127.0.0.1:{port}: {e}") from None
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    try:
        server.start()
        host, bound = server.get_host_and_port()
    except Exception as e:
        raise ServiceUnavailable(f"moto server did not start on 127.0.0.1:{port}: {e!r}") from e
    return S3Server(f"http://{host}:{bound}", server)
