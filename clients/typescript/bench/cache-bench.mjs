#!/usr/bin/env node
// One command, prints figures: `node bench/cache-bench.mjs` (after `npm run build`).
//
// 1. Cached verify calls per second in Node: `verifyCached(key)` and `await verify(key)` on a warm, trusted entry
//    (each call hashes the key, as a request would).
// 2. delete's 200 -> eviction: REVOCATIONS keys are created and verified (warm in the cache), then revoked one at a
//    time; for each, the time from the moment keyledger's 200 was read to the moment the cache's onInvalidation hook
//    ran (right after the eviction), both on this process's monotonic clock. p50/p99/max. A second NATS
//    connection in this process (a "tap", as bench/invalidation_bench.py has) timestamps the relay's event
//    (`<prefix>.events.revoked.<keyId>`) and the invalidation as they arrive, which splits the path into the
//    service's part (200 -> event -> invalidation on the bus) and the client's (invalidation -> eviction).
//
// By default it starts its own keyledger (`keyledger serve` in embedded mode, like the tests; KEYLEDGER_PYTHON
// names the Python). Figures only: nothing is asserted.
import os from "node:os";
import { performance } from "node:perf_hooks";

import { connect } from "nats";

import { KeyCache, Topology } from "../dist/index.js";
import { createKey, devSession, quiet, revokeKey, startKeyledger, waitFor } from "../test/harness.mjs";

// 1,000, not 200: the p99 of 200 samples is the second-worst one, and moved by 1.2 ms between runs of the same code.
const REVOCATIONS = Number(process.env.BENCH_REVOCATIONS || 1000);
const CALLS = Number(process.env.BENCH_CALLS || 1_000_000);

function pct(sorted, p) {
  if (sorted.length === 0) return NaN;
  return sorted[Math.min(sorted.length - 1, Math.max(0, Math.ceil((p / 100) * sorted.length) - 1))];
}

function cpuTimes() {
  return os.cpus().reduce((acc, c) => {
    const t = c.times;
    acc.busy += t.user + t.nice + t.sys + t.irq;
    acc.all += t.user + t.nice + t.sys + t.irq + t.idle;
    return acc;
  }, { busy: 0, all: 0 });
}

const fmt = (n, d = 2) => n.toLocaleString("en-US", { maximumFractionDigits: d, minimumFractionDigits: d });

const started = performance.now();
const kl = await startKeyledger();
let cache;
let tap;
try {
  const session = devSession(kl);
  const evictedAt = new Map();
  cache = new KeyCache({
    baseUrl: kl.url, natsUrl: kl.natsUrl, logger: quiet, maxAge: null,
    onInvalidation: (inv) => {
      if (!evictedAt.has(inv.keyId)) evictedAt.set(inv.keyId, performance.now());
    },
  });
  await cache.start();
  // The tap: its own connection, so nothing in it waits behind the cache's subscriptions (or the reverse).
  const topology = new Topology();
  const tapEvent = new Map();
  const tapInvalidation = new Map();
  tap = await connect({ servers: kl.natsUrl });
  tap.subscribe(`${topology.prefix}.events.revoked.*`, {
    callback: (err, msg) => {
      const keyId = msg.subject.slice(msg.subject.lastIndexOf(".") + 1);
      if (err === null && !tapEvent.has(keyId)) tapEvent.set(keyId, performance.now());
    },
  });
  tap.subscribe(topology.invalidationSubject, {
    callback: (err, msg) => {
      if (err !== null) return;
      const keyId = msg.json().keyId;
      if (!tapInvalidation.has(keyId)) tapInvalidation.set(keyId, performance.now());
    },
  });
  await tap.flush();
  await waitFor(() => cache.caughtUp, 30_000, "cache caught up");
  console.log(`keyledger up and cache trusted in ${fmt((performance.now() - started) / 1000)} s; node ${process.version}, ` +
    `${os.cpus().length} CPUs (${os.cpus()[0]?.model ?? "?"}), load average ${os.loadavg().map((l) => l.toFixed(2)).join(" ")}`);

  // ---- 1. cached verify calls per second -------------------------------------------------------------------
  const hot = await createKey(kl, session);
  if (!(await cache.verify(hot.key)).valid) throw new Error("the hot key did not verify");
  const calls0 = cache.httpVerifications;
  // Calls run in chunks, and the event loop gets a turn between chunks (as between requests in a server): a loop
  // that never yields would starve the NATS connection, and the cache would rightly stop trusting itself.
  const CHUNK = 20_000;
  const yieldToLoop = () => new Promise((resolve) => setImmediate(resolve));
  for (let i = 0; i < 50_000; i++) cache.verifyCached(hot.key); // warm-up (JIT)
  let served = 0;
  let busy = 0;
  for (let done = 0; done < CALLS; done += CHUNK) {
    await yieldToLoop();
    const t = performance.now();
    for (let i = 0; i < CHUNK; i++) if (cache.verifyCached(hot.key) !== null) served++;
    busy += performance.now() - t;
  }
  const syncRate = CALLS / (busy / 1000);
  busy = 0;
  for (let done = 0; done < CALLS; done += CHUNK) {
    await yieldToLoop();
    const t = performance.now();
    for (let i = 0; i < CHUNK; i++) if ((await cache.verify(hot.key)).valid) served++;
    busy += performance.now() - t;
  }
  const asyncRate = CALLS / (busy / 1000);
  if (served !== 2 * CALLS || cache.httpVerifications !== calls0) {
    console.log(`WARNING: ${2 * CALLS - served} calls were not served from memory ` +
      `(${cache.httpVerifications - calls0} HTTP verifications): the cache lost its proof during the run`);
  }
  console.log(`\ncached verify (${CALLS.toLocaleString("en-US")} calls each, one key, trusted cache):`);
  console.log(`  verifyCached(key)     ${Math.round(syncRate).toLocaleString("en-US")} per s`);
  console.log(`  await verify(key)     ${Math.round(asyncRate).toLocaleString("en-US")} per s`);

  // ---- 2. delete's 200 -> eviction ----------------------------------------------------------------------
  const keys = [];
  for (let i = 0; i < REVOCATIONS; i++) keys.push(await createKey(kl, session));
  for (const k of keys) if (!(await cache.verify(k.key)).valid) throw new Error("a fresh key did not verify");
  await waitFor(() => cache.caughtUp, 30_000, "cache trusted");
  const lat = [];
  const toEvent = [];
  const toInvalidation = [];
  const toEviction = [];
  let warm = 0;
  let evictedOk = 0;
  let missing = 0;
  const cpu0 = cpuTimes();
  const t0 = performance.now();
  for (const k of keys) {
    if (cache.verifyCached(k.key) !== null) warm++;
    await revokeKey(kl, session, k.id);
    const ok = performance.now(); // the 200's body has been read
    try {
      await waitFor(() => evictedAt.has(k.id), 10_000, "eviction", 0);
    } catch {
      missing++;
      continue;
    }
    lat.push(evictedAt.get(k.id) - ok);
    // The tap's connection may be read a moment after the cache's: wait (briefly) for it too.
    await waitFor(() => tapInvalidation.has(k.id) && tapEvent.has(k.id), 1_000, "tap", 0).catch(() => undefined);
    if (tapEvent.has(k.id)) toEvent.push(tapEvent.get(k.id) - ok);
    if (tapInvalidation.has(k.id)) {
      toInvalidation.push(tapInvalidation.get(k.id) - ok);
      toEviction.push(evictedAt.get(k.id) - tapInvalidation.get(k.id));
    }
    if (cache.verifyCached(k.key) === null) evictedOk++;
  }
  const wall = (performance.now() - t0) / 1000;
  const cpu1 = cpuTimes();
  lat.sort((a, b) => a - b);
  console.log(`\ndelete's 200 -> eviction in KeyCache, ${REVOCATIONS} sequential revocations (${fmt(wall)} s; ` +
    `warm before ${warm}/${REVOCATIONS}, evicted ${evictedOk}, missing ${missing}; ` +
    `machine CPU busy ${fmt((100 * (cpu1.busy - cpu0.busy)) / (cpu1.all - cpu0.all), 0)}%):`);
  console.log(`  p50 ${fmt(pct(lat, 50))} ms   p90 ${fmt(pct(lat, 90))} ms   p99 ${fmt(pct(lat, 99))} ms   ` +
    `min ${fmt(lat[0] ?? NaN)} ms   max ${fmt(lat[lat.length - 1] ?? NaN)} ms`);
  console.log("  (negative: the invalidation reached the cache before the client had read delete's 200)");
  const line = (label, xs) => {
    xs.sort((a, b) => a - b);
    console.log(`  ${label.padEnd(40)} p50 ${fmt(pct(xs, 50))} ms   p99 ${fmt(pct(xs, 99))} ms   ` +
      `max ${fmt(xs[xs.length - 1] ?? NaN)} ms   (${xs.length})`);
  };
  console.log("  where it goes (the tap, a second NATS connection in this process):");
  line("200 -> relay's event on the bus", toEvent);
  line("200 -> invalidation on the bus", toInvalidation);
  line("invalidation on the bus -> eviction", toEviction);
} finally {
  await cache?.close();
  await tap?.close();
  await kl.stop();
}
