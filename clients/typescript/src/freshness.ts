/**
 * The freshness proof, the cache's side (keyledger's `service/core/freshness.py`).
 *
 * Each cache publishes numbered probes `{"i": <its id>, "n": <counter>}` on `<prefix>.cache.probe` and notes, on
 * its own monotonic clock (`performance.now()`), when it sent each. keyledger's relay answers with a checkpoint
 * `{"position", "probes": {prober: n}, "epoch", "createdAt"}` that travels behind the events it vouches for, through
 * the events stream and the invalidation projection, to `<prefix>.cache.checkpoint`. A prober that finds its own
 * probe `n` in a checkpoint knows: every event committed in keyledger's log before I sent probe `n` has had its
 * invalidation delivered here. So the proof's age is `now - sent(n)`, two readings of this process's own clock:
 * no clock skew between hosts enters it, and any delay on the path only makes the proof older.
 */
import { randomBytes } from "node:crypto";
import { performance } from "node:perf_hooks";

/** `i`: the prober's random id; `n`: its probe counter. */
export interface Probe {
  i: string;
  n: number;
}

/**
 * "Every event committed in the log up to `position` had its invalidation published before this message, and so
 * had every event committed before each prober sent the probe number `probes[prober]`."
 */
export interface Checkpoint {
  position: number;
  probes: Record<string, number>;
  epoch: number;
  createdAt: string | null;
}

/**
 * What a cache reports on `<prefix>.cache.receipts`: positions only (no key ids, no hashes). `position`: every
 * invalidation up to it is applied (proven by a checkpoint); `applied`: invalidations applied since the last
 * receipt, not yet covered by a checkpoint (each one's key is evicted, and a verify in flight cannot put it back).
 */
export interface Receipt {
  cacheId: string;
  service: string;
  position: number;
  applied?: number[];
}

const decoder = new TextDecoder();
const encoder = new TextEncoder();

export function encodeProbe(probe: Probe): Uint8Array {
  return encoder.encode(JSON.stringify({ i: probe.i, n: probe.n }));
}

export function encodeReceipt(receipt: Receipt): Uint8Array {
  return encoder.encode(
    JSON.stringify({
      cacheId: receipt.cacheId, service: receipt.service, position: receipt.position, applied: receipt.applied ?? [],
    }),
  );
}

function isInt(value: unknown): value is number {
  return typeof value === "number" && Number.isInteger(value);
}

/** A checkpoint, or `null` if the payload is not one (as strict as keyledger's own decoder). */
export function decodeCheckpoint(payload: Uint8Array | string): Checkpoint | null {
  let value: unknown;
  try {
    value = JSON.parse(typeof payload === "string" ? payload : decoder.decode(payload));
  } catch {
    return null;
  }
  if (typeof value !== "object" || value === null || Array.isArray(value)) return null;
  const v = value as Record<string, unknown>;
  if (!isInt(v.position)) return null;
  const probes: Record<string, number> = {};
  if (v.probes !== undefined) {
    if (typeof v.probes !== "object" || v.probes === null || Array.isArray(v.probes)) return null;
    for (const [prober, n] of Object.entries(v.probes as Record<string, unknown>)) {
      if (!isInt(n)) return null;
      probes[prober] = n;
    }
  }
  if (v.epoch !== undefined && !isInt(v.epoch)) return null;
  if (v.createdAt !== undefined && v.createdAt !== null && typeof v.createdAt !== "string") return null;
  return {
    position: v.position,
    probes,
    epoch: (v.epoch as number | undefined) ?? 0,
    createdAt: (v.createdAt as string | null | undefined) ?? null,
  };
}

/**
 * One prober's side: numbers its probes, remembers when each was sent, turns echoes into a proof time.
 *
 * `session` is the owner's connection generation: a probe sent before a disconnect proves nothing about what was
 * published while disconnected, so an echo only counts if it comes back in the session its probe was sent in, and
 * only while the owner has no gap it still has to close (`accept`).
 */
export class Prober {
  /** Probes remembered; older ones are forgotten (their echo can only be older news). */
  static readonly MAX_OUTSTANDING = 256;

  readonly id: string = randomBytes(8).toString("hex");
  session = 0;
  /** Monotonic send time (ms, `performance.now()`) of the newest echoed probe; `-Infinity`: none yet. */
  provenAt = Number.NEGATIVE_INFINITY;
  /** The log position the newest proof covered. */
  provenPosition: number | null = null;
  /**
   * The highest checkpoint position received with no gap open, echo or not: every invalidation of an event up to
   * it has arrived here (what a revocation receipt reports).
   */
  seenPosition: number | null = null;
  checkpoints = 0;
  private n = 0;
  private readonly sent = new Map<number, { at: number; session: number }>();

  nextProbe(): Uint8Array {
    this.n += 1;
    this.sent.set(this.n, { at: performance.now(), session: this.session });
    if (this.sent.size > Prober.MAX_OUTSTANDING) {
      // Numbers only grow and a Map keeps insertion order: the first key is the oldest.
      const oldest = this.sent.keys().next().value;
      if (oldest !== undefined) this.sent.delete(oldest);
    }
    return encodeProbe({ i: this.id, n: this.n });
  }

  /** Call on every disconnect (or dropped message): outstanding probes no longer prove anything. */
  newSession(): void {
    this.session += 1;
  }

  /** Apply a checkpoint; true when it advanced the proof. */
  onCheckpoint(payload: Uint8Array | string, accept = true): boolean {
    const checkpoint = decodeCheckpoint(payload);
    if (checkpoint === null) return false;
    this.checkpoints += 1;
    if (accept && checkpoint.position > (this.seenPosition ?? -1)) {
      this.seenPosition = checkpoint.position;
    }
    const n = Object.prototype.hasOwnProperty.call(checkpoint.probes, this.id) ? checkpoint.probes[this.id] : undefined;
    const sent = n !== undefined ? this.sent.get(n) : undefined;
    if (n === undefined || sent === undefined || !accept || sent.session !== this.session) return false;
    for (const k of [...this.sent.keys()]) {
      if (k <= n) this.sent.delete(k);
    }
    if (sent.at > this.provenAt) {
      this.provenAt = sent.at;
      this.provenPosition = checkpoint.position;
      return true;
    }
    return false;
  }

  /** Seconds since the send time of the newest echoed probe (`Infinity`: no proof yet). */
  age(): number {
    return (performance.now() - this.provenAt) / 1000;
  }
}
