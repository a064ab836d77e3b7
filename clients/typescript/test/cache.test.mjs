// KeyCache against a real keyledger service (embedded PostgreSQL + nats-server, started by `keyledger serve`).
import assert from "node:assert/strict";
import http from "node:http";
import { after, before, test } from "node:test";
import { performance } from "node:perf_hooks";

import { connect } from "nats";

import { hashKey, KeyCache } from "../dist/index.js";
import {
  createKey, createServerKey, devSession, freePort, lastServed, quiet, revocation, revokeKey, sleep, startKeyledger,
  TcpProxy, waitFor, WAIT_MS,
} from "./harness.mjs";

const STALENESS = 1.0; // the default; the bounds below are exact, so no scheduling slack is added to it
const STALENESS_MS = STALENESS * 1000;
const TEST_TIMEOUT = 90_000;

let kl;
let session;
let watcher; // our own NATS connection, watching what keyledger publishes
const published = []; // invalidations seen on the wire

before(async () => {
  kl = await startKeyledger();
  session = devSession(kl);
  watcher = await connect({ servers: kl.natsUrl });
  watcher.subscribe("apikey.cache.invalidate", { callback: (err, msg) => err || published.push(msg.json()) });
}, { timeout: 120_000 });

after(async () => {
  await watcher?.close().catch(() => {});
  if (kl) await kl.stop();
}, { timeout: 60_000 });

function newCache(options = {}) {
  return new KeyCache({ baseUrl: kl.url, natsUrl: kl.natsUrl, logger: quiet, ...options });
}

/** The receipts on the wire from now on (every cache's), appended as they arrive; `sub.unsubscribe()` ends it. */
function watchReceipts() {
  const receipts = [];
  const sub = watcher.subscribe("apikey.cache.receipts", { callback: (err, msg) => err || receipts.push(msg.json()) });
  return { receipts, sub };
}

async function key() {
  const created = await createKey(kl, session);
  return { key: created.key, id: created.id, userId: created.referenceId };
}

test("a revocation reaches the cache: evicted, then refused; its receipt confirms it", { timeout: TEST_TIMEOUT }, async () => {
  const { receipts, sub } = watchReceipts();
  const applied = [];
  // Several NATS servers (comma-separated), one of them down: the client connects to the one that answers.
  const down = await freePort();
  const cache = newCache({
    natsUrl: `nats://127.0.0.1:${down}, ${kl.natsUrl}`, service: "ts-test", onInvalidation: (inv) => applied.push(inv),
  });
  assert.deepEqual(cache.natsUrl, [`nats://127.0.0.1:${down}`, kl.natsUrl]);
  try {
    await cache.start();
    await waitFor(() => cache.caughtUp, WAIT_MS, "cache caught up");
    const k = await key();
    const other = await key();
    assert.equal((await cache.verify(k.key)).valid, true);
    assert.equal((await cache.verify(other.key)).valid, true);
    const calls = cache.httpVerifications;
    const answer = await cache.verify(k.key);
    assert.equal(answer.valid, true);
    assert.equal(answer.key.id, k.id);
    assert.equal(cache.httpVerifications, calls, "the second verify is served from memory");
    assert.equal(cache.size, 2);
    // keyledger lists this cache among the live ones only after a first (heartbeat) receipt.
    await waitFor(() => receipts.some((r) => r.cacheId === cache.cacheId), WAIT_MS, "a heartbeat receipt");
    assert.deepEqual(Object.keys(receipts.find((r) => r.cacheId === cache.cacheId)),
      ["cacheId", "service", "position", "applied"]);

    const evictions = cache.evictions;
    await revokeKey(kl, session, k.id);
    // Evicted by the invalidation (the cache is trusted: nothing else would end the entry).
    await waitFor(() => cache.verifyCached(k.key) === null, WAIT_MS, "the revoked key evicted");
    await waitFor(() => applied.some((i) => i.keyId === k.id), WAIT_MS, "onInvalidation called");
    const inv = applied.find((i) => i.keyId === k.id);
    assert.equal(inv.keyHash, hashKey(k.key));
    assert.equal(inv.reason, "revoked");
    assert.ok(Number.isInteger(inv.position));
    assert.equal(cache.evictions, evictions + 1);
    assert.equal(cache.lastInvalidation.keyId, k.id);
    const refused = await cache.verify(k.key);
    assert.equal(refused.valid, false);
    assert.equal(refused.error.code, "INVALID_API_KEY");
    // The other key is untouched and still answered from memory.
    assert.ok(cache.verifyCached(other.key)?.valid);

    // A receipt naming the revocation's position as applied, at once (no checkpoint awaited), and keyledger's
    // verdict: confirmed in this cache.
    await waitFor(() => receipts.some((r) => r.cacheId === cache.cacheId && r.applied.includes(inv.position)), WAIT_MS,
      "a receipt naming the applied invalidation");
    const mine = receipts.filter((r) => r.cacheId === cache.cacheId);
    assert.ok(mine.every((r) => r.service === "ts-test"));
    let verdict;
    await waitFor(async () => {
      verdict = await revocation(kl, session, k.id);
      return verdict.status === 200 && verdict.json.caches.some((c) => c.cacheId === cache.cacheId && c.state === "confirmed");
    }, WAIT_MS, "keyledger records this cache's confirmation", 100);
    assert.equal(verdict.json.keyId, k.id);
  } finally {
    sub.unsubscribe();
    await cache.close();
  }
});

test("a burst of invalidations: each receipt names at most 1,024 applied positions, the newest", { timeout: TEST_TIMEOUT }, async () => {
  const { receipts, sub } = watchReceipts();
  const cache = newCache({ cacheId: "ts-burst" });
  try {
    await cache.start();
    await waitFor(() => cache.caughtUp, WAIT_MS, "cache caught up");
    // 3,000 invalidations in one flush (hand-made: positions far beyond the log's, so keyledger ignores them):
    // once the receipt budget's first 8 are spent (a receipt per socket read), the next receipt, 0.25 s later,
    // would name all applied meanwhile, thousands.
    const first = 5_000_000_000_000;
    for (let i = 0; i < 3000; i++) {
      watcher.publish("apikey.cache.invalidate", JSON.stringify({
        keyId: `burst-${i}`, keyHash: "0".repeat(64), reason: "revoked", position: first + i,
        occurredAt: new Date().toISOString(),
      }));
    }
    await watcher.flush();
    const last = first + 2999;
    await waitFor(() => receipts.some((r) => r.cacheId === "ts-burst" && r.applied.includes(last)), WAIT_MS,
      "a receipt naming the last invalidation");
    const burst = receipts.filter((r) => r.cacheId === "ts-burst" && r.applied.length > 0);
    assert.ok(burst.every((r) => r.applied.length <= 1024), `${burst.map((r) => r.applied.length)}`);
    for (const r of burst) {  // the newest of each read, in order
      assert.deepEqual(r.applied, [...r.applied].sort((a, b) => a - b));
    }
    assert.equal(cache.invalidationsApplied >= 3000, true);
  } finally {
    sub.unsubscribe();
    await cache.close();
  }
});

test("a storm of invalidations: no more receipts than the budget, each named", { timeout: TEST_TIMEOUT }, async () => {
  const { receipts, sub } = watchReceipts();
  const cache = newCache({ cacheId: "ts-frugal", receiptBurst: 2, receiptRate: 1 });
  try {
    await cache.start();
    await waitFor(() => cache.caughtUp, WAIT_MS, "cache caught up");
    // Ten invalidations 20 ms apart (hand-made, as above), each its own socket read: a receipt each without the
    // budget (2 at once, then 1 a second).
    const first = 6_000_000_000_000;
    const start = performance.now();
    const before = receipts.length;
    for (let i = 0; i < 10; i++) {
      watcher.publish("apikey.cache.invalidate", JSON.stringify({
        keyId: `frugal-${i}`, keyHash: "0".repeat(64), reason: "revoked", position: first + i,
        occurredAt: new Date().toISOString(),
      }));
      await watcher.flush();
      await sleep(20);
    }
    await waitFor(() => receipts.some((r) => r.cacheId === "ts-frugal" && r.applied.includes(first + 9)), WAIT_MS,
      "a receipt naming the last invalidation");
    const took = (performance.now() - start) / 1000;
    const mine = receipts.slice(before).filter((r) => r.cacheId === "ts-frugal");
    assert.ok(mine.length <= 2 + took + 1, `${mine.length} receipts in ${took} s`); // (+1: one sent just before)
    const named = mine.flatMap((r) => r.applied).sort((a, b) => a - b);
    assert.deepEqual(named, Array.from({ length: 10 }, (_, i) => first + i));
    assert.equal(cache.receiptsSent >= mine.length, true);
  } finally {
    sub.unsubscribe();
    await cache.close();
  }
});

test("trusted only through checkpoint echoes of its own probes", { timeout: TEST_TIMEOUT }, async () => {
  // Same NATS, but a prefix nobody answers: connected, yet no checkpoint ever echoes its probes.
  const deaf = newCache({ topology: { prefix: "nobody-answers" } });
  const noNats = new KeyCache({ baseUrl: kl.url, logger: quiet });
  const good = newCache();
  try {
    await Promise.all([deaf.start(), noNats.start(), good.start()]);
    await waitFor(() => good.caughtUp, WAIT_MS, "the right cache trusts itself");
    assert.ok(good.proofAge <= STALENESS);
    await waitFor(() => deaf.connected, WAIT_MS, "the deaf cache connected");
    await sleep(3 * deaf.syncInterval * 1000 + 500); // several probes sent, none answered
    assert.equal(deaf.connected, true);
    assert.equal(deaf.trusted, false);
    assert.equal(deaf.caughtUp, false);
    assert.equal(deaf.proofAge, Infinity);
    assert.equal(noNats.trusted, false);

    const k = await key();
    // Untrusted caches serve an entry only `staleness` after its own verification, then ask keyledger again.
    for (const cache of [deaf, noNats]) {
      const asked = performance.now();
      assert.equal((await cache.verify(k.key)).valid, true);
      const took = performance.now() - asked;
      const served = await lastServed(cache, k.key);
      if (took < STALENESS_MS / 2) assert.ok(served !== null, "served from memory right after its verification");
      // (the verification was sent between `asked` and `asked + took`)
      assert.ok(served === null || served - asked <= STALENESS_MS + took, `served ${served - asked} ms after verification`);
      const calls = cache.httpVerifications;
      assert.equal((await cache.verify(k.key)).valid, true);
      assert.equal(cache.httpVerifications, calls + 1, "re-verified over HTTP");
    }
    // The trusted cache keeps serving it from memory past `staleness`: the echoes prove nothing was missed.
    const asked = performance.now();
    assert.equal((await good.verify(k.key)).valid, true);
    const calls = good.httpVerifications;
    while (performance.now() - asked <= STALENESS_MS + 100) await sleep(50);
    await waitFor(() => good.trusted, WAIT_MS, "the right cache trusts itself");
    assert.ok(good.verifyCached(k.key)?.valid);
    assert.equal((await good.verify(k.key)).valid, true);
    assert.equal(good.httpVerifications, calls);
  } finally {
    await Promise.all([deaf.close(), noNats.close(), good.close()]);
  }
});

test("limited keys are verified by keyledger every time", { timeout: TEST_TIMEOUT }, async () => {
  const cache = newCache();
  try {
    await cache.start();
    await waitFor(() => cache.caughtUp, WAIT_MS, "cache caught up");
    const owner = (await key()).userId;
    const once = await createServerKey(kl, owner, { remaining: 1 });
    const limited = await createServerKey(kl, owner, { rateLimitEnabled: true, rateLimitMax: 1000, rateLimitTimeWindow: 60_000 });

    let calls = cache.httpVerifications;
    const first = await cache.verify(once.key);
    assert.equal(first.valid, true);
    assert.equal(first.key.remaining, 0);
    assert.equal(cache.verifyCached(once.key), null, "a usage-limited positive is never cached");
    const second = await cache.verify(once.key);
    assert.equal(second.valid, false);
    assert.equal(second.error.code, "USAGE_EXCEEDED");
    assert.equal(cache.httpVerifications, calls + 2);

    calls = cache.httpVerifications;
    for (let i = 0; i < 3; i++) {
      const answer = await cache.verify(limited.key);
      assert.equal(answer.valid, true);
      assert.equal(answer.key.rateLimitEnabled, true);
      assert.equal(cache.verifyCached(limited.key), null, "a rate-limited positive is never cached");
    }
    assert.equal(cache.httpVerifications, calls + 3);
  } finally {
    await cache.close();
  }
});

test("answers: negatives briefly, one verification per key at a time, failover, 4xx, max age", { timeout: TEST_TIMEOUT }, async () => {
  // A "keyledger" that always fails with 503, in front of the real one: failover past it.
  const broken = http.createServer((req, res) => {
    req.resume();
    res.writeHead(503, { "content-type": "application/json" }).end('{"message":"down","code":"SERVICE_UNAVAILABLE"}');
  });
  await new Promise((resolve) => broken.listen(0, "127.0.0.1", resolve));
  const deadPort = await freePort(); // nothing listens there
  const asked = [];
  const countingFetch = (url, init) => {
    asked.push(new URL(url).port);
    return fetch(url, init);
  };
  const brokenUrl = `http://127.0.0.1:${broken.address().port}`;
  try {
    // Negatives are cached for negativeTtl, then asked again.
    const neg = new KeyCache({ baseUrl: kl.url, staleness: 30, negativeTtl: 0.3, logger: quiet });
    const bogus = "B".repeat(64);
    const t = performance.now();
    const no = await neg.verify(bogus);
    const took = performance.now() - t;
    assert.equal(no.valid, false);
    assert.equal(no.error.code, "INVALID_API_KEY");
    const served = await lastServed(neg, bogus);
    assert.ok(served === null || served - t <= 300 + took, "served for negativeTtl at most");
    const calls = neg.httpVerifications;
    assert.equal((await neg.verify(bogus)).valid, false);
    assert.equal(neg.httpVerifications, calls + 1);
    assert.equal((await neg.verify("")).error.code, "KEY_NOT_FOUND");

    // Concurrent callers of one key share one HTTP verification.
    const shared = new KeyCache({ baseUrl: kl.url, logger: quiet });
    const k = await key();
    const answers = await Promise.all(Array.from({ length: 20 }, () => shared.verify(k.key)));
    assert.ok(answers.every((a) => a.valid && a.key.id === k.id));
    assert.equal(shared.httpVerifications, 1);

    // Failover on transport errors and 5xx; the one that answered is asked first next time.
    const failover = new KeyCache({
      baseUrl: [`http://127.0.0.1:${deadPort}`, `${brokenUrl},${kl.url}`], logger: quiet, fetch: countingFetch,
    });
    assert.deepEqual([...failover.baseUrls], [`http://127.0.0.1:${deadPort}`, brokenUrl, kl.url]);
    assert.equal((await failover.verify(k.key)).valid, true);
    assert.deepEqual(asked, [String(deadPort), String(broken.address().port), String(kl.port)]);
    assert.equal(failover.activeBaseUrl, kl.url);
    const k2 = await key();
    asked.length = 0;
    assert.equal((await failover.verify(k2.key)).valid, true);
    assert.deepEqual(asked, [String(kl.port)]);

    // Only 5xx everywhere: unavailable (fail closed), never "invalid key".
    const allBroken = new KeyCache({ baseUrl: brokenUrl, logger: quiet });
    const down = await allBroken.verify(k.key);
    assert.equal(down.valid, false);
    assert.equal(down.error.code, "KEYLEDGER_UNAVAILABLE");
    // A 4xx other than 429: invalid.
    const notFound = new KeyCache({ baseUrl: `${kl.url}/no-such-prefix`, logger: quiet });
    const refused = await notFound.verify(k.key);
    assert.equal(refused.valid, false);
    assert.equal(refused.error.code, "INVALID_API_KEY");

    // maxAge bounds an entry even while the cache is trusted.
    const bounded = newCache({ staleness: 30, maxAge: 1.5 });
    try {
      await bounded.start();
      await waitFor(() => bounded.caughtUp, WAIT_MS, "cache caught up");
      const t0 = performance.now();
      assert.equal((await bounded.verify(k.key)).valid, true);
      const took = performance.now() - t0;
      const last = await lastServed(bounded, k.key);
      assert.ok(last !== null && last - t0 <= 1500 + took, "served for maxAge at most");
      assert.ok(bounded.trusted);
      const before = bounded.httpVerifications;
      assert.equal((await bounded.verify(k.key)).valid, true);
      assert.equal(bounded.httpVerifications, before + 1);
    } finally {
      await bounded.close();
    }
  } finally {
    await new Promise((resolve) => broken.close(resolve));
  }
});

test("a verification in flight while its key is evicted is answered but not cached", { timeout: TEST_TIMEOUT }, async () => {
  let hold = null;
  let answered = false;
  const gatedFetch = async (url, init) => {
    const response = await fetch(url, init);
    const text = await response.text();
    answered = true;
    if (hold) await hold;
    return new Response(text, { status: response.status, headers: response.headers });
  };
  const cache = new KeyCache({ baseUrl: kl.url, staleness: 3600, logger: quiet, fetch: gatedFetch });
  const k = await key();
  let release;
  hold = new Promise((resolve) => (release = resolve));
  const verifying = cache.verify(k.key);
  await waitFor(() => answered, WAIT_MS, "keyledger's answer, held back");
  cache.invalidate({ keyId: k.id }); // what an invalidation message does, while the answer is in flight
  release();
  hold = null;
  const answer = await verifying;
  assert.equal(answer.valid, true); // answered...
  assert.equal(answer.key.id, k.id);
  assert.equal(cache.verifyCached(k.key), null); // ...but not cached
  const calls = cache.httpVerifications;
  assert.equal((await cache.verify(k.key)).valid, true);
  assert.equal(cache.httpVerifications, calls + 1);
  assert.ok(cache.verifyCached(k.key)?.valid, "a verification no eviction overtook is cached");
  // An invalidation evicts every cached secret of its key id, and by hash.
  cache.invalidate({ keyHash: hashKey(k.key) });
  assert.equal(cache.verifyCached(k.key), null);
});

test("NATS cut between the cache and NATS: trust ends within staleness, a key revoked meanwhile is refused, then replay",
  { timeout: TEST_TIMEOUT }, async () => {
    const proxy = await new TcpProxy(kl.natsPort).start();
    const cache = newCache({ natsUrl: `nats://${proxy.url}`, staleness: STALENESS });
    try {
      await cache.start();
      await waitFor(() => cache.caughtUp, WAIT_MS, "cache caught up");
      const [revoked, kept, other] = [await key(), await key(), await key()];
      for (const k of [revoked, kept, other]) assert.equal((await cache.verify(k.key)).valid, true);
      assert.ok([revoked, kept, other].every((k) => cache.verifyCached(k.key) !== null));

      await proxy.cut();
      const cutAt = performance.now(); // no echo can arrive after this: every proof predates it
      const watching = [lastServed(cache, revoked.key), lastServed(cache, kept.key)];
      await waitFor(() => !cache.trusted, STALENESS_MS + 1000, "trust ended within staleness + 1 s");
      await waitFor(() => !cache.connected, WAIT_MS, "the cache noticed the cut");
      // Two revocations while the cache cannot hear: both invalidations reach the stream.
      await revokeKey(kl, session, revoked.id);
      await revokeKey(kl, session, other.id);
      await waitFor(() => [revoked.id, other.id].every((id) => published.some((p) => p.keyId === id)), WAIT_MS,
        "invalidations published");
      assert.ok(cache.lastInvalidation?.keyId !== revoked.id, "the cache did not hear it");

      // Bounded staleness: entries verified before the cut are served at most `staleness` after the last proof.
      for (const served of await Promise.all(watching)) {
        assert.ok(served !== null && served - cutAt < STALENESS_MS, `served ${served - cutAt} ms after the cut`);
      }
      assert.equal(cache.trusted, false);
      // The revoked key is re-verified over HTTP, where it is revoked.
      const refused = await cache.verify(revoked.key);
      assert.equal(refused.valid, false);
      assert.equal(refused.error.code, "INVALID_API_KEY");
      // An unrevoked key is re-verified too.
      const calls = cache.httpVerifications;
      assert.equal((await cache.verify(kept.key)).valid, true);
      assert.equal(cache.httpVerifications, calls + 1);

      // Reconnect: the cache replays what it missed before it trusts itself again.
      const flushes = cache.flushes;
      await proxy.start();
      await waitFor(() => cache.caughtUp, WAIT_MS, "cache caught up again");
      assert.ok(cache.replayed >= 2, `replayed ${cache.replayed}`);
      assert.equal(cache.flushes, flushes);
      // `other` was never re-verified during the cut: only the replay can have evicted it.
      assert.equal(cache.verifyCached(other.key), null);
      assert.equal((await cache.verify(other.key)).valid, false);
      // `kept` survived (replay, not flush): served from memory again.
      assert.ok(cache.verifyCached(kept.key)?.valid);
    } finally {
      await cache.close();
      await proxy.cut();
    }
  });

// Last in this file: it deletes keyledger's invalidations stream.
test("invalidations stream deleted and recreated: refused, untrusted, then flushed", { timeout: TEST_TIMEOUT }, async () => {
  const proxy = await new TcpProxy(kl.natsPort).start();
  const cache = newCache({ natsUrl: `nats://${proxy.url}` });
  const admin = await connect({ servers: kl.natsUrl });
  try {
    const jsm = await admin.jetstreamManager();
    await cache.start();
    await waitFor(() => cache.caughtUp, WAIT_MS, "cache caught up");
    const [revoked, kept] = [await key(), await key()];
    for (const k of [revoked, kept]) assert.equal((await cache.verify(k.key)).valid, true);

    const { config } = await jsm.streams.info("APIKEY_INVALIDATIONS");
    await jsm.streams.delete("APIKEY_INVALIDATIONS");
    // With no stream to store it, keyledger cannot acknowledge the revocation's invalidation, so no checkpoint can
    // vouch for it any more: the cache must refuse the key and stop trusting itself, never serve it stale.
    await revokeKey(kl, session, revoked.id);
    const revokedAt = performance.now();
    await waitFor(() => !cache.trusted, WAIT_MS, "trust ended");
    const served = await lastServed(cache, revoked.key);
    assert.ok(served === null || served - revokedAt < STALENESS_MS, `served ${served - revokedAt} ms after the revocation`);
    const refused = await cache.verify(revoked.key);
    assert.equal(refused.valid, false);
    assert.equal(refused.error.code, "INVALID_API_KEY");

    // Cut off, the stream is created again: its sequence numbers start over, so the cache cannot tell what it
    // missed and flushes everything once it is back.
    await proxy.cut();
    await waitFor(() => !cache.connected, WAIT_MS, "the cache noticed the cut");
    await jsm.streams.add(config);
    assert.ok(cache.verifyCached(kept.key) === null || !cache.trusted);
    const flushes = cache.flushes;
    const replayed = cache.replayed;
    await proxy.start();
    await waitFor(() => cache.caughtUp, WAIT_MS, "cache caught up with the new stream");
    assert.ok(cache.flushes > flushes, "flushed");
    assert.equal(cache.replayed, replayed, "nothing replayed from a stream it cannot trust");
    assert.equal(cache.size, 0);
    assert.equal(cache.verifyCached(kept.key), null);
    const calls = cache.httpVerifications;
    assert.equal((await cache.verify(kept.key)).valid, true);
    assert.equal(cache.httpVerifications, calls + 1);
    assert.equal((await cache.verify(revoked.key)).valid, false);
  } finally {
    await cache.close();
    await proxy.cut();
    await admin.close();
  }
});
