/**
 * A verifying cache for Node services that accept keyledger API keys: `KeyCache`, point by point the semantics of
 * keyledger's Python `KeyCache` (`service/client.py`).
 *
 * Why a cache at all: asking keyledger over HTTP on every request costs a round trip and makes keyledger a single
 * point of failure for every downstream request. Why this one is safe: keyledger's invalidation projection
 * publishes, within milliseconds of a revocation, disable or relevant update, a message on
 * `<prefix>.cache.invalidate`; the cache evicts the key the moment it arrives, and the next request re-verifies over
 * HTTP.
 *
 * The cache only ever trusts itself as far as it can *prove* it has heard every invalidation, and the proof covers
 * the whole path from keyledger's event log, not only the cache's own connection (see `freshness.ts`):
 *
 * - **Proof of freshness.** Every `syncInterval` the cache publishes a numbered probe; the checkpoint that answers it
 *   arrives only after the invalidation of every event committed before the probe was sent. The send time of the
 *   newest answered probe, on this process's monotonic clock, is the proof; `trusted` means it is at most
 *   `staleness` old.
 * - **Bounded staleness, fail-closed.** A cached positive is served only if it was verified, or freshness was
 *   proven, within `staleness` seconds. Otherwise it is re-verified over HTTP.
 * - **Limited keys are never answered from memory** (`remaining` or `rateLimitEnabled`): keyledger counts every use.
 * - **Catching up.** A disconnect (or a slow-consumer error) opens a *gap*; a probe sent before it proves nothing
 *   afterwards. After reconnecting, the cache replays the invalidations it missed from the JetStream stream, from
 *   just after the last stream sequence it had seen (`cursor`, kept by a STREAM.INFO round trip every
 *   `syncInterval`), or flushes everything if it cannot prove it saw them all.
 * - **Fail-closed on keyledger outages**: `KEYLEDGER_UNAVAILABLE`, unless `failOpen`.
 * - **No fill after eviction.** A verification in flight while its key was invalidated is answered but not cached.
 *
 * Entries are keyed by `base64url(sha256(key))` (unpadded), the very string invalidations carry as `keyHash`.
 * Messages, logs and the cache itself hold only hashes, never a plaintext key.
 */
import * as crypto from "node:crypto";
import * as os from "node:os";
import { performance } from "node:perf_hooks";

import { connect, Events, type ConnectionOptions, type JetStreamManager, type NatsConnection } from "nats";

import { encodeReceipt, Prober } from "./freshness.js";
import { Topology, type TopologyOptions } from "./topology.js";

export const VERIFY_PATH = "/api/auth/api-key/verify";

/** Receipts (positions only): at once after an invalidation while the budget lasts, else a heartbeat this often. */
const RECEIPT_EVERY_MS = 1000;
/** The receipt budget's defaults: this many at once, refilled at this many a second (as the Python cache's). */
const RECEIPT_BURST = 8;
const RECEIPT_RATE = 4;
/** Positions per receipt of applied invalidations (keyledger reads as many); older ones wait for a checkpoint. */
const RECEIPT_MAX_APPLIED = 1024;
/** Replay reads this many stream messages at a time. */
const REPLAY_BATCH = 64;
/** Evictions remembered for the "no fill after eviction" rule. */
const EVICTION_LOG = 1024;

/** keyledger's key record, as its verify answers it (better-auth's shape); never holds the plaintext key. */
export interface ApiKeyRecord {
  id: string;
  name?: string | null;
  start?: string | null;
  prefix?: string | null;
  referenceId?: string;
  configId?: string;
  enabled?: boolean;
  remaining?: number | null;
  rateLimitEnabled?: boolean;
  expiresAt?: string | null;
  /** Present on a superseded secret inside its rotation grace period. */
  graceUntil?: string | null;
  permissions?: Record<string, string[]> | null;
  metadata?: unknown;
  [field: string]: unknown;
}

export interface VerifyError {
  message: string;
  code: string;
  [field: string]: unknown;
}

/** keyledger's verify answer (better-auth's shape). */
export interface VerifyResult {
  valid: boolean;
  error: VerifyError | null;
  key: ApiKeyRecord | null;
}

/** One message on `<prefix>.cache.invalidate`. `position` orders them; repeats are harmless. */
export interface Invalidation {
  keyId: string;
  keyHash: string;
  reason: string;
  position: number;
  occurredAt: string;
}

/** Where the cache reports what it does; `console` fits, and so does a pino/Fastify logger. Plaintext keys never reach it. */
export interface Logger {
  warn(message: string): void;
  info?(message: string): void;
  debug?(message: string): void;
}

export interface KeyCacheOptions {
  /**
   * keyledger's HTTP base, e.g. `http://127.0.0.1:3000`, or several (an array, or comma-separated): a verification
   * that cannot reach one (or gets a 5xx) goes to the next, and the one that answered is asked first next time.
   */
  baseUrl: string | string[];
  /**
   * NATS for invalidations: one URL, a comma-separated list, or an array. `null`/absent runs without them (every
   * positive then lives at most `staleness` seconds: a plain short-TTL cache).
   */
  natsUrl?: string | string[] | null;
  /** More `connect()` options of the `nats` package (credentials, TLS, …). */
  natsOptions?: Partial<ConnectionOptions>;
  /** Subject prefix and invalidations stream (`Topology.fromEnv()` reads the service's environment names). */
  topology?: Topology | TopologyOptions;
  /** Seconds a positive may be served when the cache cannot prove it heard every invalidation. Default 1. */
  staleness?: number;
  /** Seconds an invalid answer is cached (0 disables). Default 1. */
  negativeTtl?: number;
  /** Upper bound (seconds) on any positive's life, invalidations or not; `null`: no bound. Default 300. */
  maxAge?: number | null;
  /** Serve stale (never evicted, never expired) positives while keyledger is unreachable. Default false. */
  failOpen?: boolean;
  /** Seconds each HTTP verification attempt may take. Default 2. */
  httpTimeout?: number;
  /** Seconds between freshness probes (and cursor round trips). Default `staleness / 4`. */
  syncInterval?: number;
  /** The largest gap replayed message by message; a larger one flushes everything. Default 10000. */
  maxReplay?: number;
  /** A full cache drops expired entries, then everything (it is only a cache). Default 100000. */
  maxEntries?: number;
  /** Called (synchronously) after each invalidation was applied. */
  onInvalidation?: (invalidation: Invalidation) => void;
  /** This cache's stable name in keyledger's revocation receipts. Default: host, pid and a random number. */
  cacheId?: string;
  /** The service this cache belongs to, in receipts. Default "". */
  service?: string;
  /** Report revocation receipts. Default true. */
  receipts?: boolean;
  /**
   * Receipts a second this cache sends at most (at least 1), beyond `receiptBurst` at once. Default 4 and 8. A
   * revocation among the first `receiptBurst` in a while is confirmed as soon as it is applied; in a storm, one
   * receipt every `1 / receiptRate` s names all applied since, so a fleet's receipts cost keyledger at most
   * `receiptRate` messages a second per cache, however many keys are revoked.
   */
  receiptRate?: number;
  receiptBurst?: number;
  /** Default: warnings to `console.warn`. Pass `{ warn() {} }` for silence. */
  logger?: Logger;
  /** The `fetch` to use (default: the global one). */
  fetch?: typeof fetch;
}

interface Entry {
  result: VerifyResult;
  keyId: string | null;
  /** Monotonic ms: expiresAt, graceUntil, maxAge or negativeTtl, whichever is first. */
  deadline: number;
  /** Monotonic ms the HTTP verification was *sent*. */
  verifiedAt: number;
}

interface Eviction {
  generation: number;
  digest: string | null;
  keyId: string | null;
  flushed: boolean;
}

const MISSING_KEY: VerifyResult = Object.freeze({
  valid: false,
  error: Object.freeze({ message: "API key is required", code: "KEY_NOT_FOUND" }),
  key: null,
}) as VerifyResult;
const INVALID_KEY: VerifyResult = Object.freeze({
  valid: false,
  error: Object.freeze({ message: "Invalid API key.", code: "INVALID_API_KEY" }),
  key: null,
}) as VerifyResult;
const UNAVAILABLE: VerifyResult = Object.freeze({
  valid: false,
  error: Object.freeze({ message: "keyledger is unavailable", code: "KEYLEDGER_UNAVAILABLE" }),
  key: null,
}) as VerifyResult;

const textDecoder = new TextDecoder();

const nativeHash = (crypto as { hash?: (algorithm: string, data: string, encoding: "base64url") => string }).hash;

/** `base64url(sha256(key))` without padding: better-auth's stored hash, and what invalidations carry as `keyHash`. */
export function hashKey(key: string): string {
  if (nativeHash !== undefined) return nativeHash("sha256", key, "base64url");
  return crypto.createHash("sha256").update(key).digest("base64url");
}

/** An invalidation's `keyHash` in the canonical form entries are keyed by (unpadded base64url). */
function canonicalHash(keyHash: string): string {
  let h = keyHash;
  if (h.includes("+") || h.includes("/")) h = h.replace(/\+/g, "-").replace(/\//g, "_");
  while (h.endsWith("=")) h = h.slice(0, -1);
  return h;
}

function isInt(value: unknown): value is number {
  return typeof value === "number" && Number.isInteger(value);
}

function decodeInvalidation(payload: Uint8Array | string): Invalidation {
  const v = JSON.parse(typeof payload === "string" ? payload : textDecoder.decode(payload)) as Record<string, unknown>;
  if (
    typeof v !== "object" || v === null || typeof v.keyId !== "string" || typeof v.keyHash !== "string" ||
    typeof v.reason !== "string" || !isInt(v.position) || typeof v.occurredAt !== "string"
  ) {
    throw new TypeError("not an invalidation");
  }
  return { keyId: v.keyId, keyHash: v.keyHash, reason: v.reason, position: v.position, occurredAt: v.occurredAt };
}

function decodeAnswer(text: string): VerifyResult | null {
  let v: unknown;
  try {
    v = JSON.parse(text);
  } catch {
    return null;
  }
  if (typeof v !== "object" || v === null) return null;
  const r = v as Record<string, unknown>;
  if (typeof r.valid !== "boolean") return null;
  const error = r.error ?? null;
  const key = r.key ?? null;
  if ((error !== null && (typeof error !== "object" || Array.isArray(error))) ||
      (key !== null && (typeof key !== "object" || Array.isArray(key)))) {
    return null;
  }
  return { valid: r.valid, error: error as VerifyError | null, key: key as ApiKeyRecord | null };
}

function epochMs(iso: unknown): number | null {
  if (typeof iso !== "string" || !iso) return null;
  const t = Date.parse(iso);
  return Number.isNaN(t) ? null : t;
}

function splitList(value: string | string[]): string[] {
  const parts = Array.isArray(value) ? value : [value];
  return parts.flatMap((p) => p.split(",")).map((p) => p.trim()).filter((p) => p.length > 0);
}

function errorName(err: unknown): string {
  if (err && typeof err === "object") {
    const e = err as { name?: string; code?: string; cause?: { code?: string } };
    return [e.name, e.code, e.cause?.code].filter(Boolean).join(" ") || "error";
  }
  return String(err);
}

function isNotFound(err: unknown): boolean {
  const e = err as { code?: string; api_error?: { code?: number } } | null;
  return !!e && (e.api_error?.code === 404 || e.code === "404");
}

const defaultLogger: Logger = { warn: (message: string) => console.warn(`keyledger-client: ${message}`) };

/**
 * Verifies API keys against keyledger, caching answers and evicting them on invalidation.
 *
 * `await cache.start()` connects to NATS (when `natsUrl` is given); `await cache.close()` ends everything.
 * `verify()` works without `start()`, as a short-TTL cache over HTTP.
 */
export class KeyCache {
  readonly baseUrls: readonly string[];
  readonly natsUrl: readonly string[] | null;
  readonly natsOptions: Partial<ConnectionOptions>;
  readonly topology: Topology;
  readonly cacheId: string;
  readonly service: string;
  readonly receipts: boolean;
  /** Seconds (see `KeyCacheOptions`). */
  readonly staleness: number;
  readonly negativeTtl: number;
  readonly maxAge: number | null;
  readonly failOpen: boolean;
  readonly httpTimeout: number;
  readonly syncInterval: number;
  readonly maxReplay: number;
  readonly maxEntries: number;
  onInvalidation: ((invalidation: Invalidation) => void) | undefined;

  // Observability: plain counters.
  /** Answers served from memory. */
  hits = 0;
  /** Misses: answers asked of keyledger. */
  httpVerifications = 0;
  invalidationsApplied = 0;
  /** Entries removed by invalidations and flushes. */
  evictions = 0;
  flushes = 0;
  /** Invalidations read back from the stream after a gap. */
  replayed = 0;
  lastInvalidation: Invalidation | null = null;

  // ms versions of the settings, for the hot path.
  private readonly stalenessMs: number;
  private readonly negativeTtlMs: number;
  private readonly maxAgeMs: number;
  private readonly syncIntervalMs: number;

  private entries = new Map<string, Entry>();
  /** A key can have several cached secrets (a rotated one inside its grace period, and the new one). */
  private byId = new Map<string, Set<string>>();
  private readonly inflight = new Map<string, Promise<VerifyResult>>();
  /** Eviction log for the "no fill after eviction" rule (a ring of the last EVICTION_LOG evictions). */
  private generation = 0;
  private readonly evictionLog: Eviction[] = [];
  private evictionNext = 0;

  private readonly log: Logger;
  private readonly fetchImpl: typeof fetch;
  private current = 0;
  private receiptSentAt = Number.NEGATIVE_INFINITY;
  /** Positions of invalidations applied since the last receipt (the newest; older ones wait for a checkpoint). */
  private unreported: number[] = [];
  private receiptQueued = false;
  private readonly receiptBudget: Budget;
  /** Receipts sent (heartbeats included). */
  receiptsSent = 0;

  private nc: NatsConnection | null = null;
  private jsm: JetStreamManager | null = null;
  private natsConnected = false;
  private task: Promise<void> | null = null;
  private closing = false;
  private wakeUp: (() => void) | null = null;
  private woken = false;
  private readonly prober = new Prober();
  /** Nothing proven yet: the first catch-up resolves it. */
  private gap = true;
  /** Bumped on every disconnect, so a round trip that spans one proves nothing. */
  private epoch = 0;
  /** Last invalidations-stream sequence proven received. */
  private cursor: number | null = null;

  constructor(options: KeyCacheOptions) {
    this.baseUrls = splitList(options.baseUrl ?? []).map((b) => b.replace(/\/+$/, ""));
    if (this.baseUrls.length === 0) throw new Error("KeyCache needs at least one keyledger base URL");
    const nats = options.natsUrl ? splitList(options.natsUrl) : [];
    this.natsUrl = nats.length > 0 ? nats : null;
    this.natsOptions = options.natsOptions ?? {};
    this.topology = options.topology instanceof Topology ? options.topology : new Topology(options.topology ?? {});
    this.cacheId = options.cacheId || `${os.hostname()}-${process.pid}-${crypto.randomInt(10_000).toString().padStart(4, "0")}`;
    this.service = options.service ?? "";
    this.receipts = options.receipts ?? true;
    this.receiptBudget = new Budget(options.receiptRate ?? RECEIPT_RATE, options.receiptBurst ?? RECEIPT_BURST);
    this.staleness = options.staleness ?? 1.0;
    this.negativeTtl = options.negativeTtl ?? 1.0;
    this.maxAge = options.maxAge === undefined ? 300.0 : options.maxAge;
    this.failOpen = options.failOpen ?? false;
    this.httpTimeout = options.httpTimeout ?? 2.0;
    this.syncInterval = options.syncInterval ?? Math.max(this.staleness / 4, 0.01);
    this.maxReplay = options.maxReplay ?? 10_000;
    this.maxEntries = options.maxEntries ?? 100_000;
    this.onInvalidation = options.onInvalidation;
    this.log = options.logger ?? defaultLogger;
    this.fetchImpl = options.fetch ?? globalThis.fetch.bind(globalThis);
    for (const [name, value] of [["staleness", this.staleness], ["negativeTtl", this.negativeTtl],
      ["httpTimeout", this.httpTimeout], ["syncInterval", this.syncInterval]] as const) {
      if (!(value >= 0) || !Number.isFinite(value)) throw new Error(`KeyCache: ${name} must be a number of seconds >= 0`);
    }
    this.stalenessMs = this.staleness * 1000;
    this.negativeTtlMs = this.negativeTtl * 1000;
    this.maxAgeMs = this.maxAge === null ? Number.POSITIVE_INFINITY : this.maxAge * 1000;
    this.syncIntervalMs = this.syncInterval * 1000;
  }

  // ------------------------------------------------------------------------------------------------------------
  // Lifecycle
  // ------------------------------------------------------------------------------------------------------------
  /** Connect to NATS (in the background: `start()` does not wait for it) and keep the proof going. */
  async start(): Promise<this> {
    if (this.natsUrl && this.task === null) {
      this.closing = false;
      this.task = this.supervise().catch((err) => this.log.warn(`NATS supervisor stopped: ${errorName(err)}`));
    }
    return this;
  }

  /** Stop probing, close the NATS connection. Cached entries stay readable but are no longer proven fresh. */
  async close(): Promise<void> {
    this.closing = true;
    this.wake();
    const nc = this.nc;
    if (nc !== null) {
      await Promise.race([nc.close().catch(() => undefined), sleep(2000)]);
    }
    if (this.task !== null) {
      await Promise.race([this.task, sleep(3000)]);
      this.task = null;
    }
    this.nc = null;
    this.jsm = null;
    this.natsConnected = false;
  }

  /** True while the cache holds a freshness proof at most `staleness` old. */
  get trusted(): boolean {
    return performance.now() - this.prober.provenAt <= this.stalenessMs;
  }

  /** Seconds since the newest proven instant (`Infinity`: never proven). */
  get proofAge(): number {
    return this.prober.age();
  }

  /** True while connected with no gap: every invalidation up to the last proof has been received. */
  get caughtUp(): boolean {
    return this.connected && !this.gap && this.trusted;
  }

  get connected(): boolean {
    return this.nc !== null && this.natsConnected && !this.nc.isClosed();
  }

  /** The keyledger base URL that answered last (asked first next time). */
  get activeBaseUrl(): string {
    return this.baseUrls[this.current];
  }

  /** The id this cache's probes carry. */
  get proberId(): string {
    return this.prober.id;
  }

  /** Cached answers. */
  get size(): number {
    return this.entries.size;
  }

  // ------------------------------------------------------------------------------------------------------------
  // Verification
  // ------------------------------------------------------------------------------------------------------------
  /** The cached answer for `key` if it may be served right now, else `null`. Never does I/O. */
  verifyCached(key: string): VerifyResult | null {
    return this.cached(hashKey(key));
  }

  private cached(digest: string): VerifyResult | null {
    const entry = this.entries.get(digest);
    if (entry === undefined) return null;
    const now = performance.now();
    if (now >= entry.deadline) return null;
    const staleness = this.stalenessMs;
    if (now - this.prober.provenAt > staleness && now - entry.verifiedAt > staleness) {
      return null; // cannot prove no invalidation was missed: re-verify
    }
    this.hits += 1;
    return entry.result;
  }

  /** Verify `key`: from memory when that is provably fresh, else over HTTP (then cached). Never rejects. */
  verify(key: string): Promise<VerifyResult> {
    if (typeof key !== "string") return Promise.resolve(MISSING_KEY);
    const digest = hashKey(key);
    const cached = this.cached(digest);
    if (cached !== null) return Promise.resolve(cached);
    if (!key) return Promise.resolve(MISSING_KEY);
    let pending = this.inflight.get(digest);
    if (pending === undefined) {
      // One HTTP verification per key at a time; later callers share it.
      pending = this.verifyRemote(key, digest).catch(() => this.unavailable(digest));
      this.inflight.set(digest, pending);
      const done = pending;
      void done.finally(() => {
        if (this.inflight.get(digest) === done) this.inflight.delete(digest);
      });
    }
    return pending;
  }

  private async verifyRemote(key: string, digest: string): Promise<VerifyResult> {
    const generation = this.generation;
    const sent = performance.now();
    this.httpVerifications += 1;
    const body = JSON.stringify({ key });
    let response: { status: number; text: string } | null = null;
    const n = this.baseUrls.length;
    for (let attempt = 0; attempt < n; attempt++) {
      // Fail over: the one that answered last first, then the rest.
      const index = (this.current + attempt) % n;
      try {
        response = await this.post(this.baseUrls[index] + VERIFY_PATH, body);
      } catch (err) {
        this.log.warn(`keyledger verify at ${this.baseUrls[index]} failed: ${errorName(err)}`);
        continue;
      }
      if (response.status < 500) {
        this.current = index;
        break;
      }
    }
    if (response === null) return this.unavailable(digest);
    if (response.status !== 200) {
      if (response.status >= 400 && response.status < 500 && response.status !== 429) return INVALID_KEY;
      return this.unavailable(digest);
    }
    const result = decodeAnswer(response.text);
    if (result === null) return this.unavailable(digest);
    if (!this.evictedSince(generation, digest, result.key?.id ?? null)) {
      this.store(digest, result, sent);
    }
    return result;
  }

  private async post(url: string, body: string): Promise<{ status: number; text: string }> {
    const response = await this.fetchImpl(url, {
      method: "POST",
      headers: { "content-type": "application/json" },
      body,
      signal: AbortSignal.timeout(Math.max(1, Math.round(this.httpTimeout * 1000))),
    });
    return { status: response.status, text: await response.text() };
  }

  private unavailable(digest: string): VerifyResult {
    if (this.failOpen) {
      const entry = this.entries.get(digest);
      if (entry !== undefined && entry.result.valid && performance.now() < entry.deadline) return entry.result;
    }
    return UNAVAILABLE;
  }

  private evictedSince(generation: number, digest: string, keyId: string | null): boolean {
    if (generation === this.generation) return false;
    if (this.generation - generation > this.evictionLog.length) return true; // the log does not reach back that far
    const size = this.evictionLog.length;
    for (let i = 1; i <= size; i++) {
      const e = this.evictionLog[(this.evictionNext - i + size) % size];
      if (e.generation <= generation) break;
      if (e.flushed || e.digest === digest || (keyId !== null && e.keyId === keyId)) return true;
    }
    return false;
  }

  private logEviction(digest: string | null, keyId: string | null, flushed: boolean): void {
    this.generation += 1;
    const e: Eviction = { generation: this.generation, digest, keyId, flushed };
    if (this.evictionLog.length < EVICTION_LOG) {
      this.evictionLog.push(e);
      this.evictionNext = this.evictionLog.length % EVICTION_LOG;
    } else {
      this.evictionLog[this.evictionNext] = e;
      this.evictionNext = (this.evictionNext + 1) % EVICTION_LOG;
    }
  }

  private store(digest: string, result: VerifyResult, sent: number): void {
    let deadline: number;
    let keyId: string | null = null;
    if (result.valid) {
      const key = result.key ?? ({} as ApiKeyRecord);
      if ((key.remaining !== null && key.remaining !== undefined) || key.rateLimitEnabled) {
        return; // keyledger counts every use of a limited key: never answer one from memory
      }
      deadline = sent + this.maxAgeMs;
      // The key's expiry, and for a superseded secret its rotation grace deadline, end the entry too.
      for (const ends of [epochMs(key.expiresAt), epochMs(key.graceUntil)]) {
        if (ends !== null) deadline = Math.min(deadline, sent + (ends - Date.now()));
      }
      keyId = typeof key.id === "string" && key.id ? key.id : null;
    } else {
      deadline = sent + this.negativeTtlMs;
    }
    if (deadline <= performance.now()) return;
    if (this.entries.size >= this.maxEntries) this.makeRoom();
    Object.freeze(result); // shared by every caller it is served to
    this.entries.set(digest, { result, keyId, deadline, verifiedAt: sent });
    if (keyId !== null) {
      let set = this.byId.get(keyId);
      if (set === undefined) this.byId.set(keyId, (set = new Set()));
      set.add(digest);
    }
  }

  private makeRoom(): void {
    const now = performance.now();
    const kept = new Map<string, Entry>();
    for (const [d, e] of this.entries) if (e.deadline > now) kept.set(d, e);
    this.entries = kept.size >= this.maxEntries ? new Map() : kept;
    this.byId = new Map();
    for (const [d, e] of this.entries) {
      if (e.keyId !== null) {
        let set = this.byId.get(e.keyId);
        if (set === undefined) this.byId.set(e.keyId, (set = new Set()));
        set.add(d);
      }
    }
  }

  // ------------------------------------------------------------------------------------------------------------
  // Eviction
  // ------------------------------------------------------------------------------------------------------------
  /** Evict one key, by hash and/or id (what an invalidation message does). */
  invalidate(target: { keyHash?: string | null; keyId?: string | null }): void {
    const digest = target.keyHash ? canonicalHash(target.keyHash) : null;
    if (digest !== null && this.entries.delete(digest)) this.evictions += 1;
    const keyId = target.keyId ?? null;
    if (keyId !== null) {
      const digests = this.byId.get(keyId);
      if (digests !== undefined) {
        this.byId.delete(keyId);
        for (const d of digests) if (this.entries.delete(d)) this.evictions += 1;
      }
    }
    this.logEviction(digest, keyId, false);
  }

  /** Evict everything. */
  flush(why = ""): void {
    const had = this.entries.size;
    this.evictions += had;
    this.entries.clear();
    this.byId.clear();
    this.logEviction(null, null, true);
    this.flushes += 1;
    if (why && had) this.log.warn(`key cache flushed (${had} entries): ${why}`);
  }

  private apply(payload: Uint8Array): void {
    let inv: Invalidation;
    try {
      inv = decodeInvalidation(payload);
      this.invalidate({ keyHash: inv.keyHash, keyId: inv.keyId });
    } catch (err) {
      // Unreadable: we cannot tell which key, so no key may be trusted.
      this.flush(`unreadable invalidation (${errorName(err)})`);
      return;
    }
    this.invalidationsApplied += 1;
    this.lastInvalidation = inv;
    if (this.receipts) {
      this.unreported.push(inv.position);
      // Keep the newest RECEIPT_MAX_APPLIED (older ones wait for a checkpoint); trimmed in halves, so a long
      // burst costs O(1) per invalidation rather than a shift of the whole array each time.
      if (this.unreported.length >= 2 * RECEIPT_MAX_APPLIED) this.unreported.splice(0, RECEIPT_MAX_APPLIED);
      if (!this.receiptQueued) {
        // One receipt per burst: sent once the rest of what arrived in this read is applied too, or, the budget
        // spent, when it allows the next (naming what was applied meanwhile too).
        this.receiptQueued = true;
        const wait = this.receiptBudget.wait();
        if (wait === 0) setImmediate(() => this.reportApplied());
        else setTimeout(() => this.reportApplied(), wait * 1000).unref();
      }
    }
    if (this.onInvalidation !== undefined) {
      try {
        this.onInvalidation(inv);
      } catch (err) {
        this.log.warn(`onInvalidation callback failed: ${errorName(err)}`);
      }
    }
  }

  // ------------------------------------------------------------------------------------------------------------
  // NATS: connection, proof round trips, catching up
  // ------------------------------------------------------------------------------------------------------------
  private wake(): void {
    this.woken = true;
    const w = this.wakeUp;
    this.wakeUp = null;
    if (w !== null) w();
  }

  private waitForWake(ms: number): Promise<void> {
    if (this.woken || this.closing) {
      this.woken = false;
      return Promise.resolve();
    }
    return new Promise((resolve) => {
      const timer = setTimeout(() => {
        this.wakeUp = null;
        resolve();
      }, ms);
      this.wakeUp = () => {
        clearTimeout(timer);
        this.woken = false;
        resolve();
      };
    });
  }

  private async supervise(): Promise<void> {
    while (!this.closing) {
      const nc = await this.connectNats();
      if (nc === null) return;
      await this.runConnection(nc);
      if (this.closing) return;
      // Closed for good by the client library (not by us): start over with a new connection.
      this.log.warn("key cache: NATS connection closed; connecting again");
      this.onGap();
      this.nc = null;
      this.jsm = null;
      this.natsConnected = false;
    }
  }

  private async connectNats(): Promise<NatsConnection | null> {
    let delay = 50;
    while (!this.closing) {
      try {
        const nc = await connect({
          servers: [...(this.natsUrl ?? [])],
          name: "keyledger-cache",
          timeout: 2000,
          reconnect: true,
          maxReconnectAttempts: -1,
          reconnectTimeWait: 250,
          pingInterval: 5000,
          maxPingOut: 2,
          ...this.natsOptions,
        });
        if (this.closing) {
          await nc.close().catch(() => undefined);
          return null;
        }
        return nc;
      } catch (err) {
        this.log.debug?.(`NATS not available (${errorName(err)}); verifying over HTTP meanwhile`);
        await this.waitForWake(delay);
        delay = Math.min(delay * 2, 2000);
      }
    }
    return null;
  }

  private async runConnection(nc: NatsConnection): Promise<void> {
    // A new connection: whatever was published before it may have been missed, and no earlier probe counts.
    this.onGap();
    this.nc = nc;
    this.natsConnected = true;
    void this.watchStatus(nc);
    const timeout = Math.max(Math.min(this.staleness, 2.0), 0.2) * 1000;
    this.jsm = await nc.jetstreamManager({ timeout, checkAPI: false });
    // Callbacks run synchronously as the client reads its socket, so messages are applied in the order NATS sent
    // them, interleaved correctly with the answers to our own requests (what the cursor's round trip relies on).
    nc.subscribe(this.topology.invalidationSubject, {
      callback: (err, msg) => {
        if (err === null) this.apply(msg.data);
      },
    });
    nc.subscribe(this.topology.checkpointSubject, {
      callback: (err, msg) => {
        if (err === null) this.onCheckpoint(msg.data);
      },
    });
    while (!this.closing && !nc.isClosed()) {
      try {
        if (this.connected) {
          nc.publish(this.topology.probeSubject, this.prober.nextProbe());
          if (this.gap) await this.catchUp();
          else await this.sync();
        }
      } catch (err) {
        this.log.debug?.(`cache sync: ${errorName(err)}`);
      }
      await this.waitForWake(this.syncIntervalMs);
    }
  }

  private async watchStatus(nc: NatsConnection): Promise<void> {
    try {
      for await (const status of nc.status()) {
        if (status.type === Events.Disconnect) {
          this.natsConnected = false;
          this.onGap();
          if (!this.closing) {
            this.log.warn(`key cache: NATS disconnected; positives older than ${this.staleness}s are re-verified`);
          }
        } else if (status.type === Events.Reconnect) {
          this.natsConnected = true;
          this.log.info?.("key cache: NATS reconnected; catching up on invalidations");
          this.wake();
        } else if (status.type === Events.Error && /slow/i.test(String(status.data))) {
          // Messages were dropped: some may have been invalidations.
          this.onGap();
          this.wake();
        }
      }
    } catch {
      // the connection closed
    }
  }

  /** A disconnect or dropped messages: outstanding probes prove nothing, and missed invalidations must be read. */
  private onGap(): void {
    this.epoch += 1;
    this.prober.newSession();
    this.gap = true;
  }

  private onCheckpoint(payload: Uint8Array): void {
    // An echo counts only with no gap left to close (the probe's own session is checked by the prober).
    this.prober.onCheckpoint(payload, !this.gap);
    // A heartbeat receipt every second with the position proven so far: it keeps this cache "live" in keyledger's
    // receipts while nothing is revoked (checkpoints come every 250 ms regardless). Revocations are confirmed at
    // once by the receipts of applied invalidations.
    const due = performance.now() - this.receiptSentAt >= RECEIPT_EVERY_MS;
    if (this.receipts && this.prober.seenPosition !== null && due) this.sendReceipt([]);
  }

  /** Receipt for the invalidations just applied: keyledger dates their revocations without awaiting a checkpoint. */
  private reportApplied(): void {
    this.receiptQueued = false;
    const applied = this.unreported.slice(-RECEIPT_MAX_APPLIED);
    this.unreported = [];
    if (applied.length > 0) this.sendReceipt(applied);
  }

  private sendReceipt(applied: number[]): void {
    const nc = this.nc;
    if (nc === null) return;
    this.receiptSentAt = performance.now();
    this.receiptBudget.take(); // (a heartbeat too: it comes a second after the last receipt, the budget refilled)
    this.receiptsSent += 1;
    try {
      nc.publish(this.topology.receiptsSubject, encodeReceipt({
        cacheId: this.cacheId, service: this.service, position: this.prober.seenPosition ?? 0, applied,
      }));
    } catch {
      // a lost receipt is replaced by the next one
    }
  }

  /** [firstSeq, lastSeq] of the invalidations stream, or null if it does not exist. */
  private async streamState(): Promise<[number, number] | null> {
    const jsm = this.jsm;
    if (jsm === null) throw new Error("not connected");
    try {
      const info = await jsm.streams.info(this.topology.invalidationsStream);
      return [info.state.first_seq, info.state.last_seq];
    } catch (err) {
      if (isNotFound(err)) return null;
      throw err;
    }
  }

  /**
   * Move the cursor to the stream's end: NATS keeps a connection's messages in order, so when the answer arrives
   * every invalidation stored before it was asked has been received live.
   */
  private async sync(): Promise<void> {
    const epoch = this.epoch;
    const state = await this.streamState();
    if (epoch !== this.epoch || this.gap) return;
    this.cursor = state === null ? null : state[1];
  }

  /** Close a gap: replay what the stream holds after the cursor, or flush if that cannot be proven. */
  private async catchUp(): Promise<void> {
    const epoch = this.epoch;
    for (let i = 0; i < 3; i++) {
      // Repeat until the stream's end stops moving (closes a publish-vs-SUB race).
      const state = await this.streamState();
      const cursor = this.cursor;
      if (state === null) {
        this.flush("invalidations stream missing");
        this.cursor = null;
        break;
      }
      const [first, last] = state;
      if (last === cursor) break;
      if (cursor === null || last < cursor || first > cursor + 1 || last - cursor > this.maxReplay) {
        this.flush(`cannot replay invalidations ${cursor} -> ${last} (stream holds ${first}..${last})`);
        this.cursor = last;
        continue;
      }
      if (!(await this.replay(cursor + 1, last))) this.flush("invalidations missing from the stream");
      this.cursor = last;
    }
    if (epoch !== this.epoch) return; // disconnected again meanwhile: still a gap
    this.gap = false;
    this.log.info?.(`key cache: caught up at stream sequence ${this.cursor}`);
  }

  private async replay(first: number, last: number): Promise<boolean> {
    const jsm = this.jsm;
    if (jsm === null) throw new Error("not connected");
    const stream = this.topology.invalidationsStream;
    for (let start = first; start <= last; start += REPLAY_BATCH) {
      const seqs: number[] = [];
      for (let s = start; s < Math.min(start + REPLAY_BATCH, last + 1); s++) seqs.push(s);
      const msgs = await Promise.allSettled(seqs.map((seq) => jsm.streams.getMessage(stream, { seq })));
      for (const m of msgs) {
        if (m.status === "rejected") {
          if (isNotFound(m.reason)) return false;
          throw m.reason;
        }
      }
      for (const m of msgs) {
        if (m.status === "fulfilled") {
          this.apply(m.value.data);
          this.replayed += 1;
        }
      }
    }
    return true;
  }
}

function sleep(ms: number): Promise<void> {
  return new Promise((resolve) => setTimeout(resolve, ms).unref());
}

/** A token bucket: `burst` at once, then `rate` a second. */
class Budget {
  private tokens: number;
  private at = performance.now();

  constructor(private readonly rate: number, private readonly burst: number) {
    // At least 1 (a heartbeat a second must not overdraw it), and finite (NaN and Infinity are no budget).
    if (!(rate >= 1 && rate < Infinity && burst >= 1 && burst < Infinity)) {
      throw new Error("receiptRate and receiptBurst must be finite numbers of at least 1");
    }
    this.tokens = burst;
  }

  /** Seconds until one token is there (0: now). */
  wait(): number {
    const now = performance.now();
    this.tokens = Math.min(this.burst, this.tokens + ((now - this.at) / 1000) * this.rate);
    this.at = now;
    return Math.max(0, (1 - this.tokens) / this.rate);
  }

  take(): void {
    this.wait();
    this.tokens -= 1;
  }
}
