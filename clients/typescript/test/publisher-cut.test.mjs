// The publisher cut from NATS: keyledger keeps revoking (the event waits in its outbox) but cannot publish, so no
// invalidation and no checkpoint reaches the cache. The cache must stop trusting itself within `staleness` and
// refuse the revoked key, without ever hearing of the revocation.
//
// Two serves share one database: the first (embedded mode: it owns PostgreSQL and nats-server) serves HTTP only
// (--no-relay --no-projections); the second runs the relay and the projections, and reaches NATS through our proxy.
import assert from "node:assert/strict";
import { randomBytes } from "node:crypto";
import { after, before, test } from "node:test";
import { performance } from "node:perf_hooks";

import { KeyCache } from "../dist/index.js";
import {
  createKey, devSession, lastServed, quiet, revokeKey, startKeyledger, stopKeyledger, TcpProxy, waitFor, WAIT_MS,
} from "./harness.mjs";

const STALENESS_MS = 1000;
const secret = randomBytes(24).toString("hex");
let http; // embedded servers + HTTP only
let proxy; // between the publisher and NATS
let publisher;

before(async () => {
  http = await startKeyledger({ secret, args: ["--no-relay", "--no-projections"], ready: false });
  assert.ok(http.databaseUrl, "the embedded PostgreSQL URL is printed on stderr");
  proxy = await new TcpProxy(http.natsPort).start();
  publisher = await startKeyledger({ secret, databaseUrl: http.databaseUrl, natsUrl: `nats://${proxy.url}` });
}, { timeout: 180_000 });

after(async () => {
  if (proxy && !proxy.server) await proxy.start().catch(() => {}); // let the publisher stop cleanly
  if (publisher) await stopKeyledger(publisher);
  await proxy?.cut();
  if (http) await stopKeyledger(http);
}, { timeout: 90_000 });

test("publisher cut from NATS: the cache stops trusting itself and refuses a key revoked meanwhile", { timeout: 120_000 }, async () => {
  const session = devSession(http);
  const revoked = await createKey(http, session);
  const kept = await createKey(http, session);
  const cache = new KeyCache({ baseUrl: [http.url, publisher.url], natsUrl: http.natsUrl, logger: quiet });
  try {
    await cache.start();
    await waitFor(() => cache.caughtUp, WAIT_MS, "cache caught up (echoes through the publisher)");
    for (const k of [revoked, kept]) assert.equal((await cache.verify(k.key)).valid, true);

    await proxy.cut();
    const cutAt = performance.now(); // no probe reaches the relay after this, so no later proof can come back
    const watching = lastServed(cache, revoked.key);
    await revokeKey(http, session, revoked.id); // keyledger revokes without NATS: the event waits in its outbox
    await waitFor(() => !cache.trusted, STALENESS_MS + 1000, "trust ended within staleness + 1 s of the cut");
    const served = await watching;
    assert.ok(served !== null && served - cutAt < STALENESS_MS, `served ${served - cutAt} ms after the cut`);
    assert.equal(cache.connected, true, "the cache's own link is fine");
    assert.ok(cache.lastInvalidation?.keyId !== revoked.id, "the invalidation could not be published");
    const refused = await cache.verify(revoked.key);
    assert.equal(refused.valid, false);
    assert.equal(refused.error.code, "INVALID_API_KEY");
    assert.equal((await cache.verify(kept.key)).valid, true);

    // The publisher reaches NATS again: the outbox drains, the invalidation arrives, the proof resumes.
    await proxy.start();
    await waitFor(() => cache.lastInvalidation?.keyId === revoked.id, 60_000, "the invalidation, once published");
    await waitFor(() => cache.caughtUp, 60_000, "trusted again");
    assert.equal(cache.verifyCached(revoked.key), null);
    assert.equal((await cache.verify(revoked.key)).valid, false);
  } finally {
    await cache.close();
  }
});
