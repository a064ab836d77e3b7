// keyledger down (its serve process killed): verify fails closed, unless failOpen.
import assert from "node:assert/strict";
import { after, before, test } from "node:test";
import { performance } from "node:perf_hooks";

import { hashKey, KeyCache } from "../dist/index.js";
import { createKey, devSession, killKeyledger, lastServed, quiet, startKeyledger, waitFor, WAIT_MS } from "./harness.mjs";

let kl;

before(async () => {
  kl = await startKeyledger();
}, { timeout: 120_000 });

after(async () => {
  if (kl) await kl.stop(); // also stops the embedded servers the killed process left behind
}, { timeout: 60_000 });

test("keyledger killed: verify answers KEYLEDGER_UNAVAILABLE (fail closed); failOpen serves only stale positives",
  { timeout: 90_000 }, async () => {
    const session = devSession(kl);
    const k = await createKey(kl, session);
    const other = await createKey(kl, session);
    const closed = new KeyCache({ baseUrl: kl.url, natsUrl: kl.natsUrl, logger: quiet });
    const open = new KeyCache({ baseUrl: kl.url, natsUrl: kl.natsUrl, logger: quiet, failOpen: true });
    try {
      for (const cache of [closed, open]) {
        await cache.start();
        await waitFor(() => cache.caughtUp, WAIT_MS, "cache caught up");
        assert.equal((await cache.verify(k.key)).valid, true);
        assert.equal((await cache.verify(other.key)).valid, true);
      }

      await killKeyledger(kl); // SIGKILL: its relay dies with it, so no checkpoint comes any more
      const killedAt = performance.now();
      assert.equal(kl.alive, false);
      const served = await lastServed(closed, k.key);
      assert.ok(served === null || served - killedAt < closed.staleness * 1000, "served past the bound");
      assert.equal(closed.trusted, false);
      const answer = await closed.verify(k.key);
      assert.equal(answer.valid, false);
      assert.equal(answer.error.code, "KEYLEDGER_UNAVAILABLE");
      const unknown = await closed.verify("U".repeat(64));
      assert.equal(unknown.error.code, "KEYLEDGER_UNAVAILABLE");

      await waitFor(() => open.verifyCached(k.key) === null, WAIT_MS, "entry no longer provably fresh");
      assert.equal((await open.verify(k.key)).valid, true, "failOpen: the stale (never evicted) positive");
      const never = await open.verify("U".repeat(64));
      assert.equal(never.valid, false, "but never an unknown key");
      assert.equal(never.error.code, "KEYLEDGER_UNAVAILABLE");
      open.invalidate({ keyHash: hashKey(other.key) });
      const evicted = await open.verify(other.key);
      assert.equal(evicted.valid, false, "nor an evicted one");
      assert.equal(evicted.error.code, "KEYLEDGER_UNAVAILABLE");
    } finally {
      await closed.close();
      await open.close();
    }
  });
