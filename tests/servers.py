"""Private servers for tests: PostgreSQL clusters made with ``initdb`` in a temporary
folder, streaming standbys made with ``pg_basebackup -R``, and PgBouncers.

Tests that stop, restart, copy or reconfigure a server use these instead of the
machine's shared PostgreSQL. Every server listens on a free 127.0.0.1 port only and is
stopped (its folder removed) by ``stop``/``remove``. PostgreSQL and PgBouncer refuse to
run as root, so under root they run as the ``postgres`` system user. The binaries come
from ``EVENTMILL_PG_BIN`` (default: PostgreSQL 15's Debian folder) and ``PATH``
(``pgbouncer``; ``.ci/ensure-tools`` installs it). Blocking calls; each raises
``ServerError`` with the tool's output when a step fails.
"""

from __future__ import annotations

import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

PG_BIN = Path(os.environ.get("EVENTMILL_PG_BIN", "/usr/lib/postgresql/15/bin"))
SERVER_USER = "postgres"
STOP_SECONDS = 30
"""How long a smart or fast stop may take before ``stop`` makes it immediate."""
START_SECONDS = 60.0


class ServerError(RuntimeError):
    """A private server could not be made, started or stopped."""


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def _as_server_user(command: list[str]) -> list[str]:
    if os.geteuid() != 0:
        return command
    return [
        "setpriv",
        f"--reuid={SERVER_USER}",
        f"--regid={SERVER_USER}",
        "--init-groups",
        *command,
    ]


def _run(command: list[str]) -> str:
    done = subprocess.run(
        _as_server_user(command), capture_output=True, text=True, check=False, timeout=120
    )
    if done.returncode != 0:
        raise ServerError(f"{' '.join(command)} failed ({done.returncode}): {done.stderr.strip()}")
    return done.stdout


def _new_folder(prefix: str) -> Path:
    """A new temporary folder the server user owns."""
    folder = Path(tempfile.mkdtemp(prefix=prefix))
    if os.geteuid() == 0:
        user = pwd.getpwnam(SERVER_USER)
        os.chown(folder, user.pw_uid, user.pw_gid)
    return folder


def _wait_for_port(port: int, alive: subprocess.Popen[bytes] | None = None) -> None:
    deadline = time.monotonic() + START_SECONDS
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            if alive is not None and alive.poll() is not None:
                raise ServerError(
                    f"the server for port {port} exited ({alive.returncode})"
                ) from None
            if time.monotonic() > deadline:
                raise ServerError(f"nothing listens on 127.0.0.1:{port}") from None
            time.sleep(0.05)


class PrivateCluster:
    """One PostgreSQL cluster in ``folder`` serving 127.0.0.1:``port``."""

    def __init__(self, folder: Path, port: int) -> None:
        self.folder = folder
        self.port = port
        self.data = folder / "data"

    @classmethod
    def create(cls, settings: dict[str, str] | None = None) -> PrivateCluster:
        """``initdb`` a new cluster with ``settings`` added to postgresql.conf, started.
        Blocks until it accepts connections."""
        cluster = cls(_new_folder("eventmill-pg-"), free_port())
        _run(
            [
                str(PG_BIN / "initdb"),
                "-D",
                str(cluster.data),
                "-U",
                SERVER_USER,
                "--auth=trust",
                "--encoding=UTF8",
                "--no-sync",
            ]
        )
        cluster.configure(settings or {})
        cluster.start()
        return cluster

    def configure(self, settings: dict[str, str]) -> None:
        """Write the port, loopback-only listening and ``settings`` into the cluster's
        configuration (takes effect at the next start)."""
        lines = {
            "listen_addresses": "'127.0.0.1'",
            "port": str(self.port),
            "unix_socket_directories": f"'{self.folder}'",
            "fsync": "off",
            "full_page_writes": "off",
            "shared_buffers": "32MB",
            **settings,
        }
        text = "".join(f"{name} = {value}\n" for name, value in lines.items())
        path = self.data / "postgresql.auto.conf"
        existing = path.read_text() if path.exists() else ""
        with open(path, "w") as conf:
            conf.write(existing + text)

    def dsn(self, database: str = "postgres", options: str = "") -> str:
        """A libpq DSN for ``database`` here, with ``options`` (``-c name=value``)."""
        quoted = options.replace("\\", "\\\\").replace("'", "\\'")
        extra = f" options='{quoted}'" if options else ""
        return f"host=127.0.0.1 port={self.port} user={SERVER_USER} dbname={database}{extra}"

    def start(self) -> None:
        """Start the server; blocks until it accepts connections."""
        _run(
            [
                str(PG_BIN / "pg_ctl"),
                "-D",
                str(self.data),
                "-l",
                str(self.folder / "server.log"),
                "-w",
                "-t",
                str(int(START_SECONDS)),
                "start",
            ]
        )
        _wait_for_port(self.port)

    def stop(self, mode: str = "fast") -> None:
        """Stop the server (``mode``: smart, fast or immediate); blocks until it is down.

        A smart or fast stop not done in ``STOP_SECONDS`` is finished as an immediate
        one, and the tail of the server's log printed (captured by pytest, shown with a
        failure): once, on a loaded machine, a fast stop did not end within pg_ctl's
        60 s, and a test that only needs the server gone failed on it. Raises
        ServerError if even the immediate stop fails."""
        command = [str(PG_BIN / "pg_ctl"), "-D", str(self.data), "-w", "stop"]
        try:
            _run([*command, "-m", mode, "-t", str(STOP_SECONDS)])
        except ServerError as error:
            if mode == "immediate":
                raise
            log = self.folder / "server.log"
            tail = log.read_text(errors="replace").splitlines()[-20:] if log.exists() else []
            print(f"{error}; stopping immediately. Server log:", *tail, sep="\n")
            _run([*command, "-m", "immediate"])

    def running(self) -> bool:
        """Whether the server's postmaster runs."""
        status = subprocess.run(
            _as_server_user([str(PG_BIN / "pg_ctl"), "-D", str(self.data), "status"]),
            capture_output=True,
            check=False,
        )
        return status.returncode == 0

    def standby(self) -> PrivateCluster:
        """A streaming hot standby of this (running) cluster, made by ``pg_basebackup
        -R`` and started. Blocks until it accepts connections."""
        copy = PrivateCluster(_new_folder("eventmill-standby-"), free_port())
        _run(
            [
                str(PG_BIN / "pg_basebackup"),
                "-D",
                str(copy.data),
                "-h",
                "127.0.0.1",
                "-p",
                str(self.port),
                "-U",
                SERVER_USER,
                "-X",
                "stream",
                "-R",
                "--no-sync",
                # At once: a spread checkpoint (the default) after the session's other
                # tests wrote to the cluster took minutes.
                "--checkpoint=fast",
            ]
        )
        copy.configure({"hot_standby": "on"})
        copy.start()
        return copy

    def remove(self) -> None:
        """Stop the server if it runs and delete its folder."""
        if self.running():
            self.stop("immediate")
        shutil.rmtree(self.folder, ignore_errors=True)


class Bouncer:
    """A PgBouncer in ``pool_mode`` (transaction or session) in front of ``cluster``,
    with at most ``pool_size`` server connections per database and user."""

    def __init__(self, cluster: PrivateCluster, pool_mode: str, *, pool_size: int = 40) -> None:
        self.folder = _new_folder("eventmill-bouncer-")
        self.port = free_port()
        self.pool_mode = pool_mode
        config = self.folder / "pgbouncer.ini"
        (self.folder / "users.txt").write_text(f'"{SERVER_USER}" ""\n')
        config.write_text(
            "[databases]\n"
            f"* = host=127.0.0.1 port={cluster.port}\n"
            "[pgbouncer]\n"
            "listen_addr = 127.0.0.1\n"
            f"listen_port = {self.port}\n"
            "unix_socket_dir =\n"
            "auth_type = trust\n"
            f"auth_file = {self.folder / 'users.txt'}\n"
            f"pool_mode = {pool_mode}\n"
            "max_client_conn = 500\n"
            f"default_pool_size = {pool_size}\n"
            # Hand out server connections in turn, not the last used first: a client's
            # next transaction then lands on another server session, as under load.
            "server_round_robin = 1\n"
            "ignore_startup_parameters = extra_float_digits\n"
            f"logfile = {self.folder / 'pgbouncer.log'}\n"
        )
        executable = shutil.which("pgbouncer") or "/usr/sbin/pgbouncer"
        if not Path(executable).exists():
            raise ServerError("pgbouncer is not installed (run .ci/ensure-tools)")
        self._process = subprocess.Popen(
            _as_server_user([executable, str(config)]),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        _wait_for_port(self.port, self._process)

    def dsn(self, database: str = "postgres") -> str:
        """A libpq DSN for ``database`` through this PgBouncer."""
        return f"host=127.0.0.1 port={self.port} user={SERVER_USER} dbname={database}"

    def stop(self) -> None:
        """Stop PgBouncer and delete its folder; blocks until it has exited."""
        self._process.terminate()
        try:
            self._process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self._process.kill()
            self._process.wait()
        shutil.rmtree(self.folder, ignore_errors=True)
