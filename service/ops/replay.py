"""``keyledger replay``: rebuild a projection from the event log alone, while the service keeps answering.

The ``active_api_keys`` projection is two tables, rebuilt and swapped together: ``active_api_keys`` (one row per
key that exists) and ``superseded_key_secrets`` (secrets a rotation superseded, still in their grace period).

Build aside, then swap:

1. **Horizon.** ``horizon.final_horizon`` gives L0 such that every position <= L0 is final (the sealer's
   algorithm), so a snapshot taken afterwards sees exactly the events <= L0, late committers included.
2. **Bulk build, set-based, on two connections.** ``*_rebuild`` tables (``LIKE ... INCLUDING ALL EXCLUDING
   INDEXES``) are filled by two statements per connection, each connection taking half of the keys (split by
   ``hashtext(stream_id)``): ``TRACK`` stages every key's last version for tracking and marks the keys whose
   last event is a revocation, then ``FOLD`` folds the others with a hash aggregate over the log; the indexes
   are built afterwards, from sorted data, with the live tables' definitions.
3. **Catch up** (no lock): events in (L_k, L_k+1] are applied by re-folding the keys they touch (the same
   ``FOLD``, scoped to those keys), until the tail is small. The live tracking rows are only ever *raised* to
   the rebuilt versions here: lowering them would make the live table re-apply events it already has.
4. **Swap**, in one short transaction: ``LOCK TABLE superseded_key_secrets, active_api_keys IN EXCLUSIVE MODE``
   (readers go on; the inline writer and the subscriber wait, and any writer that already touched the tables
   has committed), re-fold the keys with events after the last horizon (now all committed: an uncommitted
   writer cannot have touched the tables yet, so it will apply its event itself after the swap, onto the new
   tables, with the tracking at the version before its own), set their tracking rows, rename the tables and
   their indexes, drop the old ones. A writer waiting on the lock re-resolves the table names after the commit
   and lands on the new tables. Readers never see an empty or half-built table.

   **The swap always gives way to a writer.** It locks the two tables in the order every writer touches them
   (``keyledger_project_active_key`` changes superseded_key_secrets before active_api_keys), so a revoke halfway
   through its append cannot form a cycle with it. The one cycle left, a subscriber that holds its key's
   tracking row (``FOR UPDATE``) and waits for a table, is broken by the swap's ``lock_timeout``, kept at half
   the database's ``deadlock_timeout`` at most: the swap gives up before any deadlock check can run, so
   PostgreSQL never has to choose a victim, and a revoke is never one. A swap that gave way is retried after
   another catch-up pass, for up to ``swap_patience_s`` (default 60 s), then the replay fails and the live
   tables are left as they were.

Why the fold is SQL, and why this SQL (measured on the 2-core bench machine, 1,000,000 events, 299,087 keys;
bench/audit_bench.py). The Python fold (COPY the log out, ``msgspec`` decode + ``domain.fold`` per event, COPY
rows in) ran at 56-73k events/s: ~12 us of Python per event. In SQL, an *ordered* fold is what costs: sorting
the log by (stream_id, version) (~1.5 s), an ``ORDER BY`` aggregate (a sort per key) or a window (~6 us per
event), or reading it in index order (random heap access, ~4 us per event). So ``FOLD`` never orders anything:
every field of the row is "the value carried by the LAST event of the key that sets it", which is
``max(ARRAY[version, value])`` (arrays compare element by element, the version decides), an aggregate that
does not care in which order the rows come. A hash aggregate over a sequential scan then folds ~600k events
per second per connection, and the two connections fold the two halves of the keys at once. A cheap first
pass (``TRACK``, a count and two maxima per key) lets the wide fold skip revoked keys: 2.25 s per half instead
of 2.6 s on the bench, where 58% of the keys are revoked. Each rule below is
the rule of ``keyledger_project_active_key`` (schema.sql) for one event type; the equality test
(tests/test_replay.py) checks the two agree on every column of both tables:

* ``ApiKeyCreated``/``ApiKeyImported``: the row, from the creation's ``data`` (the last creation: a key is
  created once). Events before a key's creation change nothing (the function's UPDATEs find no row); after it,
* ``ApiKeyUpdated``: each field it carries, if it is the last update carrying that field; ``expiresAt``
  clears ``expired``, ``remaining`` sets ``remaining_version``;
* ``ApiKeyExpired``: ``expired``, unless an update of ``expiresAt`` came later;
* ``ApiKeyEnabled``/``ApiKeyDisabled``: ``enabled`` from the last of them (else the creation's);
* ``ApiKeyRotated``: ``key_hash`` and ``start`` from the last rotation; each rotation with a ``graceUntil``
  adds its superseded secret (``previousKeyHash``, ``previousStart``, ``graceUntil``) unless a later
  ``ApiKeySecretRetired`` of that hash, or a later ``ApiKeyRevoked``, removed it;
* ``ApiKeyRevoked`` after the creation: no row;
* every event of a known type (all but ``ApiKeyRevoked``) sets ``version`` and ``updated_at``; an unknown type
  changes nothing but the tracking, which always ends at the key's last version.

Only the projection's tables and its ``projection_tracking`` rows change; any other table (usage counters,
which are not events) is left alone. One replay runs at a time (advisory lock).
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import psycopg
from psycopg import sql

from ..storage.horizon import SEQUENCE_LAST_VALUE, final_horizon
from ..storage.parallel import parallel

NAME = "active_api_keys"
SECRETS = "superseded_key_secrets"
PROJECTIONS = (NAME,)
TABLES = (NAME, SECRETS)  # one projection, two tables, swapped together (and locked in this order)
REBUILD = f"{NAME}_rebuild"
SECRETS_REBUILD = f"{SECRETS}_rebuild"
STAGED = "keyledger_replay_tracking"  # every key's last version, as rebuilt (UNLOGGED: scratch, dropped at the end)

REPLAY_LOCK = "SELECT pg_try_advisory_lock(hashtextextended('keyledger.replay', 0))"
REPLAY_UNLOCK = "SELECT pg_advisory_unlock(hashtextextended('keyledger.replay', 0))"
# Indexes are built after the bulk load (a sorted build is ~3x cheaper than maintaining four indexes per row).
CREATE_REBUILD = f"""
DROP TABLE IF EXISTS {REBUILD}, {SECRETS_REBUILD}, {STAGED};
CREATE TABLE {REBUILD} (LIKE {NAME} INCLUDING ALL EXCLUDING INDEXES);
CREATE TABLE {SECRETS_REBUILD} (LIKE {SECRETS} INCLUDING ALL EXCLUDING INDEXES);
CREATE UNLOGGED TABLE {STAGED} (stream_id text COLLATE "C" NOT NULL, version integer NOT NULL, events integer NOT NULL,
                                open boolean NOT NULL);
"""
DROP_SCRATCH = f"DROP TABLE IF EXISTS {REBUILD}, {SECRETS_REBUILD}, {STAGED}"
COUNT_STAGED = f"SELECT count(*), coalesce(sum(events), 0) FROM {STAGED}"
COUNT_ROWS = f"SELECT count(*) FROM {REBUILD}"
TAIL_KEYS = "SELECT DISTINCT stream_id FROM events WHERE position > %s AND position <= %s"
TAIL_KEYS_ALL = "SELECT DISTINCT stream_id FROM events WHERE position > %s"

# Event types. Every known type but ApiKeyRevoked sets the row's version and updated_at (see the docstring).
CREATED = "('ApiKeyCreated', 'ApiKeyImported')"
TOUCHING = ("('ApiKeyCreated', 'ApiKeyImported', 'ApiKeyUpdated', 'ApiKeyExpired', 'ApiKeyEnabled', "
            "'ApiKeyDisabled', 'ApiKeyRotated', 'ApiKeySecretRetired')")
# The fields ApiKeyUpdated carries (only those that changed): (data key, aggregate name, SQL type or None for
# jsonb, default applied at creation when the key is absent or null).
UPDATABLE = (
    ("name", "set_name", "text", None),
    ("expiresAt", "set_expires_at", "timestamptz", None),
    ("metadata", "set_metadata", None, None),
    ("permissions", "set_permissions", None, None),
    ("remaining", "set_remaining", "integer", None),
    ("refillAmount", "set_refill_amount", "integer", None),
    ("refillInterval", "set_refill_interval", "integer", None),
    ("rateLimitEnabled", "set_rate_limit_enabled", "boolean", "false"),
    ("rateLimitTimeWindow", "set_rate_limit_time_window", "integer", None),
    ("rateLimitMax", "set_rate_limit_max", "integer", None),
)
_LAST_UPDATES = ",\n".join(
    f"            max(ARRAY[to_jsonb(version), data -> '{key}']) "
    f"FILTER (WHERE type = 'ApiKeyUpdated' AND data ? '{key}') AS {agg}"
    for key, agg, _, _ in UPDATABLE)


def _field(key: str, agg: str, cast: str | None, default: str | None) -> str:
    """The column: the last update's value if it came after the creation, else the creation's (same casts as
    keyledger_project_active_key: ->> then the column type; jsonb columns keep a JSON null as SQL NULL)."""
    if cast is None:
        return (f"nullif(CASE WHEN (k.{agg}[1])::integer > k.created_v THEN k.{agg}[2] ELSE k.d -> '{key}' END, "
                f"'null'::jsonb)")
    created = f"(k.d ->> '{key}')::{cast}"
    if default is not None:
        created = f"coalesce({created}, {default})"
    return f"CASE WHEN (k.{agg}[1])::integer > k.created_v THEN (k.{agg}[2] #>> '{{}}')::{cast} ELSE {created} END"


_F = {key: _field(key, agg, cast, default) for key, agg, cast, default in UPDATABLE}

# TRACK: every key's last version and event count into the staged tracking, and whether the key is still
# `open`: a key whose last event is ApiKeyRevoked has no row and no superseded secret (each rotation came
# before the revocation), so FOLD can skip its events. In a long log most keys end that way.
TRACK = f"""
INSERT INTO {STAGED} (stream_id, version, events, open)
SELECT stream_id, max(version), count(*),
       max(version) FILTER (WHERE type = 'ApiKeyRevoked') IS DISTINCT FROM max(version)
FROM events
WHERE {{scope}}
GROUP BY stream_id
"""
# FOLD: the projection of the keys in {scope}, in one statement (see the module docstring for why it is
# order-free). `k` is one row per key: `created` = [version, data, recorded_at] of its creation, for every
# other rule the last (version, value) that sets it, and the key's rotations with a grace period and its
# retirements as {"<version>": ...} objects (keyledger_jsonb_union, schema.sql: distinct keys, so any order;
# not jsonb_agg, whose internal state the planner sizes at 8 kB per key and spills the hash aggregate to
# disk). Then two inserts from `k`: the superseded secrets still in grace, and the rows of the keys that exist.
FOLD = f"""
WITH k AS MATERIALIZED (
    SELECT a.*, (a.created[1])::integer AS created_v, a.created[2] AS d
    FROM (
        SELECT stream_id,
            max(ARRAY[to_jsonb(version), data, to_jsonb(recorded_at)]) FILTER (WHERE type IN {CREATED}) AS created,
            max(version) FILTER (WHERE type = 'ApiKeyRevoked') AS revoked_v,
            max(ARRAY[to_timestamp(version), recorded_at]) FILTER (WHERE type IN {TOUCHING}) AS touched,
            max(version * 2 + (type = 'ApiKeyEnabled')::integer)
                FILTER (WHERE type IN ('ApiKeyEnabled', 'ApiKeyDisabled')) AS flip,
            max(version) FILTER (WHERE type = 'ApiKeyExpired') AS expired_v,
            max(ARRAY[to_jsonb(version), data -> 'keyHash', data -> 'start'])
                FILTER (WHERE type = 'ApiKeyRotated') AS rotated,
            keyledger_jsonb_union(jsonb_build_object(version::text, jsonb_build_array(
                data -> 'previousKeyHash', data -> 'previousStart', data -> 'graceUntil')))
                FILTER (WHERE type = 'ApiKeyRotated' AND data ->> 'graceUntil' IS NOT NULL) AS grace,
            keyledger_jsonb_union(jsonb_build_object(version::text, data -> 'keyHash'))
                FILTER (WHERE type = 'ApiKeySecretRetired') AS retired,
{_LAST_UPDATES}
        FROM events
        WHERE {{scope}}
        GROUP BY stream_id
    ) a
), secrets AS (
    INSERT INTO {SECRETS_REBUILD} (key_hash, key_id, start, valid_until)
    SELECT g.value ->> 0, k.stream_id, g.value ->> 1, (g.value ->> 2)::timestamptz
    FROM k CROSS JOIN LATERAL jsonb_each(k.grace) g
    WHERE k.grace IS NOT NULL
      AND coalesce(k.revoked_v, 0) < g.key::integer
      AND NOT EXISTS (SELECT 1 FROM jsonb_each(k.retired) x
                      WHERE x.key::integer > g.key::integer AND x.value #>> '{{}}' = g.value ->> 0)
)
INSERT INTO {REBUILD} (
    id, key_hash, config_id, reference_id, name, start, prefix, enabled, expires_at, rate_limit_enabled,
    rate_limit_time_window, rate_limit_max, refill_interval, refill_amount, remaining, permissions, metadata,
    created_at, updated_at, version, expired, remaining_version)
SELECT
    k.stream_id,
    CASE WHEN (k.rotated[1])::integer > k.created_v THEN k.rotated[2] #>> '{{}}' ELSE k.d ->> 'keyHash' END,
    coalesce(k.d ->> 'configId', 'default'),
    k.d ->> 'referenceId',
    {_F['name']},
    CASE WHEN (k.rotated[1])::integer > k.created_v THEN k.rotated[3] #>> '{{}}' ELSE k.d ->> 'start' END,
    k.d ->> 'prefix',
    CASE WHEN k.flip / 2 > k.created_v THEN k.flip % 2 = 1 ELSE coalesce((k.d ->> 'enabled')::boolean, true) END,
    {_F['expiresAt']},
    {_F['rateLimitEnabled']},
    {_F['rateLimitTimeWindow']},
    {_F['rateLimitMax']},
    {_F['refillInterval']},
    {_F['refillAmount']},
    {_F['remaining']},
    {_F['permissions']},
    {_F['metadata']},
    coalesce((k.d ->> 'createdAt')::timestamptz, (k.created[3] #>> '{{}}')::timestamptz),
    k.touched[2],
    extract(epoch FROM k.touched[1])::integer,
    coalesce(k.expired_v > greatest(k.created_v, (k.set_expires_at[1])::integer), false),
    CASE WHEN (k.set_remaining[1])::integer > k.created_v THEN (k.set_remaining[1])::integer ELSE k.created_v END
FROM k
WHERE k.created_v IS NOT NULL AND coalesce(k.revoked_v, 0) < k.created_v
"""
# The bulk scope: events up to the horizon, of the keys in part {part} of {parts} (a hash split: even halves
# whatever the key ids look like).
BULK_SCOPE = "position <= {horizon} AND (hashtext(stream_id) & 2147483647) % {parts} = {part}"
# FOLD's bulk scope also skips the closed keys TRACK found (a hash semi-join on the staged tracking).
OPEN_KEYS = f"stream_id IN (SELECT stream_id FROM {STAGED} WHERE open)"
# The planner cannot estimate the hash split (it guesses 0.5% of the rows) and would sort 500k rows for a
# group aggregate; the hash aggregate is what we want (work_mem: ~150k keys' states). The staged tracking has
# no statistics yet: no nested loop over it.
BULK_SETTINGS = ("SET LOCAL work_mem = '256MB'", "SET LOCAL enable_sort = off", "SET LOCAL jit = off",
                 "SET LOCAL enable_nestloop = off")

DELETE_REBUILT = f"DELETE FROM {REBUILD} WHERE id = ANY(%(keys)s)"
DELETE_REBUILT_SECRETS = f"DELETE FROM {SECRETS_REBUILD} WHERE key_id = ANY(%(keys)s)"
DELETE_STAGED = f"DELETE FROM {STAGED} WHERE stream_id = ANY(%(keys)s)"

# The live table's indexes, to build the same ones on the rebuilt table: (name, the definition after USING,
# unique?, the constraint it backs: 'p', 'u' or NULL).
INDEXES = """
SELECT i.indexrelid::regclass::text, regexp_replace(pg_get_indexdef(i.indexrelid), '^.* USING ', ''),
       i.indisunique, c.contype
FROM pg_index i LEFT JOIN pg_constraint c ON c.conindid = i.indexrelid AND c.conrelid = i.indrelid
WHERE i.indrelid = %s::regclass
ORDER BY 1
"""
INDEX_STAGED = f"CREATE INDEX ON {STAGED} (stream_id)"

# Bring the live tracking to the rebuilt versions, outside the lock, in one statement: add the keys it lacks,
# raise the keys it has behind (never lower one: see the module docstring), and drop rows of keys the log does
# not know at all (a stray row; a key whose events all came after the horizon has events, so it stays). One
# hash full join finds the differences (a full join is never a nested loop, whatever projection_tracking's
# statistics say); on a live system there are none and nothing is written. Measured on the bench: 0.24-0.33 s
# with every row in place, against 0.6 s for the three separate statements it replaced.
SYNC_TRACKING = f"""
WITH diff AS MATERIALIZED (
    SELECT coalesce(r.stream_id, t.stream_id) AS stream_id, r.version AS rebuilt, t.version AS tracked,
           r.stream_id IS NULL AND NOT EXISTS (SELECT 1 FROM events e WHERE e.stream_id = t.stream_id) AS stray
    FROM {STAGED} r
    FULL JOIN (SELECT stream_id, version FROM projection_tracking WHERE projection = %(p)s) t
        ON t.stream_id = r.stream_id
    WHERE r.version IS DISTINCT FROM t.version
), raised AS (
    UPDATE projection_tracking t SET version = d.rebuilt
    FROM diff d
    WHERE t.projection = %(p)s AND t.stream_id = d.stream_id AND t.version < d.rebuilt
), added AS (
    INSERT INTO projection_tracking (projection, stream_id, version)
    SELECT %(p)s, stream_id, rebuilt FROM diff WHERE tracked IS NULL
    ON CONFLICT DO NOTHING
)
DELETE FROM projection_tracking t
USING diff d
WHERE d.stray AND t.projection = %(p)s AND t.stream_id = d.stream_id
"""
# Under the lock, for the keys just re-folded: exactly the rebuilt version.
SET_TRACKING = f"""
INSERT INTO projection_tracking (projection, stream_id, version)
SELECT %(p)s, r.stream_id, r.version FROM {STAGED} r WHERE r.stream_id = ANY(%(keys)s)
ON CONFLICT (projection, stream_id) DO UPDATE SET version = EXCLUDED.version
"""
# The writers' order (keyledger_project_active_key): superseded_key_secrets, then active_api_keys.
LOCK_LIVE = f"LOCK TABLE {SECRETS}, {NAME} IN EXCLUSIVE MODE"
DEADLOCK_TIMEOUT_MS = "SELECT setting::int FROM pg_settings WHERE name = 'deadlock_timeout'"


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
    secrets: int = 0

    def summary(self) -> str:
        rate = self.events / self.seconds if self.seconds else 0.0
        return (f"replay {self.projection}: {self.events:,} events, {self.keys:,} keys, {self.rows:,} rows "
                f"(+{self.secrets:,} superseded secrets), in {self.seconds:.2f}s ({rate:,.0f} events/s); swap held "
                f"the write lock {self.lock_ms:.0f} ms ({self.attempts} attempt(s), {self.tail_events} tail keys)")


class Progress:
    """Phase lines on stderr (the fold is a few SQL statements: there is nothing finer to report)."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self.started = time.perf_counter()

    def say(self, message: str) -> None:
        if self.enabled:
            print(f"replay [{time.perf_counter() - self.started:6.2f}s] {message}", file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------------------------------------
# The fold, on one connection or several at once
# ----------------------------------------------------------------------------------------------------------
def _fold(conn: psycopg.Connection[Any], scope: sql.Composable, *, bulk: bool = False) -> int:
    """Run TRACK then FOLD for ``scope`` in ``conn``'s current transaction; returns the rows FOLD wrote."""
    if bulk:
        for setting in BULK_SETTINGS:
            conn.execute(setting)
    # FOLD holds literal braces ('{}' paths), so the scope is spliced in as text rather than by sql.SQL.format.
    where = scope.as_string(conn)
    conn.execute(TRACK.replace("{scope}", where))
    if bulk:  # worth a join only over many keys; a refold's few keys are folded whole
        where = f"{where} AND {OPEN_KEYS}"
    return conn.execute(FOLD.replace("{scope}", where)).rowcount


def _bulk(conns: Sequence[psycopg.Connection[Any]], horizon: int) -> int:
    parts = len(conns)

    def job(part: int) -> Callable[[psycopg.Connection[Any]], int]:
        def run(conn: psycopg.Connection[Any]) -> int:
            scope = sql.SQL(BULK_SCOPE.format(horizon=int(horizon), parts=parts, part=part))
            with conn.transaction():
                return _fold(conn, scope, bulk=True)
        return run

    return sum(parallel(conns, [job(part) for part in range(parts)]))


def _index_jobs(conn: psycopg.Connection[Any]) -> tuple[list[str], list[str]]:
    """(CREATE INDEX statements for the rebuild tables, then the constraints that adopt the unique ones).

    Each rebuilt index is named ``<live name>_rebuild`` and renamed to the live name at the swap (renaming an
    index renames the constraint it backs too)."""
    builds: list[str] = []
    constraints: list[str] = []
    for live, rebuild in ((NAME, REBUILD), (SECRETS, SECRETS_REBUILD)):
        for name, definition, unique, contype in conn.execute(INDEXES, (live,)).fetchall():
            temp = f"{name}_rebuild"
            builds.append(sql.SQL("CREATE {}INDEX {} ON {} USING {}").format(
                sql.SQL("UNIQUE " if unique else ""), sql.Identifier(temp), sql.Identifier(rebuild),
                sql.SQL(definition)).as_string(conn))
            if contype in ("p", "u"):
                constraints.append(sql.SQL("ALTER TABLE {} ADD CONSTRAINT {} {} USING INDEX {}").format(
                    sql.Identifier(rebuild), sql.Identifier(temp),
                    sql.SQL("PRIMARY KEY" if contype == "p" else "UNIQUE"), sql.Identifier(temp)).as_string(conn))
    return builds, constraints


def _build_indexes(conns: Sequence[psycopg.Connection[Any]]) -> None:
    builds, constraints = _index_jobs(conns[0])
    builds.insert(0, INDEX_STAGED)
    # CREATE INDEX takes a SHARE lock, so the builds run side by side; then the constraints adopt the unique
    # indexes (a catalog change) and the statistics are taken, again side by side.
    parallel(conns, [lambda c, s=s: c.execute(s) for s in builds])
    for statement in constraints:
        conns[0].execute(statement)
    parallel(conns, [lambda c, t=t: c.execute(f"ANALYZE {t}") for t in (REBUILD, STAGED, SECRETS_REBUILD)])


def _refold_keys(conn: psycopg.Connection[Any], keys: list[str], upto: int | None) -> int:
    """Replace the rebuilt rows, superseded secrets and staged versions of ``keys`` by a fresh fold of their
    whole streams (inside ``conn``'s transaction); returns how many events that read."""
    if not keys:
        return 0
    for statement in (DELETE_REBUILT, DELETE_REBUILT_SECRETS, DELETE_STAGED):
        conn.execute(statement, {"keys": keys})
    scope = sql.SQL("stream_id = ANY({})").format(sql.Literal(keys))
    if upto is not None:
        scope = sql.SQL("{} AND position <= {}").format(scope, sql.Literal(upto))
    _fold(conn, scope)
    return conn.execute(sql.SQL("SELECT count(*) FROM events WHERE {}").format(scope)).fetchone()[0]


def _sync_tracking(conn: psycopg.Connection[Any], projection: str) -> None:
    with conn.transaction():
        conn.execute("SET LOCAL work_mem = '64MB'")
        conn.execute(SYNC_TRACKING, {"p": projection})


def replay(database_url: str, projection: str = NAME, *, progress: bool = True, lock_timeout_ms: int = 500,
           swap_patience_s: float = 60.0, small_tail: int = 2000, jobs: int = 2) -> ReplayReport:
    if projection not in PROJECTIONS:
        raise ValueError(f"unknown projection {projection!r}")
    started = time.perf_counter()
    say = Progress(progress).say
    # `read` finds horizons and holds the replay lock; `conns` fold (conns[0] also swaps).
    with psycopg.connect(database_url, autocommit=True) as read:
        if not read.execute(REPLAY_LOCK).fetchone()[0]:
            raise RuntimeError("another replay is running (advisory lock keyledger.replay)")
        conns = [psycopg.connect(database_url, autocommit=True) for _ in range(max(1, jobs))]
        write = conns[0]
        try:
            horizon = final_horizon(read, max_wait=30.0)
            while horizon is None and read.execute(SEQUENCE_LAST_VALUE).fetchone()[0]:
                horizon = final_horizon(read, max_wait=30.0)
            horizon = horizon or 0
            write.execute(CREATE_REBUILD)
            say(f"folding the log up to position {horizon:,} on {len(conns)} connection(s)")
            _bulk(conns, horizon)
            keys, events = write.execute(COUNT_STAGED).fetchone()
            say(f"folded {events:,} events of {keys:,} keys; building indexes")
            _build_indexes(conns)

            # Catch up without any lock until the tail is small, then swap under the lock.
            attempts = 0
            tail_keys = 0
            lock_ms = 0.0
            lock_timeout_ms = max(1, min(lock_timeout_ms, write.execute(DEADLOCK_TIMEOUT_MS).fetchone()[0] // 2))  # 0: none
            give_up = time.monotonic() + swap_patience_s
            while True:
                nxt = final_horizon(read, max_wait=5.0)
                if nxt is not None and nxt > horizon:
                    touched = [r[0] for r in read.execute(TAIL_KEYS, (horizon, nxt)).fetchall()]
                    with write.transaction():
                        events += _refold_keys(write, touched, nxt)
                    horizon = nxt
                    if len(touched) > small_tail:
                        continue
                _sync_tracking(write, projection)
                attempts += 1
                try:
                    lock_ms, tail_keys = _swap(write, projection, horizon, lock_timeout_ms)
                    break
                except (psycopg.errors.LockNotAvailable, psycopg.errors.DeadlockDetected) as exc:
                    if time.monotonic() > give_up:
                        raise
                    print(f"replay: swap attempt {attempts} gave way ({type(exc).__name__}); retrying",
                          file=sys.stderr)
                    time.sleep(min(0.05 * attempts, 1.0))
            keys = write.execute(f"SELECT count(*) FROM {STAGED}").fetchone()[0]
            rows = write.execute(f"SELECT count(*) FROM {NAME}").fetchone()[0]
            secrets = write.execute(f"SELECT count(*) FROM {SECRETS}").fetchone()[0]
            say("swapped")
        finally:
            try:
                write.execute(DROP_SCRATCH)
            finally:
                for conn in conns:
                    conn.close()
                read.execute(REPLAY_UNLOCK)
    return ReplayReport(projection, events, keys, rows, tail_keys, time.perf_counter() - started, lock_ms,
                        attempts, secrets)


def _swap(write: psycopg.Connection[Any], projection: str, horizon: int, lock_timeout_ms: int) -> tuple[float, int]:
    with write.transaction():
        write.execute(f"SET LOCAL lock_timeout = '{int(lock_timeout_ms)}ms'")
        write.execute(LOCK_LIVE)
        locked = time.perf_counter()
        # Everything after the horizon that is committed now; the fold reads on the same connection so that
        # it sees exactly what this transaction sees.
        touched = [r[0] for r in write.execute(TAIL_KEYS_ALL, (horizon,)).fetchall()]
        if touched:
            _refold_keys(write, touched, None)
            write.execute(SET_TRACKING, {"p": projection, "keys": touched})
        renames = [r[0] for live in TABLES for r in write.execute(INDEXES, (live,)).fetchall()]
        for live, rebuild in ((NAME, REBUILD), (SECRETS, SECRETS_REBUILD)):
            write.execute(sql.SQL("DROP TABLE {}").format(sql.Identifier(live)))
            write.execute(sql.SQL("ALTER TABLE {} RENAME TO {}").format(sql.Identifier(rebuild), sql.Identifier(live)))
        for name in renames:
            write.execute(sql.SQL("ALTER INDEX {} RENAME TO {}").format(sql.Identifier(f"{name}_rebuild"),
                                                                         sql.Identifier(name)))
    return (time.perf_counter() - locked) * 1000, len(touched)
