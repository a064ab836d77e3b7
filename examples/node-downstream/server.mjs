// A downstream service protected by keyledger keys: GET /api/data behind keyledger-client's Fastify plugin,
// GET /health open.
//
//   ./dev.sh run                                   # keyledger on :3000, its NATS on :4250 (from the repository root)
//   (cd clients/typescript && npm ci && npm run build)
//   (cd examples/node-downstream && npm install && npm start)
//   curl -H "Authorization: Bearer $KEY" http://127.0.0.1:3100/api/data     # {"ok":true,"keyId":"..."}
//   curl "http://127.0.0.1:3100/api/data?api_key=$KEY"                      # the same
//
// A missing, invalid, revoked, disabled or expired key gets 401 {"error":"Unauthorized"}. Revoking the key in
// keyledger makes the next requests fail within milliseconds: the cache evicts it when keyledger's invalidation
// arrives over NATS.
//
// Environment: KEYLEDGER_URL (default http://127.0.0.1:3000; a comma-separated list fails over), NATS_URL (default
// nats://127.0.0.1:4250, what `./dev.sh run` gives; comma-separated for a cluster; empty: no NATS, a plain 1 s
// cache), KEYLEDGER_SUBJECT_PREFIX and KEYLEDGER_INVALIDATIONS_STREAM (the names keyledger uses), HOST (127.0.0.1),
// PORT (3100), CACHE_ID and SERVICE (this cache's names in keyledger's revocation receipts).
import Fastify from "fastify";
import { KeyCache, Topology } from "keyledger-client";
import keyledgerAuth from "keyledger-client/fastify";

const env = process.env;
const cache = new KeyCache({
  baseUrl: env.KEYLEDGER_URL || "http://127.0.0.1:3000",
  natsUrl: env.NATS_URL ?? "nats://127.0.0.1:4250",
  topology: Topology.fromEnv(),
  cacheId: env.CACHE_ID || undefined,
  service: env.SERVICE || "node-downstream-example",
});

const app = Fastify({ logger: { level: env.LOG_LEVEL || "warn" } });

// The plugin starts the cache now and closes it with the app (manageCache); /health needs no key.
await app.register(keyledgerAuth, { cache, exclude: ["/health"], manageCache: true });

app.get("/api/data", async (request) => ({ ok: true, keyId: request.apiKey.id }));

app.get("/health", async () => ({
  ok: true,
  // trusted: the cache holds a freshness proof from keyledger's log (not just a live connection).
  cacheTrusted: cache.trusted,
  cacheCaughtUp: cache.caughtUp,
  natsConnected: cache.connected,
  entries: cache.size,
  hits: cache.hits,
  httpVerifications: cache.httpVerifications,
  invalidationsApplied: cache.invalidationsApplied,
}));

for (const signal of ["SIGINT", "SIGTERM"]) {
  process.once(signal, () => {
    app.close().then(() => process.exit(0), () => process.exit(1));
  });
}

const port = Number(env.PORT || 3100);
const host = env.HOST || "127.0.0.1";
await app.listen({ host, port });
console.log(`node-downstream: listening on http://${host}:${port} (keyledger ${cache.baseUrls.join(", ")}; ` +
  `NATS ${cache.natsUrl ? cache.natsUrl.join(", ") : "none"}; prefix ${cache.topology.prefix})`);
