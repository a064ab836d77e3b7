#!/usr/bin/env node
// One command, prints figures: `node bench/fastify-bench.mjs` (after `npm run build`).
//
// What the keyledger plugin costs a Fastify service: the same one-route service (GET /data, a small JSON answer),
// once plain and once with the plugin checking a real key (`Authorization: Bearer <key>`, created on a real
// keyledger started as the tests do, its KeyCache connected to keyledger's NATS and trusted), loaded in turn by
// autocannon with identical requests (the plain service gets the header too, and ignores it).
//
// Both services live in this process, so whatever the cache does in the background (probes, receipts, the NATS
// socket) weighs on both alike; the load generator runs in a child process, so it never shares the servers'
// event loop. Rounds alternate which service goes first (plain, plugin; plugin, plain; ...), and the ratio is
// taken per round, then the median: the machine's drift over a run mostly cancels out.
//
// Settings (environment): BENCH_ROUNDS (5), BENCH_DURATION seconds per service per round (5), BENCH_CONNECTIONS
// (16), BENCH_WARMUP seconds of unmeasured load on each service first (2). KEYLEDGER_PYTHON names keyledger's
// Python, as for the tests. Figures only: nothing is asserted.
import { spawn } from "node:child_process";
import { createRequire } from "node:module";
import os from "node:os";
import { performance } from "node:perf_hooks";

import Fastify from "fastify";

import { KeyCache } from "../dist/index.js";
import keyledgerAuth from "../dist/fastify.js";
import { createKey, devSession, quiet, startKeyledger, waitFor } from "../test/harness.mjs";

const ROUNDS = Number(process.env.BENCH_ROUNDS || 5);
const DURATION = Number(process.env.BENCH_DURATION || 5);
const CONNECTIONS = Number(process.env.BENCH_CONNECTIONS || 16);
const WARMUP = Number(process.env.BENCH_WARMUP || 2);

const AUTOCANNON = createRequire(import.meta.url).resolve("autocannon/autocannon.js");
const BODY = { ok: true, items: [1, 2, 3], name: "keyledger fastify bench" };

const fmt = (n, d = 2) => n.toLocaleString("en-US", { maximumFractionDigits: d, minimumFractionDigits: d });
const loadavg = () => os.loadavg().map((l) => l.toFixed(2)).join(" ");

function median(xs) {
  const s = [...xs].sort((a, b) => a - b);
  if (s.length === 0) return NaN;
  const m = s.length >> 1;
  return s.length % 2 ? s[m] : (s[m - 1] + s[m]) / 2;
}

function cpuTimes() {
  return os.cpus().reduce((acc, c) => {
    const t = c.times;
    acc.busy += t.user + t.nice + t.sys + t.irq;
    acc.all += t.user + t.nice + t.sys + t.irq + t.idle;
    return acc;
  }, { busy: 0, all: 0 });
}

/** One Fastify service with GET /data; `cache` given: the keyledger plugin guards it. */
async function service(cache) {
  const app = Fastify({ logger: false });
  if (cache) await app.register(keyledgerAuth, { cache });
  app.get("/data", async () => BODY);
  await app.listen({ host: "127.0.0.1", port: 0 });
  return { app, url: `http://127.0.0.1:${app.server.address().port}/data` };
}

/**
 * autocannon in a child process against `url` for `seconds`; its JSON summary. The child is awaited without
 * blocking this process's event loop: the services answer the load meanwhile.
 */
function load(url, key, seconds) {
  const args = [AUTOCANNON, "-c", String(CONNECTIONS), "-d", String(seconds), "-j", "-n",
    "-H", `authorization=Bearer ${key}`, url];
  return new Promise((resolve, reject) => {
    const child = spawn(process.execPath, args, { stdio: ["ignore", "pipe", "pipe"] });
    let out = "";
    let err = "";
    child.stdout.on("data", (c) => { out += c; });
    child.stderr.on("data", (c) => { err += c; });
    child.once("error", reject);
    child.once("exit", (code) => {
      if (code !== 0) return reject(new Error(`autocannon exited ${code}: ${err.slice(-2000)}`));
      try {
        resolve(JSON.parse(out));
      } catch {
        reject(new Error(`autocannon printed no JSON: ${out.slice(0, 500)} ${err.slice(-500)}`));
      }
    });
  });
}

/** One measured run of `side` ("plain" | "plugin"): req/s, latency percentiles, non-2xx, machine CPU busy. */
async function measure(side, url, key, cache) {
  const http0 = cache.httpVerifications;
  const cpu0 = cpuTimes();
  const own0 = process.cpuUsage();
  const t0 = performance.now();
  const r = await load(url, key, DURATION);
  const own = process.cpuUsage(own0);
  const wallMs = performance.now() - t0;
  const cpu1 = cpuTimes();
  return {
    side,
    rps: r.requests.average,
    total: r.requests.total,
    // autocannon's latencies are whole milliseconds (its mean too is of those). Each connection keeps one request
    // outstanding, so Little's law gives the exact mean: connections / req/s.
    mean: (1000 * CONNECTIONS) / r.requests.average,
    p50: r.latency.p50,
    p99: r.latency.p99,
    non2xx: r.non2xx + r.errors + r.timeouts,
    http: cache.httpVerifications - http0,
    busy: (100 * (cpu1.busy - cpu0.busy)) / (cpu1.all - cpu0.all),
    // This process (the services and the cache), as % of one core: near 100 means the service is the limit,
    // well below it that the load generator or the rest of the machine is.
    own: (own.user + own.system) / 10 / wallMs,
    // CPU time this process spent per answered request: what the plugin adds per request, and far less moved by
    // other work on the machine than req/s is (another process taking a core lowers req/s, not this).
    cpuPerReq: (own.user + own.system) / r.requests.total,
  };
}

const started = performance.now();
const kl = await startKeyledger();
let cache;
const apps = [];
try {
  const session = devSession(kl);
  cache = new KeyCache({ baseUrl: kl.url, natsUrl: kl.natsUrl, logger: quiet });
  await cache.start();
  await waitFor(() => cache.caughtUp, 30_000, "cache caught up");
  const { key } = await createKey(kl, session);
  if (!(await cache.verify(key)).valid) throw new Error("the bench key did not verify");

  const plain = await service(null);
  const guarded = await service(cache);
  apps.push(plain.app, guarded.app);
  // Check both answer as intended before loading them: 200 with the key, and the plugin's 401 without it.
  for (const [url, headers, want] of [[plain.url, {}, 200], [guarded.url, { authorization: `Bearer ${key}` }, 200],
    [guarded.url, {}, 401]]) {
    const r = await fetch(url, { headers, signal: AbortSignal.timeout(5_000) });
    await r.arrayBuffer();
    if (r.status !== want) throw new Error(`${url} answered ${r.status}, not ${want}`);
  }

  console.log(`keyledger up, cache trusted, services listening in ${fmt((performance.now() - started) / 1000)} s; ` +
    `node ${process.version}, fastify ${guarded.app.version}, ${os.cpus().length} CPUs ` +
    `(${os.cpus()[0]?.model ?? "?"}), load average ${loadavg()}`);
  console.log(`autocannon -c ${CONNECTIONS} -d ${DURATION} on GET /data with a Bearer key, ${ROUNDS} rounds ` +
    `alternating plain and plugin (warm-up ${WARMUP} s each first)\n`);

  if (WARMUP > 0) {
    await load(plain.url, key, WARMUP);
    await load(guarded.url, key, WARMUP);
  }

  const runs = { plain: [], plugin: [] };
  const ratios = [];
  const cpuRatios = [];
  // p50/p99: autocannon's, in whole milliseconds; mean: connections / req/s (exact).
  console.log("round  service  req/s      mean ms  p50 ms  p99 ms  non-2xx  HTTP verifies  service CPU  µs CPU/req  machine CPU");
  for (let round = 1; round <= ROUNDS; round++) {
    const order = round % 2 ? ["plain", "plugin"] : ["plugin", "plain"];
    const got = {};
    for (const side of order) {
      const m = await measure(side, side === "plain" ? plain.url : guarded.url, key, cache);
      got[side] = m;
      runs[side].push(m);
      console.log(`${String(round).padEnd(7)}${side.padEnd(9)}${fmt(m.rps, 0).padEnd(11)}${fmt(m.mean).padEnd(9)}` +
        `${fmt(m.p50, 0).padEnd(8)}${fmt(m.p99, 0).padEnd(8)}${String(m.non2xx).padEnd(9)}${String(m.http).padEnd(15)}` +
        `${(fmt(m.own, 0) + "%").padEnd(13)}${fmt(m.cpuPerReq, 1).padEnd(12)}${fmt(m.busy, 0)}%`);
    }
    ratios.push(got.plugin.rps / got.plain.rps);
    cpuRatios.push(got.plugin.cpuPerReq / got.plain.cpuPerReq);
  }

  const summary = (side) => {
    const xs = runs[side];
    return `req/s ${fmt(median(xs.map((m) => m.rps)), 0)} (${fmt(Math.min(...xs.map((m) => m.rps)), 0)}-` +
      `${fmt(Math.max(...xs.map((m) => m.rps)), 0)}), mean ${fmt(median(xs.map((m) => m.mean)))} ms, ` +
      `p50 ${fmt(median(xs.map((m) => m.p50)), 0)} ms, ` +
      `p99 ${fmt(median(xs.map((m) => m.p99)), 0)} ms, ${fmt(median(xs.map((m) => m.cpuPerReq)), 1)} µs CPU/req`;
  };
  console.log(`\nmedians of ${ROUNDS} rounds (load average now ${loadavg()}):`);
  console.log(`  plain    ${summary("plain")}`);
  console.log(`  plugin   ${summary("plugin")}`);
  console.log(`  plugin/plain req/s: median ${fmt(median(ratios), 3)} ` +
    `(rounds: ${ratios.map((r) => fmt(r, 3)).join(" ")})`);
  console.log(`  plugin/plain service CPU per request: median ${fmt(median(cpuRatios), 3)} ` +
    `(rounds: ${cpuRatios.map((r) => fmt(r, 3)).join(" ")})`);
  const bad = [...runs.plain, ...runs.plugin].reduce((n, m) => n + m.non2xx, 0);
  const http = runs.plugin.reduce((n, m) => n + m.http, 0);
  if (bad > 0 || http > 0) {
    console.log(`WARNING: ${bad} answers were not 2xx (or failed), and the plugin verified over HTTP ${http} times ` +
      "during the measured runs: the figures above include that");
  }
} finally {
  for (const app of apps) await app.close();
  await cache?.close();
  await kl.stop();
}
