"""``keyledger replay``: rebuild a projection from the event log alone, while the service keeps answering.

Build aside, then swap:

1. **Horizon.** ``audit.final_horizon`` gives L0 such that every position <= L0 is final (the sealer's
   algorithm), so a snapshot taken afterwards sees exactly the events <= L0, late committers included.
2. **Bulk build.** ``active_api_keys_rebuild`` (``LIKE active_api_keys INCLUDING ALL``) is filled from one
   ordered read of the log: each key's events are folded with ``domain.fold`` (the same rules the write path
   uses) and the surviving rows are COPYed in, with every key's last version into a temporary tracking table.
   A million events never go through ``apply`` one statement at a time.
3. **Catch up** (no lock): events in (L_k, L_k+1] are applied by re-folding the keys they touch, until the
   tail is small. The live tracking rows are only ever *raised* to the rebuilt versions here: lowering them
   would make the live table re-apply events it already has.
4. **Swap**, in one short transaction: ``LOCK TABLE active_api_keys IN EXCLUSIVE MODE`` (readers go on;
   the inline writer and the subscriber wait, and any writer that already touched the table has committed),
   re-fold the keys with events after the last horizon (now all committed: an uncommitted writer cannot have
   touched the table yet, so it will apply its event itself after the swap, onto the new table, with the
   tracking at the version before its own), set their tracking rows, rename the tables and their indexes,
   drop the old one. A writer waiting on the lock re-resolves the table name after the commit and lands on
   the new table. Readers never see an empty or half-built table. ``lock_timeout`` bounds the wait; on
   timeout (or a deadlock with a subscriber holding a tracking row) the swap is retried after another pass.

Only the projection's table and its ``projection_tracking`` rows change; any other table (usage counters,
which are not events) is left alone.
"""

from __future__ import annotations

import datetime as dt
import sys
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import msgspec
import psycopg
from psycopg import sql

from .audit import final_horizon
from .domain import KeyState, fold
from .events import decode_data

NAME = "active_api_keys"
PROJECTIONS = (NAME,)
REBUILD = f"{NAME}_rebuild"
REPLACED = f"{NAME}_replaced"

CREATE_REBUILD = f"""
DROP TABLE IF EXISTS {REBUILD};
CREATE TABLE {REBUILD} (LIKE {NAME} INCLUDING ALL);
CREATE TEMP TABLE IF NOT EXISTS replay_tracking (stream_id text PRIMARY KEY, version integer NOT NULL);
TRUNCATE replay_tracking;
"""
COUNT_EVENTS = "SELECT count(*) FROM events WHERE position <= %s"
# Every event up to the horizon, grouped by key, in version order. recorded_at as epoch microseconds: no
# time-zone text to parse, whatever the session's TimeZone.
READ_LOG = """
COPY (
    SELECT stream_id, version, type, (extract(epoch FROM recorded_at) * 1000000)::bigint, data
    FROM events WHERE {where}
    ORDER BY stream_id, version
) TO STDOUT
"""
TAIL_KEYS = "SELECT DISTINCT stream_id FROM events WHERE position > %s AND position <= %s"
TAIL_KEYS_ALL = "SELECT DISTINCT stream_id FROM events WHERE position > %s"
MAX_POSITION = "SELECT coalesce(max(position), 0) FROM events"
COLUMNS = (
    "id, key_hash, config_id, reference_id, name, start, prefix, enabled, expires_at, rate_limit_enabled, "
    "rate_limit_time_window, rate_limit_max, refill_interval, refill_amount, remaining, permissions, metadata, "
    "created_at, updated_at, version, expired, remaining_version"
)
COPY_ROWS = f"COPY {REBUILD} ({COLUMNS}) FROM STDIN"
COPY_TRACKING = "COPY replay_tracking (stream_id, version) FROM STDIN"
DELETE_REBUILT = f"DELETE FROM {REBUILD} WHERE id = ANY(%s)"
DELETE_STAGED = "DELETE FROM replay_tracking WHERE stream_id = ANY(%s)"
# Raise live tracking to the rebuilt versions (never lower them outside the lock; see the module docstring).
RAISE_TRACKING = """
UPDATE projection_tracking t SET version = r.version
FROM replay_tracking r
WHERE t.projection = %(p)s AND t.stream_id = r.stream_id AND t.version < r.version
"""
ADD_TRACKING = """
INSERT INTO projection_tracking (projection, stream_id, version)
SELECT %(p)s, r.stream_id, r.version FROM replay_tracking r
WHERE NOT EXISTS (SELECT 1 FROM projection_tracking t WHERE t.projection = %(p)s AND t.stream_id = r.stream_id)
ON CONFLICT DO NOTHING
"""
# Under the lock, for the keys just re-folded: exactly the rebuilt version.
SET_TRACKING = """
INSERT INTO projection_tracking (projection, stream_id, version)
SELECT %(p)s, r.stream_id, r.version FROM replay_tracking r WHERE r.stream_id = ANY(%(keys)s)
ON CONFLICT (projection, stream_id) DO UPDATE SET version = EXCLUDED.version
"""
# Tracking rows of keys the log does not know (a stray row) go too; cheap anti-join, outside the hot path.
DROP_UNKNOWN_TRACKING = """
DELETE FROM projection_tracking t
WHERE t.projection = %(p)s AND NOT EXISTS (SELECT 1 FROM replay_tracking r WHERE r.stream_id = t.stream_id)
  AND NOT EXISTS (SELECT 1 FROM events e WHERE e.stream_id = t.stream_id)
"""
INDEXES = """
SELECT i.indexrelid::regclass::text, regexp_replace(pg_get_indexdef(i.indexrelid), '^.* USING ', '')
FROM pg_index i WHERE i.indrelid = %s::regclass
"""
LOCK_LIVE = f"LOCK TABLE {NAME} IN EXCLUSIVE MODE"

_EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.timezone.utc)


@dataclass
class ReplayReport:
    projection: str
    events: int
    keys: int
    rows: int
    tail_events: int
    seconds: float
    lock_ms: float
    attempts: int

    def summary(self) -> str:
        rate = self.events / self.seconds if self.seconds else 0.0
        return (f"replay {self.projection}: {self.events:,} events, {self.keys:,} keys, {self.rows:,} rows, "
                f"in {self.seconds:.2f}s ({rate:,.0f} events/s); swap held the write lock {self.lock_ms:.0f} ms "
                f"({self.attempts} attempt(s), {self.tail_events} tail keys)")


class Progress:
    """A plain stderr bar, redrawn at most 10 times a second."""

    def __init__(self, total: int, enabled: bool) -> None:
        self.total = max(total, 1)
        self.enabled = enabled and total > 0
        self.started = time.perf_counter()
        self._last = 0.0

    def update(self, done: int, *, final: bool = False) -> None:
        if not self.enabled:
            return
        now = time.perf_counter()
        if not final and now - self._last < 0.1:
            return
        self._last = now
        share = min(done / self.total, 1.0)
        rate = done / (now - self.started) if now > self.started else 0.0
        bar = "#" * int(share * 30)
        sys.stderr.write(f"\rreplay [{bar:<30}] {share:6.1%} {done:,}/{self.total:,} events {rate:,.0f}/s")
        if final:
            sys.stderr.write("\n")
        sys.stderr.flush()


# ----------------------------------------------------------------------------------------------------------
# COPY text helpers
# ----------------------------------------------------------------------------------------------------------
_COPY_ESCAPES = str.maketrans({"\\": "\\\\", "\t": "\\t", "\n": "\\n", "\r": "\\r"})
_json = msgspec.json.Encoder()


def _text(value: Any) -> str:
    if value is None:
        return "\\N"
    if isinstance(value, bool):
        return "t" if value else "f"
    if isinstance(value, (int, float)):
        return str(value)
    if isinstance(value, dt.datetime):
        return value.isoformat()
    if isinstance(value, (dict, list)):
        value = _json.encode(value).decode()
    return value.translate(_COPY_ESCAPES)


def _unescape(field: bytes) -> str:
    """COPY text format: backslash escapes (rare: a key id or JSON text with a backslash)."""
    if b"\\" not in field:
        return field.decode()
    out = []
    text = field.decode()
    i = 0
    while i < len(text):
        c = text[i]
        if c == "\\" and i + 1 < len(text):
            n = text[i + 1]
            out.append({"t": "\t", "n": "\n", "r": "\r", "b": "\b", "f": "\f", "v": "\v"}.get(n, n))
            i += 2
        else:
            out.append(c)
            i += 1
    return "".join(out)


def row_line(state: KeyState) -> str:
    # The server-only fields come from the folded state, not from the creation event: ApiKeyUpdated can change
    # them (as keyledger_project_active_key does); `expired` is ApiKeyExpired's flag.
    values = (
        state.id, state.key_hash, state.config_id, state.reference_id, state.name, state.start, state.prefix,
        state.enabled, state.expires_at, state.rate_limit_enabled, state.rate_limit_time_window,
        state.rate_limit_max, state.refill_interval, state.refill_amount, state.remaining, state.permissions,
        state.metadata, state.created_at, state.updated_at, state.version, state.expired, state.remaining_version,
    )
    return "\t".join(_text(v) for v in values) + "\n"


# ----------------------------------------------------------------------------------------------------------
# Fold the log into rows
# ----------------------------------------------------------------------------------------------------------
def _read_log(conn: psycopg.Connection[Any], where: sql.Composable) -> Iterator[tuple[str, int, str, int, str]]:
    with conn.cursor() as cur:
        with cur.copy(sql.SQL(READ_LOG).format(where=where)) as copy:
            for block in copy:
                stream_id, version, event_type, micros, data = bytes(block)[:-1].split(b"\t")
                yield _unescape(stream_id), int(version), event_type.decode(), int(micros), _unescape(data)


def _fold_stream(log_rows: Iterable[tuple[str, int, str, int, str]], write_row: Any, write_version: Any,
                 progress: Progress | None = None) -> tuple[int, int, int]:
    """Fold every key of ``log_rows`` (grouped by key, in version order); returns (events, keys, rows)."""
    events = keys = rows = 0
    current: str | None = None
    batch: list[tuple[int, dt.datetime, Any]] = []

    def flush() -> None:
        nonlocal keys, rows
        if current is None:
            return
        state = fold(batch, current)
        keys += 1
        write_version(f"{_text(current)}\t{batch[-1][0]}\n")
        if state is not None and not state.revoked:
            write_row(row_line(state))
            rows += 1

    for stream_id, version, event_type, micros, data in log_rows:
        if stream_id != current:
            flush()
            current, batch = stream_id, []
        batch.append((version, _EPOCH + dt.timedelta(microseconds=micros), decode_data(event_type, data)))
        events += 1
        if progress is not None and not events % 4096:
            progress.update(events)
    flush()
    return events, keys, rows


def _build(log_rows: Iterable[tuple[str, int, str, int, str]], write: psycopg.Connection[Any],
           progress: Progress | None = None) -> tuple[int, int, int]:
    """Fold ``log_rows`` and COPY into the rebuild and tracking tables on ``write`` (inside its transaction)."""
    rows_buf: list[str] = []
    versions_buf: list[str] = []
    with write.cursor() as cur_rows, write.cursor() as cur_versions:
        with cur_rows.copy(COPY_ROWS) as copy_rows:
            def write_row(line: str) -> None:
                rows_buf.append(line)
                if len(rows_buf) >= 2000:
                    copy_rows.write("".join(rows_buf))
                    rows_buf.clear()

            result = _fold_stream(log_rows, write_row, versions_buf.append, progress)
            copy_rows.write("".join(rows_buf))
        with cur_versions.copy(COPY_TRACKING) as copy_versions:
            for start in range(0, len(versions_buf), 5000):
                copy_versions.write("".join(versions_buf[start:start + 5000]))
    return result


def _refold_keys(read: psycopg.Connection[Any], write: psycopg.Connection[Any], keys: list[str],
                 upto: int | None) -> int:
    """Replace the rebuilt rows and staged versions of ``keys`` by a fresh fold of their whole streams."""
    if not keys:
        return 0
    write.execute(DELETE_REBUILT, (keys,))
    write.execute(DELETE_STAGED, (keys,))
    where = sql.SQL("stream_id = ANY({})").format(sql.Literal(keys))
    if upto is not None:
        where = sql.SQL("{} AND position <= {}").format(where, sql.Literal(upto))
    rows = list(_read_log(read, where))  # a tail: small, and read fully before the COPY into `write` starts
    return _build(rows, write)[0]


def _index_names(conn: psycopg.Connection[Any], table: str) -> dict[str, str]:
    """{definition after USING: index name}, to give the rebuilt indexes their original names."""
    return {definition: name for name, definition in conn.execute(INDEXES, (table,)).fetchall()}


def replay(database_url: str, projection: str = NAME, *, progress: bool = True, lock_timeout_ms: int = 2000,
           max_attempts: int = 5, small_tail: int = 2000) -> ReplayReport:
    if projection not in PROJECTIONS:
        raise ValueError(f"unknown projection {projection!r}")
    started = time.perf_counter()
    # Two connections: one streams the log out, the other COPYs rows in, concurrently.
    with psycopg.connect(database_url, autocommit=True) as read, \
            psycopg.connect(database_url, autocommit=True) as write:
        read.execute("SET work_mem = '256MB'")
        horizon = final_horizon(read, max_wait=30.0)
        while horizon is None and read.execute("SELECT pg_sequence_last_value('events_position_seq')").fetchone()[0]:
            horizon = final_horizon(read, max_wait=30.0)
        horizon = horizon or 0
        write.execute(CREATE_REBUILD)
        total = read.execute(COUNT_EVENTS, (horizon,)).fetchone()[0]
        bar = Progress(total, progress)
        with write.transaction():
            log_rows = _read_log(read, sql.SQL("position <= {}").format(sql.Literal(horizon)))
            events, keys, rows = _build(log_rows, write, bar)
        bar.update(events, final=True)
        write.execute(f"ANALYZE {REBUILD}")

        # Catch up without any lock until the tail is small, then swap under the lock.
        attempts = 0
        tail_keys = 0
        lock_ms = 0.0
        while True:
            nxt = final_horizon(read, max_wait=5.0)
            if nxt is not None and nxt > horizon:
                touched = [r[0] for r in read.execute(TAIL_KEYS, (horizon, nxt)).fetchall()]
                with write.transaction():
                    events += _refold_keys(read, write, touched, nxt)
                horizon = nxt
                if len(touched) > small_tail:
                    continue
            with write.transaction():
                write.execute(RAISE_TRACKING, {"p": projection})
                write.execute(ADD_TRACKING, {"p": projection})
                write.execute(DROP_UNKNOWN_TRACKING, {"p": projection})
            attempts += 1
            try:
                lock_ms, tail_keys = _swap(read, write, projection, horizon, lock_timeout_ms)
                break
            except (psycopg.errors.LockNotAvailable, psycopg.errors.DeadlockDetected) as exc:
                if attempts >= max_attempts:
                    raise
                print(f"\nreplay: swap attempt {attempts} gave way ({type(exc).__name__}); retrying",
                      file=sys.stderr)
                time.sleep(0.05 * attempts)
    return ReplayReport(projection, events, keys, rows, tail_keys, time.perf_counter() - started, lock_ms,
                        attempts)


def _swap(read: psycopg.Connection[Any], write: psycopg.Connection[Any], projection: str, horizon: int,
          lock_timeout_ms: int) -> tuple[float, int]:
    live_indexes = _index_names(write, NAME)
    with write.transaction():
        write.execute(f"SET LOCAL lock_timeout = '{int(lock_timeout_ms)}ms'")
        write.execute(LOCK_LIVE)
        locked = time.perf_counter()
        # Everything after the horizon that is committed now; the fold reads on the same connection so that
        # it sees exactly what this transaction sees.
        touched = [r[0] for r in write.execute(TAIL_KEYS_ALL, (horizon,)).fetchall()]
        if touched:
            _refold_keys(write, write, touched, None)
            write.execute(SET_TRACKING, {"p": projection, "keys": touched})
        rebuilt_indexes = _index_names(write, REBUILD)
        write.execute(f"ALTER TABLE {NAME} RENAME TO {REPLACED}")
        write.execute(f"ALTER TABLE {REBUILD} RENAME TO {NAME}")
        write.execute(f"DROP TABLE {REPLACED}")
        for definition, name in rebuilt_indexes.items():
            original = live_indexes.get(definition)
            if original and original != name:
                write.execute(sql.SQL("ALTER INDEX {} RENAME TO {}").format(sql.Identifier(name),
                                                                             sql.Identifier(original)))
    return (time.perf_counter() - locked) * 1000, len(touched)
