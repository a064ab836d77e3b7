-- keyledger schema. Applied at every start; every statement is idempotent.
--
-- Two groups of tables live here:
--   * better-auth's own tables ("user", session, organization, member), created only if absent so keyledger
--     can point at an existing Rybbit database and read its sessions unchanged;
--   * keyledger's tables: the append-only event log (the source of truth), the outbox that guarantees every
--     event reaches NATS, and the projections derived from the log.

-- ---------------------------------------------------------------------------------------------------------
-- better-auth tables (quoted camelCase columns, as better-auth's Postgres adapter creates them)
-- ---------------------------------------------------------------------------------------------------------
CREATE TABLE IF NOT EXISTS "user" (
    id              text PRIMARY KEY,
    name            text NOT NULL,
    email           text NOT NULL UNIQUE,
    "emailVerified" boolean NOT NULL DEFAULT false,
    image           text,
    "createdAt"     timestamptz NOT NULL DEFAULT now(),
    "updatedAt"     timestamptz NOT NULL DEFAULT now()
);
-- The admin plugin's ban columns; Rybbit has them, a plain better-auth database may not.
ALTER TABLE "user" ADD COLUMN IF NOT EXISTS role text;
ALTER TABLE "user" ADD COLUMN IF NOT EXISTS banned boolean;
ALTER TABLE "user" ADD COLUMN IF NOT EXISTS "banReason" text;
ALTER TABLE "user" ADD COLUMN IF NOT EXISTS "banExpires" timestamptz;

CREATE TABLE IF NOT EXISTS session (
    id           text PRIMARY KEY,
    "expiresAt"  timestamptz NOT NULL,
    token        text NOT NULL UNIQUE,
    "createdAt"  timestamptz NOT NULL DEFAULT now(),
    "updatedAt"  timestamptz NOT NULL DEFAULT now(),
    "ipAddress"  text,
    "userAgent"  text,
    "userId"     text NOT NULL REFERENCES "user"(id) ON DELETE CASCADE
);

-- better-auth's organization plugin: who may manage an organization's keys (role owner or admin; a member's
-- role may be a comma-separated list).
CREATE TABLE IF NOT EXISTS organization (
    id          text PRIMARY KEY,
    name        text NOT NULL,
    slug        text UNIQUE,
    logo        text,
    "createdAt" timestamptz NOT NULL DEFAULT now(),
    metadata    text
);
CREATE TABLE IF NOT EXISTS member (
    id               text PRIMARY KEY,
    "organizationId" text NOT NULL REFERENCES organization(id) ON DELETE CASCADE,
    "userId"         text NOT NULL REFERENCES "user"(id) ON DELETE CASCADE,
    role             text NOT NULL,
    "createdAt"      timestamptz NOT NULL DEFAULT now()
);

-- ---------------------------------------------------------------------------------------------------------
-- The event log: one append-only table, message-db style.
--   position: global order of insertion, NOT of commit (a later position can commit first). Nothing tails it
--     blindly: the relay reads the outbox instead, and the audit sealer waits for lower positions to resolve.
--   (stream_id, version) unique: the optimistic-concurrency check. stream_id is the API key's id.
-- ---------------------------------------------------------------------------------------------------------
CREATE SEQUENCE IF NOT EXISTS events_position_seq AS bigint;
CREATE TABLE IF NOT EXISTS events (
    position     bigint      NOT NULL PRIMARY KEY,  -- set by the events_position trigger, never by writers
    id           uuid        NOT NULL UNIQUE,
    stream_id    text        NOT NULL,
    version      integer     NOT NULL CHECK (version > 0),
    type         text        NOT NULL,
    data         jsonb       NOT NULL,
    metadata     jsonb       NOT NULL DEFAULT '{}'::jsonb,
    recorded_at  timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT events_stream_version_key UNIQUE (stream_id, version)
);
ALTER SEQUENCE events_position_seq OWNED BY events.position;

-- Every writer's transaction id is assigned *before* it draws a position. So once every transaction that was
-- running when the sequence stood at L has ended, no position <= L can still appear: that is the horizon the
-- audit sealer uses to chain events in position order without ever skipping a late committer.
CREATE OR REPLACE FUNCTION keyledger_events_position() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_current_xact_id();
    NEW.position := nextval('events_position_seq');
    RETURN NEW;
END $$;
CREATE OR REPLACE TRIGGER events_position BEFORE INSERT ON events
    FOR EACH ROW EXECUTE FUNCTION keyledger_events_position();
CREATE INDEX IF NOT EXISTS events_recorded_at_idx ON events (recorded_at);

-- Append-only even for the table owner: triggers fire for owners too (only a superuser disabling triggers
-- gets past this, which the audit hash chain is there to catch).
CREATE OR REPLACE FUNCTION keyledger_events_append_only() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION '% is append-only: % refused', TG_TABLE_NAME, TG_OP USING ERRCODE = 'insufficient_privilege';
END $$;

CREATE OR REPLACE TRIGGER events_no_update_delete BEFORE UPDATE OR DELETE ON events
    FOR EACH ROW EXECUTE FUNCTION keyledger_events_append_only();

CREATE OR REPLACE TRIGGER events_no_truncate BEFORE TRUNCATE ON events
    FOR EACH STATEMENT EXECUTE FUNCTION keyledger_events_append_only();
REVOKE UPDATE, DELETE, TRUNCATE ON events FROM PUBLIC;

-- ---------------------------------------------------------------------------------------------------------
-- The outbox: one row per event not yet acknowledged by JetStream.
-- Filled by a trigger, so *every* writer of the log (HTTP handlers, CLI import, sweepers, psql) gets its events
-- published: it is impossible to commit an event without committing its outbox row in the same transaction.
-- The relay deletes a row only after JetStream acknowledged the event. It reads "all rows present", never
-- "rows after the last position I saw", so a transaction that took a lower position but committed later is
-- simply picked up on the next pass: the gap problem of tailing a sequence cannot lose an event here.
-- ---------------------------------------------------------------------------------------------------------
CREATE TABLE IF NOT EXISTS outbox (
    position bigint PRIMARY KEY
);
-- A queue table: every row is deleted soon after insert. Vacuum it eagerly so the relay's scans never wade
-- through thousands of dead tuples at high revoke rates.
ALTER TABLE outbox SET (autovacuum_vacuum_scale_factor = 0, autovacuum_vacuum_threshold = 500,
                        autovacuum_vacuum_cost_delay = 0, autovacuum_analyze_scale_factor = 0,
                        autovacuum_analyze_threshold = 500);
CREATE OR REPLACE FUNCTION keyledger_events_to_outbox() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO outbox (position) VALUES (NEW.position);
    RETURN NULL;
END $$;

CREATE OR REPLACE TRIGGER events_to_outbox AFTER INSERT ON events
    FOR EACH ROW EXECUTE FUNCTION keyledger_events_to_outbox();

-- ---------------------------------------------------------------------------------------------------------
-- Projections. Each projection records, per key, the last version it applied (projection_tracking), in the
-- same transaction as its update: that is what makes redelivered or reordered NATS messages harmless.
-- ---------------------------------------------------------------------------------------------------------
CREATE TABLE IF NOT EXISTS projection_tracking (
    projection text    NOT NULL,
    stream_id  text    NOT NULL,
    version    integer NOT NULL,
    PRIMARY KEY (projection, stream_id)
);

-- Advance a projection's tracking for one key from version-1 to version, or fail with SQLSTATE KL409.
-- The failure aborts the surrounding transaction, so a projection update can never commit out of order.
CREATE OR REPLACE FUNCTION keyledger_advance(p_projection text, p_stream_id text, p_version integer)
RETURNS void LANGUAGE plpgsql AS $$
BEGIN
    IF p_version = 1 THEN
        INSERT INTO projection_tracking (projection, stream_id, version)
        VALUES (p_projection, p_stream_id, 1)
        ON CONFLICT DO NOTHING;
    ELSE
        UPDATE projection_tracking SET version = p_version
        WHERE projection = p_projection AND stream_id = p_stream_id AND version = p_version - 1;
    END IF;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'projection % is not at version % of %', p_projection, p_version - 1, p_stream_id
            USING ERRCODE = 'KL409';
    END IF;
END $$;

-- The active-key table: keys that exist (created and not revoked), whatever their enabled/expiry state,
-- because get/list show disabled and expired keys and verify must tell KEY_DISABLED from INVALID_API_KEY.
-- Verification reads it by hash. It only ever holds hashes, never a plaintext key.
-- The indexed text columns use the "C" collation: they are only ever compared for equality (ids, hashes),
-- so a locale's order buys nothing, while "C" sorts several times faster (memcmp, abbreviated keys), which is
-- most of the index builds that `keyledger replay` does (measured there: 0.80 s -> 0.4 s over 300k keys).
CREATE TABLE IF NOT EXISTS active_api_keys (
    id                       text COLLATE "C" PRIMARY KEY,
    key_hash                 text COLLATE "C" NOT NULL UNIQUE,
    config_id                text COLLATE "C" NOT NULL DEFAULT 'default',
    reference_id             text COLLATE "C" NOT NULL,
    name                     text,
    start                    text,
    prefix                   text,
    enabled                  boolean     NOT NULL DEFAULT true,
    expires_at               timestamptz,
    rate_limit_enabled       boolean     NOT NULL DEFAULT false,
    rate_limit_time_window   integer,
    rate_limit_max           integer,
    refill_interval          integer,
    refill_amount            integer,
    remaining                integer,
    permissions              jsonb,
    metadata                 jsonb,
    created_at               timestamptz NOT NULL,
    updated_at               timestamptz NOT NULL,
    version                  integer     NOT NULL
);
CREATE INDEX IF NOT EXISTS active_api_keys_owner_idx ON active_api_keys (reference_id, config_id, created_at);
-- The version of the event that last set `remaining`: the usage counter restarts from it (api_key_usage).
ALTER TABLE active_api_keys ADD COLUMN IF NOT EXISTS remaining_version integer;
-- ApiKeyExpired recorded for the current deadline; the expiry sweeper looks for passed deadlines without it.
ALTER TABLE active_api_keys ADD COLUMN IF NOT EXISTS expired boolean NOT NULL DEFAULT false;
CREATE INDEX IF NOT EXISTS active_api_keys_expiry_idx ON active_api_keys (expires_at) WHERE NOT expired;

-- Part of the same projection: the secrets a rotation superseded that are still inside their grace period.
-- Verify looks a hash up in active_api_keys first, then here (valid only while valid_until > now, whether or
-- not the sweeper has recorded ApiKeySecretRetired yet). A row leaves on ApiKeySecretRetired or ApiKeyRevoked.
CREATE TABLE IF NOT EXISTS superseded_key_secrets (
    key_hash    text COLLATE "C" PRIMARY KEY,
    key_id      text COLLATE "C" NOT NULL,
    start       text,
    valid_until timestamptz NOT NULL
);
CREATE INDEX IF NOT EXISTS superseded_key_secrets_key_idx ON superseded_key_secrets (key_id);
CREATE INDEX IF NOT EXISTS superseded_key_secrets_due_idx ON superseded_key_secrets (valid_until);

-- Databases created before the "C" collation above: convert once (rebuilds these tables' indexes only).
DO $$
BEGIN
    IF EXISTS (SELECT 1 FROM pg_attribute a JOIN pg_collation c ON c.oid = a.attcollation
               WHERE a.attrelid = 'active_api_keys'::regclass AND a.attname = 'id' AND c.collname <> 'C') THEN
        ALTER TABLE active_api_keys ALTER COLUMN id TYPE text COLLATE "C",
            ALTER COLUMN key_hash TYPE text COLLATE "C", ALTER COLUMN config_id TYPE text COLLATE "C",
            ALTER COLUMN reference_id TYPE text COLLATE "C";
    END IF;
    IF EXISTS (SELECT 1 FROM pg_attribute a JOIN pg_collation c ON c.oid = a.attcollation
               WHERE a.attrelid = 'superseded_key_secrets'::regclass AND a.attname = 'key_id'
                 AND c.collname <> 'C') THEN
        ALTER TABLE superseded_key_secrets ALTER COLUMN key_hash TYPE text COLLATE "C",
            ALTER COLUMN key_id TYPE text COLLATE "C";
    END IF;
END $$;

-- The active_api_keys projection, as one function that applies one event. It has two call sites and no twin:
-- the append statement (store.py) calls it inline, in the transaction that records the event, and the NATS
-- subscriber (projections/active_keys.py) calls it for events it finds the projection has not seen yet.
-- keyledger_advance at the end makes a second or out-of-order application abort the transaction.
CREATE OR REPLACE FUNCTION keyledger_project_active_key(
    p_stream_id text, p_version integer, p_type text, p_data jsonb, p_at timestamptz)
RETURNS void LANGUAGE plpgsql AS $$
BEGIN
    CASE p_type
    WHEN 'ApiKeyCreated', 'ApiKeyImported' THEN  -- an imported key keeps its original creation time
        INSERT INTO active_api_keys (
            id, key_hash, config_id, reference_id, name, start, prefix, enabled, expires_at,
            rate_limit_enabled, rate_limit_time_window, rate_limit_max, refill_interval, refill_amount,
            remaining, permissions, metadata, created_at, updated_at, version, remaining_version)
        VALUES (
            p_stream_id, p_data->>'keyHash', coalesce(p_data->>'configId', 'default'), p_data->>'referenceId',
            p_data->>'name', p_data->>'start', p_data->>'prefix', coalesce((p_data->>'enabled')::boolean, true),
            (p_data->>'expiresAt')::timestamptz, coalesce((p_data->>'rateLimitEnabled')::boolean, false),
            (p_data->>'rateLimitTimeWindow')::integer, (p_data->>'rateLimitMax')::integer,
            (p_data->>'refillInterval')::integer, (p_data->>'refillAmount')::integer,
            (p_data->>'remaining')::integer, nullif(p_data->'permissions', 'null'::jsonb),
            nullif(p_data->'metadata', 'null'::jsonb), coalesce((p_data->>'createdAt')::timestamptz, p_at), p_at,
            p_version, p_version);
    WHEN 'ApiKeyUpdated' THEN  -- carries only the fields that changed
        UPDATE active_api_keys SET
            name       = CASE WHEN p_data ? 'name' THEN p_data->>'name' ELSE name END,
            expires_at = CASE WHEN p_data ? 'expiresAt' THEN (p_data->>'expiresAt')::timestamptz ELSE expires_at END,
            expired    = CASE WHEN p_data ? 'expiresAt' THEN false ELSE expired END,
            metadata   = CASE WHEN p_data ? 'metadata' THEN nullif(p_data->'metadata', 'null'::jsonb) ELSE metadata END,
            permissions = CASE WHEN p_data ? 'permissions' THEN nullif(p_data->'permissions', 'null'::jsonb)
                               ELSE permissions END,
            remaining  = CASE WHEN p_data ? 'remaining' THEN (p_data->>'remaining')::integer ELSE remaining END,
            remaining_version = CASE WHEN p_data ? 'remaining' THEN p_version ELSE remaining_version END,
            refill_amount = CASE WHEN p_data ? 'refillAmount' THEN (p_data->>'refillAmount')::integer
                                 ELSE refill_amount END,
            refill_interval = CASE WHEN p_data ? 'refillInterval' THEN (p_data->>'refillInterval')::integer
                                   ELSE refill_interval END,
            rate_limit_enabled = CASE WHEN p_data ? 'rateLimitEnabled' THEN (p_data->>'rateLimitEnabled')::boolean
                                      ELSE rate_limit_enabled END,
            rate_limit_time_window = CASE WHEN p_data ? 'rateLimitTimeWindow'
                                          THEN (p_data->>'rateLimitTimeWindow')::integer ELSE rate_limit_time_window END,
            rate_limit_max = CASE WHEN p_data ? 'rateLimitMax' THEN (p_data->>'rateLimitMax')::integer
                                  ELSE rate_limit_max END,
            updated_at = p_at, version = p_version
        WHERE id = p_stream_id;
    WHEN 'ApiKeyExpired' THEN  -- the row stays (get/list show it, verify says KEY_EXPIRED)
        UPDATE active_api_keys SET expired = true, updated_at = p_at, version = p_version WHERE id = p_stream_id;
    WHEN 'ApiKeyDisabled', 'ApiKeyEnabled' THEN
        UPDATE active_api_keys SET enabled = (p_type = 'ApiKeyEnabled'), updated_at = p_at, version = p_version
        WHERE id = p_stream_id;
    WHEN 'ApiKeyRotated' THEN  -- a new secret; the old one stays valid until graceUntil (if any)
        INSERT INTO superseded_key_secrets (key_hash, key_id, start, valid_until)
        SELECT p_data->>'previousKeyHash', p_stream_id, p_data->>'previousStart', (p_data->>'graceUntil')::timestamptz
        WHERE p_data->>'graceUntil' IS NOT NULL;
        UPDATE active_api_keys SET key_hash = p_data->>'keyHash', start = p_data->>'start', updated_at = p_at,
                                   version = p_version
        WHERE id = p_stream_id;
    WHEN 'ApiKeySecretRetired' THEN
        DELETE FROM superseded_key_secrets WHERE key_hash = p_data->>'keyHash' AND key_id = p_stream_id;
        UPDATE active_api_keys SET updated_at = p_at, version = p_version WHERE id = p_stream_id;
    WHEN 'ApiKeyRevoked' THEN
        DELETE FROM superseded_key_secrets WHERE key_id = p_stream_id;
        DELETE FROM active_api_keys WHERE id = p_stream_id;
    ELSE
        NULL;  -- an event type this projection does not care about still advances its tracking
    END CASE;
    PERFORM keyledger_advance('active_api_keys', p_stream_id, p_version);
END $$;

-- ---------------------------------------------------------------------------------------------------------
-- Usage counters: not events (they change on every verify), so not in the log and left alone by replay.
-- One row per key that has a usage limit or a rate limit, updated atomically by keyledger_verify_key under a
-- row lock: concurrent verifies never lose a count or take `remaining` below zero. Keys without limits get a
-- row too, for their `last_request` only, written in batches by the service (keyledger_touch_keys).
-- ---------------------------------------------------------------------------------------------------------
CREATE TABLE IF NOT EXISTS api_key_usage (
    key_id         text PRIMARY KEY,
    remaining      integer,                   -- the live count of a usage-limited key
    remaining_from integer,                   -- active_api_keys.remaining_version the count started from
    last_refill_at timestamptz,
    request_count  integer NOT NULL DEFAULT 0, -- requests in the current rate-limit window
    last_request   timestamptz
);
-- Every counted verify updates one of these rows. Free room on each page keeps those updates HOT (no new index
-- entry; the page prunes its own dead versions), which matters where autovacuum is off or slow.
ALTER TABLE api_key_usage SET (fillfactor = 50);

-- Verify used to take two statements (a lookup, then this function); keyledger_verify_key is both.
DROP FUNCTION IF EXISTS keyledger_use_key(text, timestamptz);

-- Verify in ONE statement (one round trip, one transaction), whatever the key:
--   1. find it by hash: the current secret (active_api_keys), else a superseded secret still inside its grace
--      period, as the same key (same record, same checks, same counters; grace_until says it matched so);
--   2. refuse it in better-auth's order: KEY_DISABLED, KEY_EXPIRED, then KEY_NOT_FOUND when p_wanted (the
--      requested permissions, {"resource": ["action", ...]}) is not contained in the key's permissions, or is
--      empty, or asks for a resource with no action (better-auth's authorize refuses those too);
--   3. only for a key with a usage or a rate limit, count the use under a row lock on its api_key_usage row,
--      with better-auth's semantics: a usage limit (`remaining`, refilled to `refillAmount` every
--      `refillInterval` ms once exhausted) and a rate limit (`rateLimitMax` requests per `rateLimitTimeWindow`
--      ms, the window counted from the last request); USAGE_EXCEEDED, or RATE_LIMITED with try_again_in (ms).
--      An event that sets `remaining` restarts the count from its value (remaining_from).
-- code is NULL when the key is valid (and its use counted); the record's columns follow in
-- records.LIVE_COLUMNS' order, `remaining` and the counters live (ignore them when code is set). A key without
-- limits is one index read, writes nothing here and comes back with its counters unread: the service batches
-- its lastRequest (keyledger_touch_keys). Plain variables, no active_api_keys%ROWTYPE: replay swaps that table.
CREATE OR REPLACE FUNCTION keyledger_verify_key(p_hash text, p_now timestamptz, p_wanted jsonb,
    OUT code text, OUT try_again_in bigint, OUT grace_until timestamptz,
    OUT id text, OUT config_id text, OUT name text, OUT start text, OUT reference_id text, OUT prefix text,
    OUT refill_interval integer, OUT refill_amount integer, OUT enabled boolean, OUT rate_limit_enabled boolean,
    OUT rate_limit_time_window integer, OUT rate_limit_max integer, OUT remaining integer,
    OUT expires_at timestamptz, OUT created_at timestamptz, OUT updated_at timestamptz, OUT permissions jsonb,
    OUT metadata jsonb, OUT last_refill_at timestamptz, OUT request_count integer, OUT last_request timestamptz)
LANGUAGE plpgsql AS $$
DECLARE
    remaining_version integer;
    u api_key_usage%ROWTYPE;
    since_ms double precision;
BEGIN
    SELECT a.id, a.config_id, a.name, a.start, a.reference_id, a.prefix, a.refill_interval, a.refill_amount,
           a.enabled, a.rate_limit_enabled, a.rate_limit_time_window, a.rate_limit_max, a.remaining, a.expires_at,
           a.created_at, a.updated_at, a.permissions, a.metadata, a.remaining_version
    INTO id, config_id, name, start, reference_id, prefix, refill_interval, refill_amount,
         enabled, rate_limit_enabled, rate_limit_time_window, rate_limit_max, remaining, expires_at,
         created_at, updated_at, permissions, metadata, remaining_version
    FROM active_api_keys a WHERE a.key_hash = p_hash;
    -- Not a current secret: perhaps a superseded one. A separate statement rather than a UNION in the first:
    -- that would open three more relations on every verify, for a case that is rare. Its deadline counts to
    -- the millisecond, as graceUntil is reported, so the secret stops at the very instant it says.
    IF NOT FOUND THEN
        SELECT a.id, a.config_id, a.name, a.start, a.reference_id, a.prefix, a.refill_interval, a.refill_amount,
               a.enabled, a.rate_limit_enabled, a.rate_limit_time_window, a.rate_limit_max, a.remaining,
               a.expires_at, a.created_at, a.updated_at, a.permissions, a.metadata, a.remaining_version,
               date_trunc('milliseconds', s.valid_until)
        INTO id, config_id, name, start, reference_id, prefix, refill_interval, refill_amount,
             enabled, rate_limit_enabled, rate_limit_time_window, rate_limit_max, remaining, expires_at,
             created_at, updated_at, permissions, metadata, remaining_version, grace_until
        FROM superseded_key_secrets s JOIN active_api_keys a ON a.id = s.key_id
        WHERE s.key_hash = p_hash AND date_trunc('milliseconds', s.valid_until) > p_now;
    END IF;
    IF NOT FOUND THEN
        code := 'INVALID_API_KEY';
    ELSIF NOT enabled THEN
        code := 'KEY_DISABLED';
    ELSIF expires_at <= p_now THEN
        code := 'KEY_EXPIRED';
    ELSIF p_wanted IS NOT NULL AND (p_wanted = '{}'::jsonb OR NOT coalesce(permissions, '{}') @> p_wanted
                                    OR EXISTS (SELECT 1 FROM jsonb_each(p_wanted) w
                                               WHERE jsonb_array_length(w.value) = 0)) THEN
        code := 'KEY_NOT_FOUND';  -- better-auth's authorize: all of it, and never an empty request
    END IF;
    request_count := 0;
    IF code IS NOT NULL OR (remaining IS NULL AND NOT rate_limit_enabled) THEN
        RETURN;  -- refused, or valid without limits: nothing to count
    END IF;

    -- Counters, unlike events, do not wait for their WAL flush: a crash may forget the last few milliseconds
    -- of counted uses (a handful of extra allowed requests), never an event. It keeps limited verifies fast.
    PERFORM set_config('synchronous_commit', 'off', true);
    -- The row lock lasts until this statement's (autocommit) transaction ends, microseconds from here.
    SELECT * INTO u FROM api_key_usage WHERE key_id = id FOR UPDATE;
    IF NOT FOUND THEN  -- the key's first counted use (a concurrent first use may insert the row too)
        INSERT INTO api_key_usage (key_id) VALUES (id) ON CONFLICT DO NOTHING;
        SELECT * INTO u FROM api_key_usage WHERE key_id = id FOR UPDATE;
    END IF;
    IF remaining IS NOT NULL AND u.remaining_from IS DISTINCT FROM remaining_version THEN
        u.remaining := remaining;  -- the count restarts from the value the last event set
        u.remaining_from := remaining_version;
        u.last_refill_at := NULL;
    END IF;
    IF remaining IS NOT NULL AND u.remaining <= 0 AND refill_amount IS NOT NULL AND refill_interval IS NOT NULL
       AND p_now - coalesce(u.last_refill_at, created_at) >= make_interval(secs => refill_interval / 1000.0) THEN
        u.remaining := refill_amount;
        u.last_refill_at := p_now;
    END IF;
    IF remaining IS NOT NULL AND u.remaining <= 0 THEN
        code := 'USAGE_EXCEEDED';
    ELSIF rate_limit_enabled AND rate_limit_time_window IS NOT NULL AND rate_limit_max IS NOT NULL THEN
        since_ms := extract(epoch FROM p_now - u.last_request) * 1000;
        IF u.last_request IS NULL OR since_ms > rate_limit_time_window THEN
            u.request_count := 0;  -- a new window
        ELSIF u.request_count >= rate_limit_max THEN
            code := 'RATE_LIMITED';
            try_again_in := ceil(rate_limit_time_window - since_ms);
        END IF;
    END IF;
    IF code IS NULL THEN  -- the use counts
        IF remaining IS NOT NULL THEN
            u.remaining := u.remaining - 1;
        END IF;
        u.request_count := u.request_count + 1;
        u.last_request := p_now;
    END IF;
    UPDATE api_key_usage SET remaining = u.remaining, remaining_from = u.remaining_from,
        last_refill_at = u.last_refill_at, request_count = u.request_count, last_request = u.last_request
    WHERE key_id = id;
    remaining := u.remaining;
    last_refill_at := u.last_refill_at;
    request_count := u.request_count;
    last_request := u.last_request;
END $$;

-- lastRequest of keys WITHOUT limits (their verify writes nothing): the service remembers each one's latest
-- successful verify and writes them all here about once a second, in one statement (service/usage.py). Only
-- keys that still exist and are still unlimited (a limited key's last_request is its rate window, kept by
-- keyledger_verify_key). Rows are taken in key order, so two processes flushing at once cannot deadlock.
CREATE OR REPLACE FUNCTION keyledger_touch_keys(p_ids text[], p_at timestamptz[]) RETURNS integer
LANGUAGE plpgsql AS $$
DECLARE
    touched integer;
BEGIN
    PERFORM set_config('synchronous_commit', 'off', true);  -- a counter, like the limited keys' ones
    INSERT INTO api_key_usage AS u (key_id, last_request)
    SELECT t.id, t.at FROM unnest(p_ids, p_at) AS t(id, at)
    JOIN active_api_keys a ON a.id = t.id AND a.remaining IS NULL AND NOT a.rate_limit_enabled
    ORDER BY t.id
    ON CONFLICT (key_id) DO UPDATE SET last_request = greatest(u.last_request, excluded.last_request);
    GET DIAGNOSTICS touched = ROW_COUNT;
    RETURN touched;
END $$;

-- ---------------------------------------------------------------------------------------------------------
-- Audit: the tamper-evident hash chain over the event log.
--
-- event_chain holds one row per event, in POSITION order: hash = sha256(prev_hash || canonical(event)),
-- the exact input being documented in service/audit.py and the README ("Audit"). It is written by ONE sealer
-- (service/audit.py, leader by advisory lock) after the events committed, never on the write path, so a
-- revoke costs exactly what it cost before. Positions that never commit (rolled-back inserts) are simply
-- absent: the chain links consecutive *existing* events.

CREATE TABLE IF NOT EXISTS event_chain (
    position   bigint NOT NULL PRIMARY KEY,  -- events.position of the sealed event
    prev_hash  text   NOT NULL,              -- hash of the previous sealed event; 64 zeros for the first
    hash       text   NOT NULL               -- lower-case hex sha256
);

-- Append-only, like events: UPDATE, DELETE and TRUNCATE are refused for the owner too. A superuser who
-- disables the triggers can still rewrite the chain, which is why `audit verify --head POS:HASH` checks the
-- log against a head published outside the database (NATS, `<prefix>.audit.head`).
CREATE OR REPLACE TRIGGER event_chain_no_update_delete BEFORE UPDATE OR DELETE ON event_chain
    FOR EACH ROW EXECUTE FUNCTION keyledger_events_append_only();

CREATE OR REPLACE TRIGGER event_chain_no_truncate BEFORE TRUNCATE ON event_chain
    FOR EACH STATEMENT EXECUTE FUNCTION keyledger_events_append_only();
REVOKE UPDATE, DELETE, TRUNCATE ON event_chain FROM PUBLIC;

-- Replay's set-based fold (service/replay.py, FOLD) collects a key's rotations and retirements as one jsonb
-- object keyed by version, merged with jsonb's `||`: the keys are distinct, so the order in which the hash
-- aggregate feeds the rows does not matter. (jsonb_agg would do too, but its internal state makes the planner
-- budget 8 kB per key and spill the aggregate to disk.)
CREATE OR REPLACE AGGREGATE keyledger_jsonb_union(jsonb) (SFUNC = jsonb_concat, STYPE = jsonb);

-- ---------------------------------------------------------------------------------------------------------
-- Which schema.sql was applied last (service/schema.py): a start whose script is unchanged skips applying it,
-- so starting beside a busy service takes no table locks at all.
-- ---------------------------------------------------------------------------------------------------------
CREATE TABLE IF NOT EXISTS keyledger_schema (
    singleton  boolean PRIMARY KEY DEFAULT true CHECK (singleton),
    sha256     text NOT NULL,
    applied_at timestamptz NOT NULL DEFAULT now()
);

-- ---------------------------------------------------------------------------------------------------------
-- Background leadership: a lease with an epoch (service/leadership.py).
-- One process at a time runs the relay, the subscriber projections, the audit sealer and the expiry sweeper.
-- It must renew the lease (every 0.3 s, lasting 1.5 s) and renews it only while its work makes progress, so a
-- killed, hung (SIGSTOP) or NATS-less leader loses it within 1.5 s and another process takes over. Every
-- takeover draws a new epoch: a deposed leader that wakes up finds its epoch stale, both locally (its lease
-- deadline has passed on its own monotonic clock) and here (keyledger_fence), and stops before writing.
-- Times are the database's clock only, so the hosts' clocks never have to agree.
-- ---------------------------------------------------------------------------------------------------------
CREATE TABLE IF NOT EXISTS keyledger_leader (
    singleton  boolean PRIMARY KEY DEFAULT true CHECK (singleton),
    holder     text        NOT NULL,  -- a random id per process and term, never reused
    epoch      bigint      NOT NULL,  -- +1 at every takeover
    expires_at timestamptz NOT NULL
);
-- Set by a process that JetStream answers while it sees no checkpoint: a leader without progress gives up only then.
ALTER TABLE keyledger_leader ADD COLUMN IF NOT EXISTS challenged_at timestamptz;

-- Raise KL410 unless p_epoch is the current, unexpired term. Called inside a writer's transaction (the sealer)
-- so that a write by a deposed leader aborts instead of committing.
CREATE OR REPLACE FUNCTION keyledger_fence(p_epoch bigint) RETURNS void LANGUAGE plpgsql AS $$
BEGIN
    PERFORM 1 FROM keyledger_leader WHERE epoch = p_epoch AND expires_at > clock_timestamp();
    IF NOT FOUND THEN
        RAISE EXCEPTION 'leadership epoch % is over', p_epoch USING ERRCODE = 'KL410';
    END IF;
END $$;

-- ---------------------------------------------------------------------------------------------------------
-- Revocation receipts (projections/receipts.py): when did a revocation take effect in every cache?
-- Caches report the log position through which they have applied invalidations (no keys, no hashes: positions
-- only). For each revocation-like event (revoked, disabled, expired, rotated without grace) projected while caches
-- were live, an entry (its own row in ``revocations``, or its place in a row of ``revocation_batches``) that gives
-- each of them keyledger's (the database's) clock when the first receipt covering the position arrived, or null.
-- (With none live, nothing: it took effect everywhere at its commit.)
-- Bounded: an entry per such revocation and live cache, pruned after the retention period.
-- ---------------------------------------------------------------------------------------------------------
CREATE TABLE IF NOT EXISTS receipt_caches (
    cache_id      text PRIMARY KEY,
    service       text,
    position      bigint      NOT NULL,  -- the highest position it has confirmed (noted at most once a second)
    last_seen_at  timestamptz NOT NULL,  -- likewise: liveness within a term is kept in memory (receipts.py)
    first_seen_at timestamptz  -- a revocation before it never waits for it (null: heard of before this column)
);
ALTER TABLE receipt_caches ADD COLUMN IF NOT EXISTS first_seen_at timestamptz;
-- (2ae9159 made it NOT NULL DEFAULT '-infinity', which psycopg cannot load: null says the same.)
ALTER TABLE receipt_caches ALTER COLUMN first_seen_at DROP NOT NULL, ALTER COLUMN first_seen_at DROP DEFAULT;
UPDATE receipt_caches SET first_seen_at = NULL WHERE first_seen_at = '-infinity';
CREATE TABLE IF NOT EXISTS revocations (
    position                bigint PRIMARY KEY,  -- the event's position in the log
    key_id                  text        NOT NULL,
    type                    text        NOT NULL,
    revoked_at              timestamptz NOT NULL,  -- the event's recorded_at
    effective_everywhere_at timestamptz,
    caches                  jsonb       NOT NULL DEFAULT '{}'  -- cache id -> effective at (or null)
);
ALTER TABLE revocations ADD COLUMN IF NOT EXISTS caches jsonb NOT NULL DEFAULT '{}';
-- A revocation's row is written once its caches confirmed it (or after a second), not when it is projected; every
-- revocation-like event at or below this position has its row (or had no cache live), and a new leadership term
-- takes those above it that have none from the log (receipts.py). One row. A database that had receipts before
-- starts from its newest row (that code wrote each row before its event was acknowledged).
CREATE TABLE IF NOT EXISTS receipts_written (
    one      boolean PRIMARY KEY DEFAULT true CHECK (one),
    position bigint  NOT NULL
);
INSERT INTO receipts_written (position) SELECT coalesce(max(position), 0) FROM revocations ON CONFLICT DO NOTHING;
-- No index on key_id: the rare read by key finds the key's positions through its events (receipts.py, LATEST);
-- the index cost every revocation an insert.
DROP INDEX IF EXISTS revocations_key_idx;
CREATE INDEX IF NOT EXISTS revocations_pending_idx ON revocations (position) WHERE effective_everywhere_at IS NULL;
-- Revocations that took effect everywhere by the time they were first written, nearly all of them: one row per
-- write, not per revocation (a row each cost PostgreSQL an insert, its index entry and ~700 bytes of WAL per revoke
-- while caches were live: docs/benchmarks.md). ``revocations`` keeps the others: those written pending (a slow
-- cache, or one declared gone), whose confirmations come later. A revocation is in one of the two; the read looks in
-- both (receipts.py). Every revocation in a row had the same caches live, and every one of them confirmed it.
-- Times are microseconds since 1970 on the database's clock (keyledger_at_micros turns them into timestamps):
-- timestamps, sent as lists, doubled the projection's CPU per revocation (receipts.py, BATCH).
CREATE TABLE IF NOT EXISTS revocation_batches (
    id           bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    span         int8range   NOT NULL,  -- [lowest, highest] of its positions: what the index finds it by
    positions    bigint[]    NOT NULL,  -- the revocations' positions in the log
    caches       text[]      NOT NULL,  -- the caches live when they were projected
    effective_us bigint[]    NOT NULL,  -- [revocation][cache]: when that cache's receipt covered it; a
                                        -- revocation's last is when it took effect everywhere
    written_at   timestamptz NOT NULL DEFAULT clock_timestamp()  -- for the retention period
);
CREATE INDEX IF NOT EXISTS revocation_batches_span_idx ON revocation_batches USING gist (span);
CREATE OR REPLACE FUNCTION keyledger_at_micros(us bigint) RETURNS timestamptz LANGUAGE sql IMMUTABLE
    RETURN 'epoch'::timestamptz + us * interval '1 microsecond';
-- Every receipt written, whichever table holds it, a row per revocation: for auditors reading SQL, and the benches.
-- A revocation written twice (a deposed leader's last write racing its successor's) counts by its first row, as in
-- the projection's own reads, which find a revocation's row through the index above (receipts.py).
CREATE OR REPLACE VIEW receipts AS
SELECT r.position, r.key_id, r.type, r.revoked_at, r.effective_everywhere_at, r.caches FROM revocations r
UNION ALL
(SELECT DISTINCT ON (p.position) p.position, e.stream_id, e.type, e.recorded_at,
        keyledger_at_micros((SELECT max(us) FROM unnest(b.effective_us[p.i:p.i]) AS us)),
        (SELECT jsonb_object_agg(c.cache_id, keyledger_at_micros(b.effective_us[p.i][c.j]))
         FROM unnest(b.caches) WITH ORDINALITY AS c(cache_id, j))
 FROM revocation_batches b CROSS JOIN unnest(b.positions) WITH ORDINALITY AS p(position, i)
 JOIN events e ON e.position = p.position
 ORDER BY p.position, b.written_at, b.id);
-- Before, a row per (revocation, cache): folded into ``caches``.
DO $$
BEGIN
    IF to_regclass('revocation_receipts') IS NOT NULL THEN
        UPDATE revocations r SET caches = x.caches
        FROM (SELECT position, jsonb_object_agg(cache_id, effective_at) AS caches
              FROM revocation_receipts GROUP BY position) x
        WHERE r.position = x.position;
        DROP TABLE revocation_receipts;
    END IF;
END $$;
