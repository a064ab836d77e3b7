"""A TCP proxy on loopback that a test can cut or black-hole: a real network fault between two real processes.

``cut()`` closes every proxied connection and refuses new ones (a peer that went away); ``blackhole()`` keeps the
connections open but forwards nothing (a silent partition, which nothing notices until a timeout); ``restore()``
forwards again. It runs its own event loop in a daemon thread, so synchronous tests can drive it.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from typing import Any

from psycopg.conninfo import conninfo_to_dict, make_conninfo

from servers import free_port


class TcpProxy:
    def __init__(self, target_host: str, target_port: int | None = None) -> None:
        """``target_port`` None: ``target_host`` is a Unix socket path."""
        self.target = (target_host, target_port)
        self.port = free_port()
        self.mode = "forward"  # forward | blackhole | cut
        self._loop = asyncio.new_event_loop()
        self._server: asyncio.base_events.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True, name=f"proxy-{self.port}")

    @classmethod
    def to_url(cls, url: str) -> "TcpProxy":
        """A proxy in front of ``nats://host:port`` (or any scheme://host:port)."""
        host, _, port = url.split("://", 1)[1].rstrip("/").rpartition(":")
        return cls(host, int(port))

    @classmethod
    def to_postgres(cls, conninfo: str) -> tuple["TcpProxy", str]:
        """A proxy in front of a PostgreSQL (TCP or Unix socket), and the conninfo that goes through it."""
        params = conninfo_to_dict(conninfo)
        host, port = params.get("host") or "/tmp", int(params.get("port") or 5432)
        proxy = cls(f"{host}/.s.PGSQL.{port}") if host.startswith("/") else cls(host, port)
        params.update(host="127.0.0.1", port=str(proxy.port))
        return proxy, make_conninfo("", **params)

    def url(self, scheme: str = "nats") -> str:
        return f"{scheme}://127.0.0.1:{self.port}"

    def start(self) -> "TcpProxy":
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._start(), self._loop).result(5)
        return self

    async def _start(self) -> None:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", self.port)

    def _call(self, fn: Any) -> None:
        self._loop.call_soon_threadsafe(fn)

    def cut(self) -> None:
        def do() -> None:
            self.mode = "cut"
            for writer in list(self._writers):
                writer.close()
        asyncio.run_coroutine_threadsafe(self._run(do), self._loop).result(5)

    def blackhole(self) -> None:
        asyncio.run_coroutine_threadsafe(self._run(lambda: setattr(self, "mode", "blackhole")), self._loop).result(5)

    def restore(self) -> None:
        asyncio.run_coroutine_threadsafe(self._run(lambda: setattr(self, "mode", "forward")), self._loop).result(5)

    async def _run(self, fn: Any) -> None:
        fn()

    def close(self) -> None:
        async def stop() -> None:
            if self._server is not None:
                self._server.close()
            for writer in list(self._writers):
                writer.close()
        with contextlib.suppress(Exception):
            asyncio.run_coroutine_threadsafe(stop(), self._loop).result(5)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.mode == "cut":
            writer.close()
            return
        try:
            if self.target[1] is None:
                up_reader, up_writer = await asyncio.open_unix_connection(self.target[0])
            else:
                up_reader, up_writer = await asyncio.open_connection(*self.target)
        except OSError:
            writer.close()
            return
        self._writers.update((writer, up_writer))
        try:
            await asyncio.gather(self._pipe(reader, up_writer), self._pipe(up_reader, writer))
        finally:
            for w in (writer, up_writer):
                self._writers.discard(w)
                w.close()

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                data = await reader.read(65536)
                if not data:
                    break
                while self.mode == "blackhole":  # hold the bytes: nothing arrives, nothing fails
                    await asyncio.sleep(0.05)
                if self.mode == "cut":
                    break
                writer.write(data)
                await writer.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            writer.close()
