/**
 * NATS names (keyledger's `service/config.py`, class `Topology`). The defaults are the public contract; tests and
 * staging override them to isolate themselves.
 */
export interface TopologyOptions {
  /** Subjects `<prefix>.events.…`, `<prefix>.cache.invalidate`, …; default `apikey`. */
  prefix?: string;
  /** JetStream stream of events; default `APIKEY_EVENTS` (the cache does not read it). */
  eventsStream?: string;
  /** JetStream stream of cache invalidations; default `APIKEY_INVALIDATIONS`. */
  invalidationsStream?: string;
}

export class Topology {
  readonly prefix: string;
  readonly eventsStream: string;
  readonly invalidationsStream: string;

  constructor(options: TopologyOptions = {}) {
    this.prefix = options.prefix ?? "apikey";
    this.eventsStream = options.eventsStream ?? "APIKEY_EVENTS";
    this.invalidationsStream = options.invalidationsStream ?? "APIKEY_INVALIDATIONS";
  }

  /** `KEYLEDGER_SUBJECT_PREFIX`, `KEYLEDGER_EVENTS_STREAM`, `KEYLEDGER_INVALIDATIONS_STREAM` (the service's names). */
  static fromEnv(env: Record<string, string | undefined> = process.env): Topology {
    return new Topology({
      prefix: env.KEYLEDGER_SUBJECT_PREFIX || undefined,
      eventsStream: env.KEYLEDGER_EVENTS_STREAM || undefined,
      invalidationsStream: env.KEYLEDGER_INVALIDATIONS_STREAM || undefined,
    });
  }

  /** Invalidations (core NATS, also captured by the invalidations stream). */
  get invalidationSubject(): string {
    return `${this.prefix}.cache.invalidate`;
  }

  /** Freshness probes, from each cache to keyledger's relay. */
  get probeSubject(): string {
    return `${this.prefix}.cache.probe`;
  }

  /** Checkpoints forwarded by the invalidation projection behind the invalidations they vouch for. */
  get checkpointSubject(): string {
    return `${this.prefix}.cache.checkpoint`;
  }

  /** Revocation receipts, from each cache. */
  get receiptsSubject(): string {
    return `${this.prefix}.cache.receipts`;
  }

  /** keyledger's "revoked everywhere" announcements. */
  get effectiveSubject(): string {
    return `${this.prefix}.revocation.effective`;
  }
}
