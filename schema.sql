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
CREATE TABLE IF NOT EXISTS active_api_keys (
    id                       text PRIMARY KEY,
    key_hash                 text        NOT NULL UNIQUE,
    config_id                text        NOT NULL DEFAULT 'default',
    reference_id             text        NOT NULL,
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
            remaining, permissions, metadata, created_at, updated_at, version)
        VALUES (
            p_stream_id, p_data->>'keyHash', coalesce(p_data->>'configId', 'default'), p_data->>'referenceId',
            p_data->>'name', p_data->>'start', p_data->>'prefix', coalesce((p_data->>'enabled')::boolean, true),
            (p_data->>'expiresAt')::timestamptz, coalesce((p_data->>'rateLimitEnabled')::boolean, false),
            (p_data->>'rateLimitTimeWindow')::integer, (p_data->>'rateLimitMax')::integer,
            (p_data->>'refillInterval')::integer, (p_data->>'refillAmount')::integer,
            (p_data->>'remaining')::integer, nullif(p_data->'permissions', 'null'::jsonb),
            nullif(p_data->'metadata', 'null'::jsonb), coalesce((p_data->>'createdAt')::timestamptz, p_at), p_at,
            p_version);
        UPDATE active_api_keys SET remaining_version = p_version WHERE id = p_stream_id;
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
    WHEN 'ApiKeyRevoked' THEN
        DELETE FROM active_api_keys WHERE id = p_stream_id;
    ELSE
        NULL;  -- an event type this projection does not care about still advances its tracking
    END CASE;
    PERFORM keyledger_advance('active_api_keys', p_stream_id, p_version);
END $$;

-- ---------------------------------------------------------------------------------------------------------
-- Usage counters: not events (they change on every verify), so not in the log and left alone by replay.
-- One row per key that has a usage limit or a rate limit, updated atomically by keyledger_use_key under a row
-- lock: concurrent verifies never lose a count or take `remaining` below zero.
-- ---------------------------------------------------------------------------------------------------------
CREATE TABLE IF NOT EXISTS api_key_usage (
    key_id         text PRIMARY KEY,
    remaining      integer,                   -- the live count of a usage-limited key
    remaining_from integer,                   -- active_api_keys.remaining_version the count started from
    last_refill_at timestamptz,
    request_count  integer NOT NULL DEFAULT 0, -- requests in the current rate-limit window
    last_request   timestamptz
);

-- better-auth's semantics: a usage limit (`remaining`, refilled to `refillAmount` every `refillInterval` ms
-- once exhausted) and a rate limit (`rateLimitMax` requests per `rateLimitTimeWindow` ms, the window counted
-- from the last request). Returns code NULL when the use is allowed (and counted), else USAGE_EXCEEDED or
-- RATE_LIMITED with try_again_in (ms). An event that sets `remaining` restarts the count from its value.
CREATE OR REPLACE FUNCTION keyledger_use_key(p_id text, p_now timestamptz,
    OUT code text, OUT try_again_in bigint, OUT remaining integer, OUT request_count integer,
    OUT last_request timestamptz)
LANGUAGE plpgsql AS $$
DECLARE
    k active_api_keys%ROWTYPE;
    u api_key_usage%ROWTYPE;
    since_ms double precision;
BEGIN
    SELECT * INTO k FROM active_api_keys WHERE id = p_id;
    IF NOT FOUND THEN
        code := 'INVALID_API_KEY';
        RETURN;
    END IF;
    -- Counters, unlike events, do not wait for their WAL flush: a crash may forget the last few milliseconds of
    -- counted uses (a handful of extra allowed requests), never an event. It keeps limited verifies fast.
    PERFORM set_config('synchronous_commit', 'off', true);
    INSERT INTO api_key_usage (key_id) VALUES (p_id) ON CONFLICT DO NOTHING;
    SELECT * INTO u FROM api_key_usage WHERE key_id = p_id FOR UPDATE;
    IF k.remaining IS NOT NULL AND u.remaining_from IS DISTINCT FROM k.remaining_version THEN
        u.remaining := k.remaining;
        u.remaining_from := k.remaining_version;
        u.last_refill_at := NULL;
    END IF;
    IF k.remaining IS NOT NULL AND u.remaining <= 0 AND k.refill_amount IS NOT NULL AND k.refill_interval IS NOT NULL
       AND p_now - coalesce(u.last_refill_at, k.created_at) >= make_interval(secs => k.refill_interval / 1000.0) THEN
        u.remaining := k.refill_amount;
        u.last_refill_at := p_now;
    END IF;
    IF k.remaining IS NOT NULL AND u.remaining <= 0 THEN
        code := 'USAGE_EXCEEDED';
    ELSIF k.rate_limit_enabled AND k.rate_limit_time_window IS NOT NULL AND k.rate_limit_max IS NOT NULL THEN
        since_ms := extract(epoch FROM p_now - u.last_request) * 1000;
        IF u.last_request IS NULL OR since_ms > k.rate_limit_time_window THEN
            u.request_count := 0;  -- a new window
        ELSIF u.request_count >= k.rate_limit_max THEN
            code := 'RATE_LIMITED';
            try_again_in := ceil(k.rate_limit_time_window - since_ms);
        END IF;
    END IF;
    IF code IS NULL THEN  -- the use counts
        IF k.remaining IS NOT NULL THEN
            u.remaining := u.remaining - 1;
        END IF;
        u.request_count := u.request_count + 1;
        u.last_request := p_now;
    END IF;
    UPDATE api_key_usage SET remaining = u.remaining, remaining_from = u.remaining_from,
        last_refill_at = u.last_refill_at, request_count = u.request_count, last_request = u.last_request
    WHERE key_id = p_id;
    remaining := u.remaining;
    request_count := u.request_count;
    last_request := u.last_request;
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
