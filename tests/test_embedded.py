"""The embedded servers are real servers: their data survives stop, SIGKILL and restart.

These are the properties the rest of the suite (and ``keyledger serve`` without
DATABASE_URL / NATS_URL) relies on, so they are tested against the actual
processes, not mocks.  Every wait inside keyledger.embedded is bounded, so a
broken server fails these tests within seconds instead of hanging CI.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import nats
import psycopg
import pytest

from keyledger.embedded import EmbeddedPostgres, EmbeddedServerError, start_nats, start_postgres


# --------------------------------------------------------------------------- NATS


async def _create_stream_and_publish(url: str) -> None:
    nc = await nats.connect(url, connect_timeout=5, allow_reconnect=False)
    try:
        js = nc.jetstream(timeout=5)
        await js.add_stream(name="KL_EMBEDDED_TEST", subjects=["kl.embedded.>"])
        ack = await js.publish("kl.embedded.one", b"hello")
        assert ack.seq == 1
    finally:
        await nc.close()


async def _stream_messages(url: str) -> int:
    nc = await nats.connect(url, connect_timeout=5, allow_reconnect=False)
    try:
        info = await nc.jetstream(timeout=5).stream_info("KL_EMBEDDED_TEST")
        return int(info.state.messages)
    finally:
        await nc.close()


def test_nats_stream_survives_kill_and_restart(tmp_path: Path) -> None:
    server = start_nats(tmp_path / "nats")
    try:
        assert server.running
        assert server.url == f"nats://127.0.0.1:{server.port}"
        asyncio.run(asyncio.wait_for(_create_stream_and_publish(server.url), 10))

        port, killed_pid = server.port, server.pid
        server.kill()
        assert not server.running and server.pid is None

        server.restart()
        # A new process on the same port and store dir: the stream and its message were recovered from disk.
        assert server.running and server.port == port and server.pid not in (None, killed_pid)
        assert asyncio.run(asyncio.wait_for(_stream_messages(server.url), 10)) == 1

        server.stop()
        assert not server.running
        server.restart()
        assert asyncio.run(asyncio.wait_for(_stream_messages(server.url), 10)) == 1
    finally:
        server.stop()
    assert not server.running
    assert (tmp_path / "nats" / "nats-server.log").exists()


def test_nats_port_in_use_fails_fast_with_log(tmp_path: Path) -> None:
    """Fast: the start notices that its own process exited (it does not wait out the start timeout, and is not
    fooled by the other server answering on that port); with the log: the reason is in the error."""
    with start_nats(tmp_path / "a") as first:
        with pytest.raises(EmbeddedServerError) as failed:
            start_nats(tmp_path / "b", port=first.port)
        message = str(failed.value)
        assert "nats-server exited with status" in message and f"on port {first.port}" in message
        assert "address already in use" in message  # the tail of its log
        assert "not accepting connections" not in message  # not the start timeout
        assert first.running
        # The first server is untouched: it still serves JetStream.
        asyncio.run(asyncio.wait_for(_create_stream_and_publish(first.url), 10))


# --------------------------------------------------------------------------- PostgreSQL


def _rows(url: str) -> list[tuple[int, str]]:
    with psycopg.connect(url, connect_timeout=10) as conn:
        return conn.execute("SELECT id, note FROM kl_embedded_test ORDER BY id").fetchall()


def test_postgres_data_survives_stop_and_kill(tmp_path: Path) -> None:
    data_dir = tmp_path / "pg"
    server = start_postgres(data_dir)
    try:
        assert server.running
        with psycopg.connect(server.url, connect_timeout=10) as conn:
            assert conn.execute("SELECT current_database()").fetchone() == ("keyledger",)
            conn.execute("CREATE TABLE kl_embedded_test (id int PRIMARY KEY, note text NOT NULL)")
            conn.execute("INSERT INTO kl_embedded_test VALUES (1, 'before stop')")
        with psycopg.connect(server.url_for("postgres"), connect_timeout=10) as conn:
            assert conn.execute("SELECT current_database()").fetchone() == ("postgres",)

        server.stop()
        assert not server.running

        server = start_postgres(data_dir)  # same dir: reuses the cluster, no initdb
        assert _rows(server.url) == [(1, "before stop")]
        with psycopg.connect(server.url, connect_timeout=10) as conn:
            conn.execute("INSERT INTO kl_embedded_test VALUES (2, 'before kill')")  # committed on exit

        server.kill()  # crash: no checkpoint, the next start replays the WAL
        assert not server.running

        server = EmbeddedPostgres.start(data_dir)
        assert _rows(server.url) == [(1, "before stop"), (2, "before kill")]
    finally:
        server.stop()
    assert not server.running


def test_postgres_start_adopts_running_server(tmp_path: Path) -> None:
    first = start_postgres(tmp_path / "pg")
    try:
        second = start_postgres(tmp_path / "pg")
        assert second.pid == first.pid
        assert second.url == first.url
    finally:
        first.stop()
    assert not second.running


def test_postgres_long_data_dir_uses_short_socket_dir(tmp_path: Path) -> None:
    # Unix socket paths are limited to ~107 bytes; pytest's tmp_path plus a long name exceeds that.
    deep = tmp_path / ("d" * 60) / ("e" * 60)
    deep.mkdir(parents=True)
    server = start_postgres(deep / "pg")
    try:
        assert server.socket_dir != server.data_dir
        with psycopg.connect(server.url, connect_timeout=10) as conn:
            assert conn.execute("SELECT 1").fetchone() == (1,)
    finally:
        server.stop()
    assert not server.socket_dir.exists()


def test_postgres_refuses_foreign_directory(tmp_path: Path) -> None:
    data_dir = tmp_path / "not-pg"
    data_dir.mkdir()
    (data_dir / "precious.txt").write_text("do not initdb over me")
    with pytest.raises(EmbeddedServerError, match="neither empty nor a PostgreSQL data directory"):
        start_postgres(data_dir)
    assert (data_dir / "precious.txt").read_text() == "do not initdb over me"
