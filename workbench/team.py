"""The team tracking server: MLflow on PostgreSQL, with artifacts proxied through the server.

    workbench ui --team                        # PostgreSQL cluster and artifacts in ./mlflow-team/
    workbench ui --team --dir /srv/workbench-team --host 0.0.0.0 --allowed-hosts mlflow.lab:5000
    MLFLOW_BACKEND_STORE_URI=postgresql://mlflow:PW@db.lab/mlflow \\
        workbench ui --team --artifacts s3://lab-bucket/mlflow --host 0.0.0.0

Teammates then ``export MLFLOW_TRACKING_URI=http://<server>:5000`` and every stage logs there
(workbench/tracking.py). Runs go to the database; artifacts go over HTTP to the server, which
stores them in ``--artifacts`` (``mlflow server --serve-artifacts``): clients see
``mlflow-artifacts:/`` URIs and need no storage credentials. docs/team.md has the whole setup.

Without ``--db`` (or ``MLFLOW_BACKEND_STORE_URI``) the server gets a PostgreSQL cluster of its own
in ``<dir>/postgres`` (Debian's ``postgresql`` package: initdb and pg_ctl), created on first use.
That cluster listens on a Unix socket in its data directory only, with peer authentication: the
server's OS user is its one database role, and no password exists to leak. Teammates reach MLflow
over HTTP, never the database. PostgreSQL refuses to run as root, so when root starts it, the
cluster belongs to and runs as the ``postgres`` user that the Debian package creates.

Only subprocesses here: MLflow is imported by workbench/tracking.py alone.
"""

from __future__ import annotations

import glob
import logging
import os
import pwd
import shlex
import shutil
import signal
import subprocess
import sys
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

log = logging.getLogger(__name__)

PG_BIN_GLOB = "/usr/lib/postgresql/*/bin"  # Debian/Ubuntu: one directory per major version, off PATH
PG_PORT = 5432  # names the socket file only (no TCP); the socket lives in the cluster's own directory
DATABASE = "mlflow"
SOCKET_PATH_MAX = 107  # sun_path is 108 bytes with its NUL
INSTALL_HINT = ("apt-get install postgresql (Debian/Ubuntu; ./setup.sh installs it when run as root), "
                "or point --db / MLFLOW_BACKEND_STORE_URI at a PostgreSQL you already run")


class TeamServerError(RuntimeError):
    """The team server cannot start: the message says what to do."""


def pg_bin(version: str | None = None) -> Path:
    """The directory of initdb/pg_ctl/psql: Debian's newest (or ``version``), else the ones on PATH."""
    dirs = {Path(d).parent.name: Path(d) for d in glob.glob(PG_BIN_GLOB) if Path(d, "initdb").exists()}
    if version and version in dirs:
        return dirs[version]
    if dirs:
        return dirs[max(dirs, key=lambda v: int(v) if v.isdigit() else -1)]
    initdb = shutil.which("initdb")
    if initdb and Path(initdb).with_name("pg_ctl").exists():
        return Path(initdb).parent
    raise TeamServerError(f"PostgreSQL's server programs (initdb, pg_ctl) are not installed: {INSTALL_HINT}")


def _server_account() -> pwd.struct_passwd | None:
    """The OS user PostgreSQL runs as: ``postgres`` when we are root (it refuses root), else us."""
    if os.geteuid() != 0:
        return None
    try:
        return pwd.getpwnam("postgres")
    except KeyError:
        raise TeamServerError("PostgreSQL refuses to run as root and there is no 'postgres' user to run "
                              f"it as: {INSTALL_HINT} (the package creates the user)") from None


class LocalPostgres:
    """A PostgreSQL cluster in ``data_dir``, created if missing, running while the block runs.

    ``uri`` is the SQLAlchemy URI MLflow takes (psycopg 3 over the cluster's Unix socket)."""

    def __init__(self, data_dir: Path, database: str = DATABASE):
        self.data_dir = Path(data_dir).resolve()
        self.database = database
        self.account = _server_account()
        self.role = pwd.getpwuid(os.geteuid()).pw_name  # peer authentication: our OS user name
        version_file = self.data_dir / "PG_VERSION"
        self.bin = pg_bin(version_file.read_text().strip() if version_file.exists() else None)
        self._started = False
        sock = self.data_dir / f".s.PGSQL.{PG_PORT}.lock"
        if len(str(sock).encode()) > SOCKET_PATH_MAX:
            raise TeamServerError(f"{self.data_dir} is too deep for PostgreSQL's Unix socket "
                                  f"({SOCKET_PATH_MAX} bytes at most): choose a shorter --dir")

    @property
    def uri(self) -> str:
        return (f"postgresql://{self.role}@/{self.database}"
                f"?host={quote(str(self.data_dir), safe='/')}&port={PG_PORT}")

    def _as_server(self, *cmd: str, check: bool = True) -> subprocess.CompletedProcess:
        """Run a PostgreSQL server program as the account that owns the cluster."""
        kw: dict = {}
        if self.account is not None:
            kw = dict(user=self.account.pw_uid, group=self.account.pw_gid, extra_groups=[],
                      env={**os.environ, "HOME": self.account.pw_dir, "USER": "postgres"})
        out = subprocess.run(cmd, cwd="/", capture_output=True, text=True, **kw)
        if check and out.returncode != 0:
            raise TeamServerError(f"{' '.join(cmd)} failed ({out.returncode}):\n{out.stdout}{out.stderr}"
                                  + self._log_tail())
        return out

    def _log_tail(self) -> str:
        logfile = self.data_dir / "server.log"
        return f"\n{logfile}:\n" + "".join(logfile.read_text().splitlines(True)[-20:]) if logfile.exists() else ""

    def _client(self, sql: str) -> str:
        """Run ``sql`` through psql as our role; its output."""
        out = subprocess.run([str(self.bin / "psql"), "-X", "-q", "-At", "-h", str(self.data_dir),
                              "-p", str(PG_PORT), "-U", self.role, "-d", "postgres", "-c", sql],
                             capture_output=True, text=True)
        if out.returncode != 0:
            raise TeamServerError(f"psql {sql!r} failed ({out.returncode}): {out.stderr.strip()}")
        return out.stdout

    def init(self) -> None:
        if (self.data_dir / "PG_VERSION").exists():
            return
        self.data_dir.mkdir(parents=True, exist_ok=True)
        if any(self.data_dir.iterdir()):
            raise TeamServerError(f"{self.data_dir} is neither empty nor a PostgreSQL cluster")
        self.data_dir.chmod(0o700)
        if self.account is not None:
            os.chown(self.data_dir, self.account.pw_uid, self.account.pw_gid)
            if self._as_server("test", "-w", str(self.data_dir), check=False).returncode != 0:
                raise TeamServerError(
                    f"the 'postgres' user (PostgreSQL runs as it when root starts it) cannot reach "
                    f"{self.data_dir}: a parent directory is closed to it (e.g. /root is 0700); "
                    "choose a --dir it can reach, e.g. /srv/workbench-team")
        log.info("creating a PostgreSQL cluster in %s", self.data_dir)
        self._as_server(str(self.bin / "initdb"), "-D", str(self.data_dir), "-U", self.role,
                        "--auth-local=peer", "--auth-host=reject", "-E", "UTF8", "--no-locale")
        with open(self.data_dir / "postgresql.conf", "a") as conf:
            conf.write("\n# workbench ui --team: a Unix socket in this directory, no TCP\n"
                       "listen_addresses = ''\n")

    def start(self) -> None:
        self.init()
        if self._as_server(str(self.bin / "pg_ctl"), "status", "-D", str(self.data_dir),
                           check=False).returncode == 0:
            log.info("PostgreSQL already running in %s; using it (and leaving it running)", self.data_dir)
        else:
            # pg_ctl hands -o to /bin/sh: quote the socket directory.
            self._as_server(str(self.bin / "pg_ctl"), "start", "-D", str(self.data_dir), "-w", "-t", "60",
                            "-l", str(self.data_dir / "server.log"),
                            "-o", f"-k {shlex.quote(str(self.data_dir))} -p {PG_PORT}")
            self._started = True
        if not self._client(f"SELECT 1 FROM pg_database WHERE datname = '{self.database}'").strip():
            self._client(f'CREATE DATABASE "{self.database}"')

    def stop(self, only_if_started: bool = True) -> None:
        """Shut the cluster down (a fast shutdown: open sessions are cut, data is safe); one this
        object found already running is left alone unless ``only_if_started`` is False."""
        if self._started or not only_if_started:
            self._as_server(str(self.bin / "pg_ctl"), "stop", "-D", str(self.data_dir), "-m", "fast", "-w",
                            check=False)
            self._started = False

    def __enter__(self) -> "LocalPostgres":
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


@dataclass(slots=True)
class TeamServerConfig:
    dir: Path = Path("mlflow-team")  # <dir>/postgres (the cluster) and <dir>/artifacts
    db: str | None = None  # an existing PostgreSQL (postgresql://...); else MLFLOW_BACKEND_STORE_URI, else <dir>
    artifacts: str | None = None  # a directory or s3://bucket/prefix; default <dir>/artifacts
    host: str = "127.0.0.1"
    port: int = 5000
    workers: int = 4  # MLflow's default; PostgreSQL, unlike SQLite, takes concurrent writers
    allowed_hosts: str | None = None  # Host headers MLflow accepts beyond localhost (DNS-rebinding guard)

    def artifacts_destination(self) -> str:
        if self.artifacts and "://" in self.artifacts:
            return self.artifacts
        return str(Path(self.artifacts or self.dir / "artifacts").resolve())


def server_command(cfg: TeamServerConfig) -> list[str]:
    """``mlflow server`` with proxied artifacts. The database URI travels in the environment
    (``MLFLOW_BACKEND_STORE_URI``), so a password in it stays out of ``ps``."""
    cmd = [sys.executable, "-m", "mlflow", "server", "--serve-artifacts",
           "--artifacts-destination", cfg.artifacts_destination(),
           "--host", cfg.host, "--port", str(cfg.port), "--workers", str(cfg.workers)]
    if cfg.allowed_hosts:
        cmd += ["--allowed-hosts", cfg.allowed_hosts]
    return cmd


def serve_forever(cfg: TeamServerConfig) -> int:
    """Start PostgreSQL (unless ``cfg.db``) and the MLflow server; stop both on Ctrl-C or SIGTERM."""
    from workbench.net import stop, wait_http_ok

    db = cfg.db or os.environ.get("MLFLOW_BACKEND_STORE_URI")
    if db and not db.startswith("postgresql"):
        raise TeamServerError(f"the team server's database must be a postgresql:// URI, not {db.split(':')[0]}:")
    with ExitStack() as stack:
        # SIGTERM (systemd, kill) unwinds like Ctrl-C, so the cluster is shut down cleanly too.
        stack.callback(signal.signal, signal.SIGTERM, signal.signal(signal.SIGTERM, lambda *_: sys.exit(0)))
        if not db:
            db = stack.enter_context(LocalPostgres(cfg.dir / "postgres")).uri
        if "://" not in cfg.artifacts_destination():
            Path(cfg.artifacts_destination()).mkdir(parents=True, exist_ok=True)
        proc = subprocess.Popen(server_command(cfg), env={**os.environ, "MLFLOW_BACKEND_STORE_URI": db})
        stack.callback(stop, proc, 30)
        url = f"http://{'127.0.0.1' if cfg.host in ('0.0.0.0', '::') else cfg.host}:{cfg.port}"
        if not wait_http_ok(f"{url}/health", 180, proc):
            raise TeamServerError(f"the MLflow server did not answer {url}/health (its log is above)")
        print(f"Team MLflow server on {url}: runs in PostgreSQL, artifacts proxied to "
              f"{cfg.artifacts_destination()}\n  on each client: export MLFLOW_TRACKING_URI=http://"
              f"<this host>:{cfg.port}   (Ctrl-C stops the server)", flush=True)
        return proc.wait()
