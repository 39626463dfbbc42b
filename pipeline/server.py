"""A tracking server for a team: `mlflow server` with proxied artifacts, over sqlite or PostgreSQL.

`make server` (sqlite: the project's own store) and `make server DB=postgresql` start it in
the background; `make server-stop` stops it. With PostgreSQL the cluster is this module's
own: created with initdb under the state folder (.server/ at the project root), started
with pg_ctl, and reachable only through a Unix socket in that folder (no TCP port), so
nothing else on the machine has to be configured or shared. initdb refuses to run as root,
so as root the cluster belongs to the `postgres` user that Debian's package creates.

No mlflow import: the server is MLflow's own, started as a process.
"""

from __future__ import annotations

import errno
import json
import os
import pwd
import secrets
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import asdict, dataclass, field
from pathlib import Path

from pipeline import processes
from pipeline.config import artifact_root, project_root, project_store
from pipeline.errors import PipelineError
from pipeline.files import writable_folder, write_text

DATABASES = ("sqlite", "postgresql")
PG_USER = "mlflow"  # the cluster's superuser, and the only role in it
PG_DATABASE = "mlflow"
PG_OWNER_WHEN_ROOT = "postgres"


def default_folder() -> Path:
    return project_root() / ".server"


@dataclass
class ServerConfig:
    db: str = "sqlite"  # sqlite: the project store (mlflow.db at the root); postgresql: a cluster in `folder`
    host: str = "127.0.0.1"
    port: int = 5050  # `make ui` has 5000, the docs' `mlflow models serve` 5001
    workers: int = 4  # uvicorn worker processes (MLflow's default)
    folder: Path = field(default_factory=default_folder)  # pid file, logs, the PostgreSQL cluster
    app_name: str | None = None  # "basic-auth": MLflow's own login (users in a database of their own)
    startup_timeout_s: float = 180.0  # first start creates the schema; workers import mlflow

    def __post_init__(self) -> None:
        self.folder = Path(self.folder).resolve()
        if self.db not in DATABASES:
            raise PipelineError(f"unknown database {self.db!r}; use {' or '.join(DATABASES)}")

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host  # an IPv6 address, as URLs write it
        return f"http://{host}:{self.port}"


@dataclass
class ServerInfo:
    url: str  # what MLFLOW_TRACKING_URI should be
    pid: int
    db: str
    backend_store_uri: str
    artifacts_destination: str
    log: str
    already_running: bool = False
    # Which process `pid` was when it started (processes.ProcessIdentity): stop and start signal
    # that pid only while it still is that process, never whatever has its number now.
    start_time: int | None = None
    command: list[str] | None = None

    def identity(self) -> processes.ProcessIdentity | None:
        if self.start_time is None or not self.command:
            return None
        return processes.ProcessIdentity(self.pid, self.start_time, tuple(self.command))


# ----------------------------------------------------------------- PostgreSQL


def postgres_bin() -> Path:
    """The newest PostgreSQL server binaries Debian installed (/usr/lib/postgresql/<version>/bin)."""
    found = sorted(
        Path("/usr/lib/postgresql").glob("*/bin/initdb"), key=lambda p: int(p.parts[-3]) if p.parts[-3].isdigit() else 0
    )
    if not found:
        raise PipelineError(
            "PostgreSQL is not installed; `make server DB=postgresql` installs Debian's postgresql package "
            "(apt-get install postgresql)"
        )
    return found[-1].parent


class Postgres:
    """A PostgreSQL cluster in `folder`/postgresql, listening on a Unix socket there only."""

    def __init__(self, folder: Path):
        self.dir = folder / "postgresql"
        self.data = self.dir / "data"
        self.log = self.dir / "postgresql.log"
        self.bin = postgres_bin()

    @property
    def uri(self) -> str:
        # SQLAlchemy 2.1 maps plain postgresql:// to psycopg 3; the driver installed is psycopg2.
        return f"postgresql+psycopg2://{PG_USER}@/{PG_DATABASE}?host={self.dir}"

    def _run(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        """A PostgreSQL program as the cluster's owner (`postgres` when we are root: initdb refuses root)."""
        owner = {}
        if os.geteuid() == 0:
            user = pwd.getpwnam(PG_OWNER_WHEN_ROOT)
            owner = {"user": user.pw_uid, "group": user.pw_gid, "extra_groups": []}
        result = subprocess.run(
            [str(self.bin / args[0]), *args[1:]], capture_output=True, text=True, cwd=self.dir, **owner
        )
        if check and result.returncode != 0:
            detail = (result.stderr or result.stdout).strip().splitlines()
            raise PipelineError(f"PostgreSQL: {args[0]} failed: {detail[-1] if detail else result.returncode}")
        return result

    def _prepare_folder(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        if os.geteuid() != 0:
            return
        try:
            owner = pwd.getpwnam(PG_OWNER_WHEN_ROOT)
        except KeyError:
            raise PipelineError(
                f"no {PG_OWNER_WHEN_ROOT!r} user to own the cluster (initdb refuses root); "
                "Debian's postgresql package creates it"
            ) from None
        os.chown(self.dir, owner.pw_uid, owner.pw_gid)
        self.dir.chmod(0o700)
        # Every folder above must let the owner through.
        probe = subprocess.run(["test", "-w", str(self.dir)], user=owner.pw_uid, group=owner.pw_gid, extra_groups=[])
        if probe.returncode != 0:
            raise PipelineError(
                f"user {PG_OWNER_WHEN_ROOT!r} cannot reach {self.dir}; a folder above it is closed to other users"
            )

    def running(self) -> bool:
        return self.data.is_dir() and self._run("pg_ctl", "-D", str(self.data), "status", check=False).returncode == 0

    def start(self) -> str:
        """Create the cluster on first use, start it, create the database; returns the SQLAlchemy URI."""
        self._prepare_folder()
        if not (self.data / "PG_VERSION").is_file():
            self._run(
                "initdb", "-D", str(self.data), "-U", PG_USER, "-E", "UTF8", "--auth-local=trust",
                "--auth-host=reject", "--no-instructions",
            )  # fmt: skip
        if not self.running():
            # No TCP at all; the socket is the owner's alone (0700), and root's (the server's when root).
            options = f"-k '{self.dir}' -c listen_addresses='' -c unix_socket_permissions=0700"
            self._run("pg_ctl", "-D", str(self.data), "-l", str(self.log), "-w", "-t", "60", "-o", options, "start")
        self.create_database(PG_DATABASE)
        return self.uri

    def create_database(self, name: str) -> str:
        exists = self._run("psql", "-h", str(self.dir), "-U", PG_USER, "-d", "postgres", "-tAc",
                           f"SELECT 1 FROM pg_database WHERE datname = '{name}'")  # fmt: skip
        if exists.stdout.strip() != "1":
            self._run("createdb", "-h", str(self.dir), "-U", PG_USER, name)
        return self.uri.replace(f"/{PG_DATABASE}?", f"/{name}?")

    def stop(self) -> bool:
        if not self.running():
            return False
        self._run("pg_ctl", "-D", str(self.data), "-m", "fast", "-w", "stop")
        return True


# ----------------------------------------------------------------- mlflow server


def _state_file(folder: Path) -> Path:
    return folder / "server.json"


def _read_state(folder: Path) -> ServerInfo | None:
    """What `server start` recorded in the folder, or None if nothing; a state file that isn't one is an error."""
    state = _state_file(folder)
    try:
        text = state.read_text()
    except (FileNotFoundError, NotADirectoryError):
        return None
    except OSError as exc:
        raise PipelineError(f"cannot read {state}: {exc.strerror or exc}") from None
    try:
        fields = json.loads(text)
        info = ServerInfo(**fields)
        if not isinstance(info.pid, int) or isinstance(info.pid, bool) or info.pid <= 1:
            raise ValueError(f"pid {info.pid!r}")
        if info.start_time is not None and not isinstance(info.start_time, int):
            raise ValueError(f"start_time {info.start_time!r}")
        if info.command is not None and not (
            isinstance(info.command, list) and all(isinstance(part, str) for part in info.command)
        ):
            raise ValueError("command is not a list of strings")
    except (ValueError, TypeError) as exc:  # JSONDecodeError is a ValueError; TypeError: unknown or missing keys
        why = " ".join(str(exc).split()) or type(exc).__name__
        raise PipelineError(
            f"{state} is not a state file `pipeline server start` wrote ({why}); if no server of this folder "
            "runs, remove it"
        ) from None
    return info


def _is_mlflow_server(command: tuple[str, ...]) -> bool:
    return "mlflow" in command and "server" in command


def _ownership(info: ServerInfo) -> str:
    """'ours': the recorded server still runs; 'gone': nothing runs under its pid; 'other': the pid is
    now another process, or the file records no identity to tell (an older version's)."""
    recorded = info.identity()
    if not processes.alive(info.pid):
        return "gone"
    if recorded is None or not _is_mlflow_server(recorded.command):
        return "other"
    return "ours" if processes.same_process(recorded) else "other"


def healthy(url: str, timeout: float = 2.0) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/health", timeout=timeout) as response:
            return response.status == 200
    except (OSError, urllib.error.URLError):
        return False


def _listen_problem(host: str, port: int) -> str | None:
    """Why the server could not listen on host:port (in use, no such address here), or None.

    The host is resolved as the server will resolve it, so ::1 is probed over IPv6 and a name over
    each address family it has; a name that does not resolve is an error of its own.
    """
    try:
        addresses = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except (socket.gaierror, UnicodeError) as exc:
        reason = exc.strerror if isinstance(exc, socket.gaierror) else str(exc)
        raise PipelineError(f"--host {host}: cannot resolve it ({reason}); give an address or a known name") from None
    for family, kind, proto, _, address in addresses:
        with socket.socket(family, kind, proto) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                probe.bind(address)
            except OSError as exc:
                if exc.errno == errno.EADDRINUSE:
                    return f"port {port} on {host} is in use; pick another (--port; SERVER_PORT= for make server)"
                return f"cannot listen on {host} port {port}: {exc.strerror or exc}; give another --host"
    return None


def running_server(folder: Path | None = None) -> ServerInfo | None:
    """The server this folder's state file describes, if that very process is still running."""
    info = _read_state(folder or default_folder())
    return info if info is not None and _ownership(info) == "ours" else None


def backend(config: ServerConfig) -> tuple[str, Path]:
    """The backend store URI and the artifacts folder: the project store for sqlite, the folder's own for PostgreSQL."""
    if config.db == "sqlite":
        database = project_store()
        return f"sqlite:///{database}", artifact_root(database)
    return Postgres(config.folder).start(), config.folder / "artifacts"


AUTH_INI = """[mlflow]
default_permission = READ
database_uri = {database_uri}
admin_username = admin
authorization_function = mlflow.server.auth:authenticate_request_basic_auth
"""


def basic_auth_env(config: ServerConfig) -> dict[str, str]:
    """What MLflow's basic-auth app needs: its config (users in the folder's own database) and a CSRF key.

    The admin password comes from MLFLOW_AUTH_ADMIN_PASSWORD on the first start only (MLflow
    refuses to start without it while the user table is empty); the key is made once and kept.
    """
    if config.db == "postgresql":
        users = Postgres(config.folder).create_database("mlflow_auth")
    else:
        users = f"sqlite:///{config.folder / 'basic_auth.db'}"
    ini = config.folder / "basic_auth.ini"
    ini.write_text(AUTH_INI.format(database_uri=users))
    key_file = config.folder / "flask_secret_key"
    if not key_file.is_file():
        key_file.touch(mode=0o600)
        key_file.write_text(secrets.token_hex(32))
    env = {"MLFLOW_AUTH_CONFIG_PATH": str(ini)}
    if not os.environ.get("MLFLOW_FLASK_SERVER_SECRET_KEY"):
        env["MLFLOW_FLASK_SERVER_SECRET_KEY"] = key_file.read_text().strip()
    return env


def _failure_line(log: Path, offset: int) -> str:
    """The line of this start's log that says why it stopped: the last exception, else the last line."""
    with open(log, "rb") as f:
        f.seek(offset)
        text = f.read().decode(errors="replace")
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    errors = [line for line in lines if "Error:" in line or "Exception:" in line]
    return (errors or lines or ["(no output)"])[-1]


def start_server(config: ServerConfig) -> ServerInfo:
    """Start `mlflow server` in the background (database first) and wait until it answers /health.

    Everything that can be refused is refused before anything is written: the state file, the
    host (resolved) and port, the folder.
    """
    current = running_server(config.folder)
    if current is not None:
        if current.url != config.url or current.db != config.db:
            raise PipelineError(
                f"a server from {config.folder} is already running at {current.url} on {current.db}; "
                "stop it first (make server-stop)"
            )
        if healthy(current.url):
            current.already_running = True
            return current
        _terminate(current.identity())  # ours but not answering (stopping, or stuck): replace it
    problem = _listen_problem(config.host, config.port)
    if problem:
        raise PipelineError(problem)
    writable_folder(config.folder, "the server folder", "choose another --folder")
    backend_uri, artifacts = backend(config)
    artifacts.mkdir(parents=True, exist_ok=True)
    command = [
        sys.executable, "-m", "mlflow", "server",
        "--backend-store-uri", backend_uri,
        "--serve-artifacts", "--artifacts-destination", str(artifacts),
        "--host", config.host, "--port", str(config.port), "--workers", str(config.workers),
    ]  # fmt: skip
    env = dict(os.environ)
    if config.app_name:
        command += ["--app-name", config.app_name]
        env.update(basic_auth_env(config))
    log = config.folder / "mlflow-server.log"
    offset = log.stat().st_size if log.is_file() else 0
    with open(log, "ab") as out:
        # A session of its own: stop_server ends the server and its workers as one process group,
        # and a Ctrl-C in the terminal that started it does not.
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, start_new_session=True, env=env)
    started = processes.launched(process.pid, command)
    info = ServerInfo(config.url, process.pid, config.db, backend_uri, str(artifacts), str(log))
    info.start_time, info.command = started.start_time, list(started.command)
    write_text(_state_file(config.folder), json.dumps(asdict(info), indent=2))
    deadline = time.monotonic() + config.startup_timeout_s
    while not healthy(config.url):
        if process.poll() is not None or time.monotonic() > deadline:
            _terminate(started)
            _state_file(config.folder).unlink(missing_ok=True)
            raise PipelineError(f"mlflow server did not start (log: {log}): {_failure_line(log, offset)}")
        time.sleep(0.5)
    return info


def _terminate(server: processes.ProcessIdentity | None, grace_s: float = 15.0) -> None:
    """SIGTERM the server's process group, SIGKILL it after `grace_s`: only while its leader's pid is
    still that process (or no process at all: a pid still in use as a group id is not handed out)."""
    if server is None:
        return

    def signal_group(signum: int) -> bool:
        if processes.same_process(server) is False:  # the pid is someone else's now
            return False
        try:
            os.killpg(server.pid, signum)
        except ProcessLookupError:
            return False
        return True

    if not signal_group(signal.SIGTERM):
        return
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline:
        try:
            # Reap it if it is our child (the tests'), else poll until it is gone.
            if os.waitpid(server.pid, os.WNOHANG)[0] == server.pid:
                return
        except ChildProcessError:
            if not processes.alive(server.pid):
                return
        time.sleep(0.2)
    signal_group(signal.SIGKILL)


def stop_server(folder: Path | None = None, database: bool = True) -> list[str]:
    """Stop the folder's mlflow server and (with `database`) its PostgreSQL; returns what was stopped.

    The pid in the state file is signalled only while it is still the server that was started; if
    it is another process now, nothing is signalled and nothing removed (a PipelineError says so).
    """
    folder = (folder or default_folder()).resolve()
    stopped = []
    info = _read_state(folder)
    if info is not None:
        ownership = _ownership(info)
        if ownership == "other":
            state, named = _state_file(folder), processes.describe(info.pid)
            if info.identity() is None:
                why = f"but no start time and command line to tell whether that is the server started from {folder}"
            else:
                why = f"which is not the mlflow server started from {folder}: that pid is another process now"
            raise PipelineError(f"{state} names {named}, {why}; not signalled. If that server is gone, remove {state}")
        if ownership == "ours":
            _terminate(info.identity())
            stopped.append(f"mlflow server at {info.url} (pid {info.pid})")
        try:
            _state_file(folder).unlink(missing_ok=True)
        except OSError as exc:
            raise PipelineError(f"cannot remove {_state_file(folder)}: {exc.strerror or exc}") from None
    if database and (folder / "postgresql" / "data").is_dir() and Postgres(folder).stop():
        stopped.append(f"PostgreSQL in {folder / 'postgresql'}")
    return stopped
