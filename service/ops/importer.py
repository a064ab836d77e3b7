"""``keyledger import better-auth``: adopt an existing better-auth ``apikey`` table, keys and all.

    keyledger import better-auth --from postgresql://.../rybbit [--dry-run]

The target is keyledger's own database (``DATABASE_URL``, or the embedded one), exactly as for the other
commands. The source is any PostgreSQL database holding better-auth's ``apikey`` table, in either layout:

* better-auth <= 1.4: the owner is ``"userId"`` (there is no ``"configId"``; every key is ``"default"``);
* better-auth >= 1.5: the owner is ``"referenceId"`` (a user or an organization) and ``"configId"`` says which
  key configuration it belongs to.

The layout is detected from the table's columns (``information_schema``), never from a version number.

Every source row becomes one ``ApiKeyImported`` event at version 1 of a stream named by the row's own id, so
key ids do not change. The event carries the row's STORED hash (better-auth keeps ``base64url(sha256(key))``
in ``"key"``): the plaintext was never stored anywhere and is never needed, so existing keys keep working
without being reissued. The original ``"createdAt"`` becomes ``data.createdAt``; ``recorded_at`` is the
import time. Usage counters (``requestCount``, ``lastRequest``, ``lastRefillAt``) are not carried.

Idempotent: a row whose id already has a stream in ``events`` is reported as *already present* and left
alone (whatever happened to that key since: a key imported and then revoked is not resurrected). Two runs at
once are safe too: the ``(stream_id, version)`` unique index rejects the second insert of a stream; the
loser's batch is re-checked and the keys the winner wrote are skipped.

Rows that cannot be imported are never skipped silently: each is listed with its reason (missing or
malformed key hash, an id keyledger cannot use as a key id, invalid JSON in ``metadata``/``permissions``,
NUL characters, a number out of range, a hash already used by another key...).

Events reach NATS like every other event: the ``events`` trigger fills the outbox and the running service's
relay publishes them. Nothing here talks to NATS.

Exit status:
  0  every row was imported or was already present (also for ``--dry-run``: what *would* happen);
  1  at least one row was rejected (they are listed on stdout, ``rejected <id>: <reason>``);
  2  configuration problem (no ``apikey`` table, a layout without a key owner column, bad arguments);
  3  a database is unavailable.
"""

from __future__ import annotations

import datetime as dt
import re
import queue
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, TextIO

import msgspec
import psycopg
from psycopg import sql
from psycopg.types.array import ListBinaryDumper
from psycopg.types.string import StrBinaryDumper

from ..config import ConfigError
from ..core.events import ApiKeyImported, encode_data
from ..core.validation import KEY_ID_RE, MAX_DEPTH, TooDeep, has_nul
from ..storage.store import APPEND

SOURCE_NAME = "better-auth"
ACTOR_SOURCE = "better-auth import"
BATCH_SIZE = 1000
MAX_BATCH_ATTEMPTS = 8
WORKERS = 2  # target connections appending in parallel

# better-auth's stored key: base64url(sha256(key)) without padding, 43 characters.
HASH_RE = re.compile(r"[A-Za-z0-9_-]{43}")
INT4_MIN, INT4_MAX = -(2**31), 2**31 - 1
# Timestamps psycopg (and Python) can represent; anything else (infinity, year 10000+) is listed, not fatal.
TS_LOW, TS_HIGH = "0001-01-02", "9999-12-30"


# ----------------------------------------------------------------------------------------------------------
# The source: which layout, and one SELECT that reads either into the same shape
# ----------------------------------------------------------------------------------------------------------
# (output name, source column(s) in order of preference, kind). The kind decides the cast, so a table made by
# another adapter (jsonb metadata, timestamps without time zone, bigint counters) reads the same way.
FIELDS: list[tuple[str, tuple[str, ...], str]] = [
    ("id", ("id",), "text"),
    ("key", ("key",), "text"),
    ("owner", ("referenceId", "userId"), "text"),
    ("config_id", ("configId",), "text"),
    ("name", ("name",), "text"),
    ("start", ("start",), "text"),
    ("prefix", ("prefix",), "text"),
    ("enabled", ("enabled",), "bool"),
    ("expires_at", ("expiresAt",), "ts"),
    ("created_at", ("createdAt",), "ts"),
    ("metadata", ("metadata",), "text"),
    ("permissions", ("permissions",), "text"),
    ("rate_limit_enabled", ("rateLimitEnabled",), "bool"),
    ("rate_limit_time_window", ("rateLimitTimeWindow",), "int"),
    ("rate_limit_max", ("rateLimitMax",), "int"),
    ("remaining", ("remaining",), "int"),
    ("refill_amount", ("refillAmount",), "int"),
    ("refill_interval", ("refillInterval",), "int"),
]
COLUMN_INDEX = {name: i for i, (name, _, _) in enumerate(FIELDS)}
BAD_TS_INDEX = len(FIELDS)  # one extra column: the names of out-of-range timestamp columns

COLUMNS = """
SELECT column_name, data_type
FROM information_schema.columns
WHERE table_schema = coalesce(%(schema)s, current_schema()) AND table_name = %(table)s
"""


@dataclass(frozen=True)
class Layout:
    schema: str | None
    table: str
    columns: dict[str, str]  # name -> data_type

    @property
    def owner_column(self) -> str:
        return "referenceId" if "referenceId" in self.columns else "userId"

    @property
    def name(self) -> str:
        if "referenceId" in self.columns:
            return "better-auth >= 1.5 (referenceId, configId)"
        return "better-auth <= 1.4 (userId)"

    @property
    def qualified(self) -> str:
        return f"{self.schema}.{self.table}" if self.schema else self.table

    def _expr(self, kind: str, column: str) -> sql.Composable:
        ident = sql.Identifier(column)
        data_type = self.columns[column]
        if kind == "ts":
            # timestamps without time zone are taken as UTC (better-auth's servers run in UTC; Date -> UTC)
            value = sql.SQL("({} AT TIME ZONE 'UTC')").format(ident) if data_type.startswith(
                "timestamp without") else sql.SQL("{}::timestamptz").format(ident)
            return sql.SQL("CASE WHEN {v} BETWEEN {lo} AND {hi} THEN {v} END").format(
                v=value, lo=sql.Literal(TS_LOW + "T00:00:00Z"), hi=sql.Literal(TS_HIGH + "T00:00:00Z"))
        cast = {"text": "text", "bool": "boolean", "int": "bigint"}[kind]
        return sql.SQL("{}::{}").format(ident, sql.SQL(cast))

    def _bad_timestamps(self) -> sql.Composable:
        parts = []
        for _, candidates, kind in FIELDS:
            if kind != "ts":
                continue
            for column in candidates:
                if column in self.columns:
                    ident = sql.Identifier(column)
                    # isfinite() exists for both timestamp types; the range check catches year 10000+.
                    parts.append(sql.SQL(
                        "CASE WHEN {c} IS NOT NULL AND (NOT isfinite({c}) OR {c} NOT BETWEEN {lo} AND {hi}) "
                        "THEN {n} END").format(c=ident, lo=sql.Literal(TS_LOW), hi=sql.Literal(TS_HIGH),
                                               n=sql.Literal(column)))
                    break
        if not parts:
            return sql.SQL("NULL::text")
        return sql.SQL("concat_ws(', ', {})").format(sql.SQL(", ").join(parts))

    def select(self) -> sql.Composed:
        exprs: list[sql.Composable] = []
        for name, candidates, kind in FIELDS:
            present = [c for c in candidates if c in self.columns]
            if not present:
                exprs.append(sql.SQL("NULL"))
            elif len(present) == 1:
                exprs.append(self._expr(kind, present[0]))
            else:  # a table with both owner columns (mid-migration): prefer referenceId
                exprs.append(sql.SQL("coalesce({})").format(sql.SQL(", ").join(self._expr(kind, c) for c in present)))
        exprs.append(self._bad_timestamps())
        order = [sql.Identifier(c) for c in ("createdAt", "id") if c in self.columns]
        return sql.SQL("SELECT {} FROM {} ORDER BY {}").format(
            sql.SQL(", ").join(exprs), self._table_ident(), sql.SQL(", ").join(order))

    def count(self) -> sql.Composed:
        return sql.SQL("SELECT count(*) FROM {}").format(self._table_ident())

    def _table_ident(self) -> sql.Identifier:
        return sql.Identifier(self.schema, self.table) if self.schema else sql.Identifier(self.table)


def detect_layout(conn: psycopg.Connection[Any], table: str = "apikey") -> Layout:
    schema, _, name = table.rpartition(".")
    rows = conn.execute(COLUMNS, {"schema": schema or None, "table": name}).fetchall()
    columns = {r[0]: r[1] for r in rows}
    if not columns:
        raise ConfigError(f"the source database has no table {table!r} (better-auth's API-key table)")
    missing = [c for c in ("id", "key") if c not in columns]
    if "referenceId" not in columns and "userId" not in columns:
        missing.append("referenceId or userId")
    if missing:
        raise ConfigError(f"table {table!r} does not look like better-auth's apikey table: no {', '.join(missing)}")
    return Layout(schema=schema or None, table=name, columns=columns)


# ----------------------------------------------------------------------------------------------------------
# One source row -> one ApiKeyImported, or the reason it cannot be
# ----------------------------------------------------------------------------------------------------------
class Rejected(Exception):
    """This row cannot be imported; the message says why."""


_json = msgspec.json.Decoder()
_permissions_type = dict[str, list[str]]



def decode_json_text(text: str | None, field_name: str) -> Any:
    """better-auth stores ``metadata``/``permissions`` as TEXT holding JSON: ``NULL``, the string ``"null"``,
    an object, or (older versions, some adapters) that JSON encoded a second time as a JSON string. Unwrap up
    to three levels; empty text counts as no value."""
    value: Any = text
    for _ in range(3):
        if not isinstance(value, str):
            break
        stripped = value.strip()
        if not stripped:
            return None
        try:
            value = _json.decode(stripped)
        except (msgspec.DecodeError, RecursionError):
            raise Rejected(f"{field_name} is not valid JSON (or nests deeper than {MAX_DEPTH} levels)") from None
    if isinstance(value, str):
        raise Rejected(f"{field_name} is a JSON string nested too deep, not an object")
    try:
        nul = value is not None and has_nul(value)
    except TooDeep:
        raise Rejected(f"{field_name} nests deeper than {MAX_DEPTH} levels") from None
    if nul:
        raise Rejected(f"{field_name} contains NUL characters (PostgreSQL cannot store them)")
    return value


def _int(row: tuple[Any, ...], name: str) -> int | None:
    value = row[COLUMN_INDEX[name]]
    if value is not None and not INT4_MIN <= value <= INT4_MAX:
        raise Rejected(f"{name_of(name)} {value} is out of range (32-bit integer)")
    return value


def name_of(field_name: str) -> str:
    """The better-auth column name of one of our fields, for messages."""
    return {"owner": "referenceId/userId"}.get(field_name) or next(
        c[0] for n, c, _ in FIELDS if n == field_name)


def convert(row: tuple[Any, ...], *, owner_is_user: bool) -> ApiKeyImported:
    """The event for one source row (in ``Layout.select`` column order); ``Rejected`` says why not."""
    key_id, key_hash, owner = row[0], row[1], row[2]
    if not isinstance(key_id, str) or KEY_ID_RE.fullmatch(key_id) is None:
        raise Rejected("id is not a usable key id (1-128 of A-Z a-z 0-9 _ -)")
    if key_hash is None or key_hash == "":
        raise Rejected("missing key hash")
    if HASH_RE.fullmatch(key_hash) is None:
        raise Rejected(f"key is not a 43-character base64url SHA-256 hash (length {len(key_hash)}; "
                       "was the source configured with disableKeyHashing?)")
    if not owner:
        raise Rejected("missing owner (referenceId/userId)")
    if row[BAD_TS_INDEX]:
        raise Rejected(f"{row[BAD_TS_INDEX]} is not a representable timestamp (infinity or out of range)")
    metadata = decode_json_text(row[COLUMN_INDEX["metadata"]], "metadata")
    if metadata is not None and not isinstance(metadata, dict):
        raise Rejected(f"metadata is a JSON {type(metadata).__name__}, not an object")
    permissions = decode_json_text(row[COLUMN_INDEX["permissions"]], "permissions")
    if permissions is not None:
        try:
            permissions = msgspec.convert(permissions, _permissions_type)
        except msgspec.ValidationError:
            raise Rejected("permissions is not {resource: [actions]}") from None
    # (Plain text columns cannot hold NUL in PostgreSQL; only JSON's \u0000 escape can smuggle one in.)
    enabled = row[COLUMN_INDEX["enabled"]]
    rate_limit_enabled = row[COLUMN_INDEX["rate_limit_enabled"]]
    return ApiKeyImported(
        key_hash=key_hash,
        config_id=row[COLUMN_INDEX["config_id"]] or "default",
        reference_id=owner,
        user_id=owner if owner_is_user else None,
        name=row[COLUMN_INDEX["name"]],
        start=row[COLUMN_INDEX["start"]],
        prefix=row[COLUMN_INDEX["prefix"]],
        enabled=enabled is not False,  # better-auth refuses only enabled === false
        expires_at=row[COLUMN_INDEX["expires_at"]],
        metadata=metadata,
        permissions=permissions,
        rate_limit_enabled=bool(rate_limit_enabled),
        rate_limit_time_window=_int(row, "rate_limit_time_window"),
        rate_limit_max=_int(row, "rate_limit_max"),
        remaining=_int(row, "remaining"),
        refill_amount=_int(row, "refill_amount"),
        refill_interval=_int(row, "refill_interval"),
        source=SOURCE_NAME,
        created_at=row[COLUMN_INDEX["created_at"]],
    )


# ----------------------------------------------------------------------------------------------------------
# The target: per batch, classify against what is there, then append in one statement
# ----------------------------------------------------------------------------------------------------------
EXISTING_STREAMS = """
SELECT e.stream_id, e.type, e.data->>'keyHash'
FROM unnest(%s::text[]) AS k(stream_id)
JOIN events e ON e.stream_id = k.stream_id AND e.version = 1
"""
HASH_OWNERS = """
SELECT a.key_hash, a.id
FROM unnest(%s::text[]) AS h(key_hash)
JOIN active_api_keys a ON a.key_hash = h.key_hash
"""
SCHEMA_PRESENT = "SELECT to_regclass('events') IS NOT NULL AND to_regclass('active_api_keys') IS NOT NULL"


@dataclass
class ImportReport:
    layout: str = ""
    table: str = ""
    total: int = 0  # source rows
    imported: int = 0  # (would be) imported by this run
    already_present: int = 0
    rejected: list[tuple[str, str]] = field(default_factory=list)  # (id, reason), in source order
    dry_run: bool = False
    seconds: float = 0.0
    run_id: str = ""

    @property
    def exit_code(self) -> int:
        return 1 if self.rejected else 0

    def render(self, out: TextIO) -> None:
        for key_id, reason in self.rejected:
            out.write(f"rejected {key_id!r}: {reason}\n")
        verb = "would import" if self.dry_run else "imported"
        rate = self.total / self.seconds if self.seconds > 0 else 0.0
        out.write(
            f"{'DRY RUN: nothing written. ' if self.dry_run else ''}{self.total} rows read from {self.table} "
            f"({self.layout}) in {self.seconds:.2f}s ({rate:,.0f} rows/s), run {self.run_id}\n"
            f"  {verb + ':':<17}{self.imported}\n"
            f"  {'already present:':<17}{self.already_present}\n"
            f"  {'rejected:':<17}{len(self.rejected)}\n"
        )


class Progress:
    """A progress bar on a terminal; on anything else, a line every 10%."""

    def __init__(self, total: int, out: TextIO | None) -> None:
        self.total, self.out, self.done = total, out, 0
        self.tty = bool(out) and out.isatty()
        self.started = time.monotonic()
        self._last_draw = 0.0
        self._last_decile = -1

    def advance(self, n: int) -> None:
        self.done += n
        if not self.out:
            return
        now = time.monotonic()
        if self.tty:
            if now - self._last_draw >= 0.1 or self.done >= self.total:
                self._last_draw = now
                self.out.write("\r" + self._line(now))
                self.out.flush()
        else:
            decile = self.done * 10 // max(self.total, 1)
            if decile > self._last_decile:
                self._last_decile = decile
                self.out.write(self._line(now) + "\n")
                self.out.flush()

    def _line(self, now: float) -> str:
        fraction = self.done / self.total if self.total else 1.0
        width = 30
        filled = int(width * fraction)
        rate = self.done / (now - self.started) if now > self.started else 0.0
        return (f"importing [{'#' * filled}{'.' * (width - filled)}] {self.done:,}/{self.total:,} "
                f"{fraction:6.1%} {rate:,.0f} rows/s")

    def close(self) -> None:
        if self.out and self.tty:
            self.out.write("\n")
            self.out.flush()


# One batch on its way: ``seq`` orders the results; items are (id, event, encoded data) or (id, reason, None).
class _Batch(msgspec.Struct):
    seq: int
    items: list[tuple[str, Any, str | None]]


_DONE = None  # the end-of-input marker on the batch queue


def _binary_arrays(conn: psycopg.Connection[Any]) -> None:
    """Send this connection's list parameters in binary. psycopg dumps a ``list[str]`` as a text array literal
    by default, escaping every quote of every JSON document in Python: measured 50 ms of client CPU per
    1,000 events (5 s per 100,000 rows), against 0.3 ms in binary, and the server parses less too. Only
    this connection is affected; the statement (``store.APPEND``) is unchanged."""
    conn.adapters.register_dumper(str, StrBinaryDumper)
    conn.adapters.register_dumper(list, ListBinaryDumper)


class Unreachable(Exception):
    """The import could not connect to one of its two databases: ``which`` is ``"source"`` (better-auth's) or
    ``"target"`` (keyledger's); ``reason`` is the driver's message on one line. ``url`` is as given: redact it
    before showing it (``config.redact_conninfo``)."""

    def __init__(self, which: str, url: str, cause: BaseException) -> None:
        self.which, self.url, self.reason = which, url, " ".join(str(cause).split())
        super().__init__(f"cannot reach the {which} database: {self.reason}")


def connect(url: str, which: str, **kwargs: Any) -> psycopg.Connection[Any]:
    """``psycopg.connect``, where a failure to connect says which database it was (``Unreachable``)."""
    try:
        return psycopg.connect(url, **kwargs)
    except psycopg.OperationalError as exc:
        raise Unreachable(which, url, exc) from exc


class _Run:
    """One import: a reader thread (source rows -> events, checks that need no database) feeding ``workers``
    appender threads, each with its own target connection (the target's per-row work, the events triggers and
    the projection function, is what costs; two backends use both cores)."""

    def __init__(self, source_url: str, target_url: str, *, dry_run: bool, batch_size: int, table: str,
                 workers: int, progress: TextIO | None) -> None:
        self.source_url, self.target_url, self.table = source_url, target_url, table
        self.dry_run, self.batch_size, self.workers = dry_run, batch_size, workers
        self.progress_out = progress
        self.report = ImportReport(dry_run=dry_run, run_id=str(uuid.uuid4()))
        self.metadata = msgspec.json.encode(
            {"userId": None, "source": ACTOR_SOURCE, "requestId": self.report.run_id}).decode()
        self.batches: queue.Queue[_Batch | None] = queue.Queue(maxsize=2 * workers + 2)
        self.stop = threading.Event()
        self.lock = threading.Lock()
        self.errors: list[BaseException] = []
        self.results: dict[int, list[tuple[str, str | None]]] = {}  # seq -> (id, outcome) in source order
        self.schema_present = True
        self.bar: Progress | None = None
        self._local = threading.local()  # per appender: did its last batch meet a conflict?

    # -- the reader ---------------------------------------------------------------------------------------
    def read(self) -> None:
        try:
            with connect(self.source_url, "source", autocommit=False) as conn:
                conn.read_only = True
                conn.isolation_level = psycopg.IsolationLevel.REPEATABLE_READ  # count and rows: one snapshot
                layout = detect_layout(conn, self.table)
                total = conn.execute(layout.count()).fetchone()[0]
                self.report.layout, self.report.table, self.report.total = layout.name, layout.qualified, total
                self.bar = Progress(total, self.progress_out)
                owner_is_user = layout.owner_column == "userId"
                ids_seen: set[str] = set()
                hashes_seen: dict[str, str] = {}  # first row (in createdAt order) with a hash wins
                with conn.cursor(name=f"keyledger_import_{uuid.uuid4().hex[:8]}") as cur:
                    cur.itersize = self.batch_size
                    cur.execute(layout.select())
                    seq = 0
                    while not self.stop.is_set():
                        rows = cur.fetchmany(self.batch_size)
                        if not rows:
                            break
                        items: list[tuple[str, Any, str | None]] = []
                        for row in rows:
                            key_id = row[0] if isinstance(row[0], str) else str(row[0])
                            try:
                                event = convert(row, owner_is_user=owner_is_user)
                            except Rejected as exc:
                                items.append((key_id, str(exc), None))
                                continue
                            if key_id in ids_seen:
                                items.append((key_id, "duplicate id in the source table", None))
                                continue
                            ids_seen.add(key_id)
                            first = hashes_seen.setdefault(event.key_hash, key_id)
                            if first != key_id:
                                items.append((key_id, f"key hash is already used by key {first!r}", None))
                                continue
                            items.append((key_id, event, encode_data(event).decode()))
                        self._put(_Batch(seq, items))
                        seq += 1
                conn.rollback()
        except BaseException as exc:  # noqa: BLE001 - handed to run(), which re-raises it
            self._fail(exc)
        finally:
            for _ in range(self.workers):
                self._put(_DONE, force=True)

    def _put(self, item: _Batch | None, force: bool = False) -> None:
        while True:
            if self.stop.is_set() and not force:
                return
            try:
                self.batches.put(item, timeout=0.1)
                return
            except queue.Full:
                if self.stop.is_set() and force:
                    return  # nobody is left to read it
                continue

    def _fail(self, exc: BaseException) -> None:
        with self.lock:
            self.errors.append(exc)
        self.stop.set()

    # -- the appenders ------------------------------------------------------------------------------------
    def append_worker(self) -> None:
        try:
            with connect(self.target_url, "target", autocommit=True) as target:
                _binary_arrays(target)
                while not self.stop.is_set():
                    batch = self.batches.get()
                    if batch is _DONE:
                        return
                    outcome = self._flush(target, batch)
                    with self.lock:
                        self.results[batch.seq] = outcome
                        if self.bar is not None:
                            self.bar.advance(len(batch.items))
        except BaseException as exc:  # noqa: BLE001
            self._fail(exc)

    def _flush(self, target: psycopg.Connection[Any], batch: _Batch) -> list[tuple[str, str | None]]:
        """Classify one batch against the target and append what is new; returns (id, outcome) per row, the
        outcome being ``IMPORTED``, ``PRESENT`` or the reason of a rejection."""
        # Optimistic first: on a fresh import nothing is there, and the two lookups cost the server about as
        # much as a tenth of the append. The unique indexes say when something is there after all (a re-run,
        # a concurrent run, a native key with the same id or hash): then look, classify, retry. A worker that
        # just met a conflict looks first for its next batch (a re-run conflicts on every batch).
        for attempt in range(1, MAX_BATCH_ATTEMPTS + 1):
            candidates = [(k, e, d) for k, e, d in batch.items if d is not None]
            look = self.dry_run or attempt > 1 or getattr(self._local, "conflicted", False)
            present, hash_owner = self._lookup(target, candidates) if look else ({}, {})
            outcome: list[tuple[str, str | None]] = []
            to_append: list[tuple[str, str]] = []
            for key_id, item, data in batch.items:
                if data is None:
                    outcome.append((key_id, item))
                    continue
                existing = present.get(key_id)
                if existing is not None:
                    etype, ehash = existing
                    if etype == "ApiKeyImported" or ehash == item.key_hash:
                        outcome.append((key_id, PRESENT))
                    else:
                        outcome.append((key_id, "id already names a different keyledger key"))
                    continue
                owner = hash_owner.get(item.key_hash)
                if owner is not None and owner != key_id:
                    outcome.append((key_id, f"key hash is already used by key {owner!r}"))
                    continue
                outcome.append((key_id, IMPORTED))
                to_append.append((key_id, data))
            if not to_append or self.dry_run:
                return outcome
            try:
                self._append(target, to_append)
                self._local.conflicted = False
                return outcome
            except psycopg.errors.UniqueViolation:
                self._local.conflicted = True
                # Another run (or a create) wrote one of these ids or hashes after our check and before our
                # insert: nothing of this batch was written. Look again; skip what is there now.
                if attempt == MAX_BATCH_ATTEMPTS:
                    raise
        raise AssertionError("unreachable")

    def _lookup(self, target: psycopg.Connection[Any], rows: list[tuple[str, Any, str | None]]
                ) -> tuple[dict[str, tuple[str, str]], dict[str, str]]:
        if not rows or not self.schema_present:
            return {}, {}
        present = {r[0]: (r[1], r[2]) for r in target.execute(EXISTING_STREAMS, ([k for k, _, _ in rows],))}
        owners = dict(target.execute(HASH_OWNERS, ([e.key_hash for _, e, _ in rows],)).fetchall())
        return present, owners

    def _append(self, target: psycopg.Connection[Any], rows: list[tuple[str, str]]) -> None:
        n = len(rows)
        at = dt.datetime.now(dt.timezone.utc)
        params = {
            "id": [uuid.uuid4() for _ in range(n)],
            "stream": [k for k, _ in rows],
            "version": [1] * n,
            "type": ["ApiKeyImported"] * n,
            "data": [d for _, d in rows],
            "metadata": [self.metadata] * n,
            "at": [at] * n,
        }
        # One statement, so one transaction: the events, their outbox rows and the projection rows commit
        # together or not at all.
        target.execute(APPEND, params).fetchall()

    # -- the whole run ------------------------------------------------------------------------------------
    def run(self) -> ImportReport:
        started = time.monotonic()
        with connect(self.target_url, "target", autocommit=True) as target:
            self.schema_present = bool(target.execute(SCHEMA_PRESENT).fetchone()[0])
        if not self.schema_present and not self.dry_run:
            raise ConfigError("the target database has no keyledger schema: run `keyledger migrate` first")
        threads = [threading.Thread(target=self.read, name="keyledger-import-reader", daemon=True)]
        threads += [threading.Thread(target=self.append_worker, name=f"keyledger-import-{i}", daemon=True)
                    for i in range(self.workers)]
        for t in threads:
            t.start()
        try:
            for t in threads:
                t.join()
        except BaseException:
            self.stop.set()  # Ctrl-C: let the threads see it; each batch in flight is one transaction
            raise
        finally:
            if self.bar is not None:
                self.bar.close()
        if self.errors:
            raise self.errors[0]
        for seq in sorted(self.results):
            for key_id, result in self.results[seq]:
                if result is IMPORTED:
                    self.report.imported += 1
                elif result is PRESENT:
                    self.report.already_present += 1
                else:
                    self.report.rejected.append((key_id, result))
        self.report.seconds = time.monotonic() - started
        return self.report


IMPORTED = "<imported>"
PRESENT = "<already present>"


def run_import(source_url: str, target_url: str, *, dry_run: bool = False, batch_size: int = BATCH_SIZE,
               table: str = "apikey", workers: int = WORKERS, progress: TextIO | None = None) -> ImportReport:
    """Import better-auth's ``apikey`` rows from ``source_url`` into keyledger at ``target_url``.

    The target must have keyledger's schema (``migrate``) unless ``dry_run``, which only reads (a target
    without the schema then counts as empty). ``progress``: where the progress bar goes (None: nowhere).
    """
    return _Run(source_url, target_url, dry_run=dry_run, batch_size=batch_size, table=table,
                workers=max(1, workers), progress=progress).run()
