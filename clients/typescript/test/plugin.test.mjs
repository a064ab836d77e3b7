// The Fastify plugin and the framework-free helpers, against a real keyledger service.
import assert from "node:assert/strict";
import { after, before, test } from "node:test";

import Fastify from "fastify";

import { KeyCache, keyFromRequest, verifyRequest } from "../dist/index.js";
import keyledgerAuth from "../dist/fastify.js";
import { createKey, devSession, quiet, revokeKey, startKeyledger, waitFor, WAIT_MS } from "./harness.mjs";

const TEST_TIMEOUT = 90_000;

let kl;
let session;
let cache;

before(async () => {
  kl = await startKeyledger();
  session = devSession(kl);
  cache = new KeyCache({ baseUrl: kl.url, natsUrl: kl.natsUrl, logger: quiet });
  await cache.start();
  await waitFor(() => cache.caughtUp, WAIT_MS, "cache caught up");
}, { timeout: 120_000 });

after(async () => {
  await cache?.close();
  if (kl) await kl.stop();
}, { timeout: 60_000 });

async function listen(app) {
  await app.listen({ host: "127.0.0.1", port: 0 });
  return `http://127.0.0.1:${app.server.address().port}`;
}

async function get(url, headers = {}) {
  const r = await fetch(url, { headers, signal: AbortSignal.timeout(10_000) });
  return { status: r.status, type: r.headers.get("content-type"), body: await r.text() };
}

function assertUnauthorized(r) {
  assert.equal(r.status, 401);
  assert.equal(r.body, '{"error":"Unauthorized"}');
  assert.equal(r.type, "application/json");
}

test("Fastify plugin: 401 without a valid key, 200 and request.apiKey with one, 401 once revoked", { timeout: TEST_TIMEOUT }, async () => {
  const app = Fastify({ logger: false });
  await app.register(keyledgerAuth, { cache, exclude: ["/health"] });
  app.get("/api/data", async (request) => ({ ok: true, keyId: request.apiKey.id }));
  app.get("/health", async (request) => ({ ok: true, apiKey: request.apiKey }));
  const base = await listen(app);
  try {
    const k = await createKey(kl, session);
    assertUnauthorized(await get(`${base}/api/data`));
    assertUnauthorized(await get(`${base}/api/data`, { authorization: "Bearer " }));
    assertUnauthorized(await get(`${base}/api/data`, { authorization: `Basic ${k.key}` }));
    assertUnauthorized(await get(`${base}/api/data`, { authorization: `Bearer ${"x".repeat(64)}` }));
    assertUnauthorized(await get(`${base}/api/data?api_key=`));
    assertUnauthorized(await get(`${base}/api/data?api_key=nope`));

    const ok = await get(`${base}/api/data`, { authorization: `Bearer ${k.key}` });
    assert.equal(ok.status, 200);
    assert.deepEqual(JSON.parse(ok.body), { ok: true, keyId: k.id });
    const lower = await get(`${base}/api/data`, { authorization: `bearer ${k.key}` });
    assert.equal(lower.status, 200);
    const byQuery = await get(`${base}/api/data?x=1&api_key=${encodeURIComponent(k.key)}`);
    assert.equal(byQuery.status, 200);
    assert.equal(JSON.parse(byQuery.body).keyId, k.id);

    const health = await get(`${base}/health`);
    assert.equal(health.status, 200);
    assert.deepEqual(JSON.parse(health.body), { ok: true, apiKey: null });

    await revokeKey(kl, session, k.id);
    await waitFor(() => cache.verifyCached(k.key) === null, WAIT_MS, "the revoked key evicted");
    assertUnauthorized(await get(`${base}/api/data`, { authorization: `Bearer ${k.key}` }));
    assertUnauthorized(await get(`${base}/api/data?api_key=${encodeURIComponent(k.key)}`));
  } finally {
    await app.close();
  }
});

test("Fastify plugin registered in a scope protects that scope only; manageCache starts and closes the cache", { timeout: TEST_TIMEOUT }, async () => {
  const own = new KeyCache({ baseUrl: kl.url, natsUrl: kl.natsUrl, logger: quiet });
  const app = Fastify({ logger: false });
  app.get("/public", async () => ({ public: true }));
  await app.register(async (scope) => {
    await scope.register(keyledgerAuth, { cache: own, manageCache: true });
    scope.get("/private", async (request) => ({ keyId: request.apiKey.id }));
  });
  const base = await listen(app);
  try {
    await waitFor(() => own.caughtUp, WAIT_MS, "the managed cache started and caught up");
    const k = await createKey(kl, session);
    assert.equal((await get(`${base}/public`)).status, 200);
    assertUnauthorized(await get(`${base}/private`));
    const ok = await get(`${base}/private`, { authorization: `Bearer ${k.key}` });
    assert.equal(ok.status, 200);
    assert.equal(JSON.parse(ok.body).keyId, k.id);
  } finally {
    await app.close();
  }
  assert.equal(own.connected, false, "closed with the app");
});

test("verifyRequest and keyFromRequest, framework-free", { timeout: TEST_TIMEOUT }, async () => {
  const k = await createKey(kl, session);
  assert.equal(keyFromRequest({ authorization: `Bearer ${k.key}` }, "/x"), k.key);
  assert.equal(keyFromRequest({ Authorization: `Bearer  ${k.key} ` }, "/x"), k.key);
  assert.equal(keyFromRequest(new Headers({ authorization: `Bearer ${k.key}` })), k.key);
  assert.equal(keyFromRequest({}, `/x?a=1&api_key=${k.key}#frag`), k.key);
  assert.equal(keyFromRequest({}, new URL(`http://h/x?api_key=${k.key}`)), k.key);
  assert.equal(keyFromRequest({ authorization: "Basic abc" }, "/x"), null);
  assert.equal(keyFromRequest({ authorization: "Bearer" }, "/x?api_key="), null);
  assert.equal(keyFromRequest(undefined, undefined), null);

  const valid = await verifyRequest(cache, { authorization: `Bearer ${k.key}` }, "/api/data");
  assert.equal(valid.valid, true);
  assert.equal(valid.key.id, k.id);
  const byQuery = await verifyRequest(cache, new Headers(), `/api/data?api_key=${k.key}`);
  assert.equal(byQuery.valid, true);
  const missing = await verifyRequest(cache, {}, "/api/data");
  assert.equal(missing.valid, false);
  assert.equal(missing.error.code, "KEY_NOT_FOUND");
  const bogus = await verifyRequest(cache, { authorization: `Bearer ${"Z".repeat(64)}` }, "/");
  assert.equal(bogus.valid, false);
  assert.equal(bogus.error.code, "INVALID_API_KEY");
});
