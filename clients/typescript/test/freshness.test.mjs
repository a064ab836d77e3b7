// The prober's rules and the wire formats (no servers needed).
import assert from "node:assert/strict";
import { test } from "node:test";

import { decodeCheckpoint, encodeProbe, encodeReceipt, hashKey, KeyCache, Prober, Topology } from "../dist/index.js";

const text = (bytes) => new TextDecoder().decode(bytes);
const checkpoint = (position, probes) => JSON.stringify({ position, probes, epoch: 1, createdAt: "2026-01-01T00:00:00Z" });

test("probes are {i, n}; an echo proves the probe's send time, only in its own session and with no gap", () => {
  const p = new Prober();
  assert.match(p.id, /^[0-9a-f]{16}$/);
  const first = JSON.parse(text(p.nextProbe()));
  assert.deepEqual(first, { i: p.id, n: 1 });
  assert.equal(p.provenAt, -Infinity);
  assert.equal(p.age(), Infinity);

  assert.equal(p.onCheckpoint(checkpoint(5, { other: 1 })), false, "someone else's probe proves nothing here");
  assert.equal(p.seenPosition, 5);
  assert.equal(p.onCheckpoint(checkpoint(6, { [p.id]: 1 }), false), false, "not while a gap is open");
  assert.equal(p.seenPosition, 5, "nor does a checkpoint count as seen then");
  assert.equal(p.onCheckpoint(checkpoint(6, { [p.id]: 1 })), true);
  assert.ok(p.provenAt > 0 && p.age() < 1);
  assert.equal(p.provenPosition, 6);
  assert.equal(p.onCheckpoint(checkpoint(7, { [p.id]: 1 })), false, "an answered probe does not prove twice");

  p.nextProbe(); // n = 2, session 0
  p.newSession(); // a disconnect
  assert.equal(p.onCheckpoint(checkpoint(8, { [p.id]: 2 })), false, "sent before the disconnect: proves nothing");
  p.nextProbe(); // n = 3, session 1
  assert.equal(p.onCheckpoint(checkpoint(9, { [p.id]: 3 })), true);
  assert.equal(p.onCheckpoint("not json"), false);
  assert.equal(p.onCheckpoint(JSON.stringify({ probes: {} })), false, "no position: not a checkpoint");
  assert.equal(p.checkpoints, 6);
});

test("the prober remembers at most 256 outstanding probes", () => {
  const p = new Prober();
  for (let i = 0; i < 300; i++) p.nextProbe();
  assert.equal(p.onCheckpoint(checkpoint(1, { [p.id]: 10 })), false, "forgotten");
  assert.equal(p.onCheckpoint(checkpoint(1, { [p.id]: 300 })), true);
});

test("wire formats", () => {
  assert.equal(text(encodeProbe({ i: "abc", n: 7 })), '{"i":"abc","n":7}');
  assert.equal(text(encodeReceipt({ cacheId: "c", service: "s", position: 9 })),
    '{"cacheId":"c","service":"s","position":9,"applied":[]}');
  assert.equal(text(encodeReceipt({ cacheId: "c", service: "s", position: 9, applied: [12, 14] })),
    '{"cacheId":"c","service":"s","position":9,"applied":[12,14]}');
  assert.deepEqual(decodeCheckpoint('{"position":3}'), { position: 3, probes: {}, epoch: 0, createdAt: null });
  assert.equal(decodeCheckpoint('{"position":3,"probes":{"a":"x"}}'), null);
  assert.equal(decodeCheckpoint('{"position":1.5}'), null);
  // better-auth's hash: base64url(sha256(key)) without padding
  assert.equal(hashKey("abc"), "ungWv48Bz-pBQUDeXa4iI7ADYaOWF3qctBD_YfIAFa0");
  const t = new Topology({ prefix: "p" });
  assert.deepEqual([t.invalidationSubject, t.checkpointSubject, t.probeSubject, t.receiptsSubject, t.invalidationsStream],
    ["p.cache.invalidate", "p.cache.checkpoint", "p.cache.probe", "p.cache.receipts", "APIKEY_INVALIDATIONS"]);
  assert.equal(Topology.fromEnv({ KEYLEDGER_SUBJECT_PREFIX: "q", KEYLEDGER_INVALIDATIONS_STREAM: "S" }).invalidationsStream, "S");
});

test("defaults as in keyledger's Python KeyCache", () => {
  const c = new KeyCache({ baseUrl: "http://127.0.0.1:1/, http://127.0.0.1:2" });
  assert.deepEqual([...c.baseUrls], ["http://127.0.0.1:1", "http://127.0.0.1:2"]);
  assert.equal(c.natsUrl, null);
  assert.deepEqual(
    [c.staleness, c.negativeTtl, c.maxAge, c.failOpen, c.httpTimeout, c.syncInterval, c.maxReplay, c.maxEntries, c.receipts, c.service],
    [1, 1, 300, false, 2, 0.25, 10_000, 100_000, true, ""],
  );
  assert.equal(c.topology.prefix, "apikey");
  assert.equal(c.topology.invalidationsStream, "APIKEY_INVALIDATIONS");
  assert.match(c.cacheId, /^.+-\d+-\d{4}$/);
  assert.deepEqual([c.trusted, c.caughtUp, c.connected, c.size], [false, false, false, 0]);
  assert.deepEqual([c.hits, c.httpVerifications, c.invalidationsApplied, c.evictions, c.flushes], [0, 0, 0, 0, 0]);
  assert.throws(() => new KeyCache({ baseUrl: " , " }));
});

test("a receipt budget that is no budget is refused (below 1, zero, NaN, Infinity), as in Python", () => {
  for (const budget of [{ receiptRate: 0.5 }, { receiptRate: 0 }, { receiptRate: -4 }, { receiptRate: NaN },
    { receiptRate: Infinity }, { receiptBurst: 0 }, { receiptBurst: NaN }, { receiptBurst: Infinity }]) {
    assert.throws(() => new KeyCache({ baseUrl: "http://127.0.0.1:1", ...budget }), /receiptRate and receiptBurst/,
      JSON.stringify(budget));
  }
  new KeyCache({ baseUrl: "http://127.0.0.1:1", receiptRate: 1, receiptBurst: 1 }); // the least budget there is
});
