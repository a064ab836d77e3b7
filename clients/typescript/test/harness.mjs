// Test harness: a REAL keyledger service (with its embedded PostgreSQL and nats-server), a TCP proxy of our own to
// cut links, and small helpers. Loopback only; every wait is bounded; every process and temp dir is cleaned up.
import { spawn, spawnSync } from "node:child_process";
import { randomBytes } from "node:crypto";
import { existsSync, mkdtempSync, readFileSync, rmSync } from "node:fs";
import net from "node:net";
import os from "node:os";
import path from "node:path";
import { fileURLToPath } from "node:url";
import { performance } from "node:perf_hooks";
import { setTimeout as sleep } from "node:timers/promises";

const here = path.dirname(fileURLToPath(import.meta.url));
export const PACKAGE_DIR = path.resolve(here, "..");
export const PYTHON = process.env.KEYLEDGER_PYTHON || path.resolve(PACKAGE_DIR, "../../.venv/bin/python");
export const ORIGIN = "http://dashboard.test";
/** Deadline of every wait for a condition: generous, it only matters when something is broken. */
export const WAIT_MS = 30_000;

export { sleep };

/** A silent logger for caches under test (their warnings are expected here). */
export const quiet = { warn() {}, info() {}, debug() {} };

export async function freePort() {
  return new Promise((resolve, reject) => {
    const server = net.createServer();
    server.unref();
    server.on("error", reject);
    server.listen(0, "127.0.0.1", () => {
      const { port } = server.address();
      server.close(() => resolve(port));
    });
  });
}

/** Poll `condition` (sync or async) until it is truthy; fail after `timeoutMs` naming `what`. */
export async function waitFor(condition, timeoutMs, what, everyMs = 5) {
  const deadline = performance.now() + timeoutMs;
  for (;;) {
    if (await condition()) return;
    if (performance.now() > deadline) throw new Error(`timed out after ${timeoutMs} ms waiting for: ${what}`);
    await sleep(everyMs);
  }
}

// --------------------------------------------------------------------------------------------------------------
// Processes: everything started here is remembered and killed on exit, whatever happens to the test file.
// --------------------------------------------------------------------------------------------------------------
const living = new Set();
const tempDirs = new Set();

function killPidFile(file, signal = "SIGKILL") {
  try {
    const pid = Number.parseInt(readFileSync(file, "utf8").split("\n")[0].trim(), 10);
    if (pid > 1) process.kill(pid, signal);
  } catch {
    // no file, or no such process
  }
}

/** The embedded servers a `serve` owns, in case it could not stop them itself (it was SIGKILLed). */
function killEmbedded(dataDir, signal = "SIGKILL") {
  killPidFile(path.join(dataDir, "nats", "nats-server.pid"), signal);
  killPidFile(path.join(dataDir, "postgres", "postmaster.pid"), signal === "SIGKILL" ? "SIGQUIT" : "SIGINT");
}

function cleanupAll() {
  for (const service of living) {
    try {
      service.proc.kill("SIGKILL");
    } catch {
      // gone
    }
    if (service.embedded) killEmbedded(service.dataDir);
  }
  for (const dir of tempDirs) {
    try {
      rmSync(dir, { recursive: true, force: true, maxRetries: 3 });
    } catch {
      // a server still writing into it: best effort at exit
    }
  }
  living.clear();
  tempDirs.clear();
}

process.on("exit", cleanupAll);
for (const signal of ["SIGINT", "SIGTERM", "SIGHUP"]) {
  process.once(signal, () => {
    cleanupAll();
    process.exit(128 + (signal === "SIGINT" ? 2 : signal === "SIGTERM" ? 15 : 1));
  });
}

export function tempDir(tag) {
  const dir = mkdtempSync(path.join(os.tmpdir(), `keyledger-ts-${tag}-`));
  tempDirs.add(dir);
  return dir;
}

export function removeTempDir(dir) {
  rmSync(dir, { recursive: true, force: true });
  tempDirs.delete(dir);
}

function baseEnv() {
  const env = { ...process.env };
  delete env.DATABASE_URL;
  delete env.NATS_URL;
  for (const name of Object.keys(env)) {
    if (name.startsWith("KEYLEDGER_") && name !== "KEYLEDGER_PYTHON") delete env[name];
  }
  return env;
}

/**
 * Start `python -m keyledger.cli serve` and wait (bounded) for GET /health 200, then GET /ready 200.
 *
 * Embedded mode by default (DATABASE_URL and NATS_URL unset: it starts PostgreSQL and nats-server itself, in a
 * fresh temp dir); `databaseUrl` + `natsUrl` run it against given servers instead. `args` are more serve flags.
 */
export async function startKeyledger({
  databaseUrl = null,
  natsUrl = null,
  secret = randomBytes(24).toString("hex"),
  serviceToken = randomBytes(24).toString("hex"),
  prefix = null,
  args = [],
  ready = true,
  extraEnv = {},
} = {}) {
  if (!existsSync(PYTHON)) {
    throw new Error(`no keyledger Python at ${PYTHON}: run ./dev.sh once (it creates .venv), or set KEYLEDGER_PYTHON`);
  }
  const port = await freePort();
  const embedded = !databaseUrl;
  const env = { ...baseEnv(), BETTER_AUTH_SECRET: secret, TRUSTED_ORIGINS: ORIGIN, KEYLEDGER_SERVICE_TOKEN: serviceToken };
  let dataDir = null;
  let natsPort = null;
  if (embedded) {
    dataDir = tempDir("data");
    natsPort = await freePort();
    Object.assign(env, { KEYLEDGER_DATA_DIR: dataDir, KEYLEDGER_NATS_PORT: String(natsPort) });
  } else {
    Object.assign(env, { DATABASE_URL: databaseUrl, NATS_URL: natsUrl });
  }
  if (prefix) env.KEYLEDGER_SUBJECT_PREFIX = prefix;
  Object.assign(env, extraEnv);
  const proc = spawn(PYTHON, ["-m", "keyledger.cli", "serve", "--host", "127.0.0.1", "--port", String(port), ...args], {
    env,
    cwd: dataDir ?? os.tmpdir(),
    stdio: ["ignore", "pipe", "pipe"],
  });
  let stderr = "";
  proc.stdout.on("data", () => {});
  proc.stderr.on("data", (chunk) => {
    stderr += chunk.toString();
    if (stderr.length > 200_000) stderr = stderr.slice(-100_000);
  });
  const exited = new Promise((resolve) => proc.once("exit", (code, signal) => resolve({ code, signal })));
  const service = {
    proc, port, url: `http://127.0.0.1:${port}`, env, embedded, dataDir, natsPort, serviceToken,
    natsUrl: embedded ? `nats://127.0.0.1:${natsPort}` : natsUrl,
    databaseUrl, exited, alive: true,
    get stderr() {
      return stderr;
    },
    async stop() {
      await stopKeyledger(service);
    },
  };
  exited.then(() => {
    service.alive = false;
  });
  living.add(service);
  try {
    await waitForHttp(service, "/health", 60_000);
    if (ready) await waitForHttp(service, "/ready", 60_000);
  } catch (err) {
    await stopKeyledger(service);
    throw new Error(`${err.message}\n--- serve stderr ---\n${stderr.slice(-4000)}`);
  }
  if (embedded) {
    const m = /embedded PostgreSQL at (\S+)/.exec(stderr);
    service.databaseUrl = m ? m[1] : null;
  }
  return service;
}

async function waitForHttp(service, route, timeoutMs) {
  const deadline = performance.now() + timeoutMs;
  let last = "no answer";
  while (performance.now() < deadline) {
    if (!service.alive) throw new Error(`keyledger serve exited before ${route} answered 200`);
    try {
      const r = await fetch(service.url + route, { signal: AbortSignal.timeout(2000) });
      last = `${r.status} ${await r.text()}`;
      if (r.status === 200) return;
    } catch (err) {
      last = String(err?.cause?.code ?? err);
    }
    await sleep(100);
  }
  throw new Error(`keyledger ${route} not 200 within ${timeoutMs} ms (last: ${last})`);
}

/** SIGTERM (serve then stops its embedded servers), SIGKILL after 15 s; then the embedded servers, if left. */
export async function stopKeyledger(service) {
  if (service.alive) {
    service.proc.kill("SIGTERM");
    const done = await Promise.race([service.exited.then(() => true), sleep(15_000).then(() => false)]);
    if (!done) {
      service.proc.kill("SIGKILL");
      await Promise.race([service.exited, sleep(5_000)]);
    }
  }
  if (service.embedded) await stopEmbedded(service);
  living.delete(service);
  if (service.dataDir) removeTempDir(service.dataDir);
}

/** Crash the serve process (SIGKILL: its embedded PostgreSQL and NATS keep running, as after a real crash). */
export async function killKeyledger(service) {
  service.proc.kill("SIGKILL");
  await Promise.race([service.exited, sleep(5_000)]);
}

async function stopEmbedded(service) {
  const natsPid = path.join(service.dataDir, "nats", "nats-server.pid");
  const pgPid = path.join(service.dataDir, "postgres", "postmaster.pid");
  if (!existsSync(natsPid) && !existsSync(pgPid)) return;
  killEmbedded(service.dataDir, "SIGTERM");
  const deadline = performance.now() + 10_000;
  while (performance.now() < deadline && (pidAlive(natsPid) || pidAlive(pgPid))) await sleep(100);
  killEmbedded(service.dataDir, "SIGKILL");
}

function pidAlive(file) {
  try {
    const pid = Number.parseInt(readFileSync(file, "utf8").split("\n")[0].trim(), 10);
    process.kill(pid, 0);
    return true;
  } catch {
    return false;
  }
}

// --------------------------------------------------------------------------------------------------------------
// keyledger's HTTP API
// --------------------------------------------------------------------------------------------------------------
/** A user and a session, through `keyledger dev-session` on the service's own database. */
export function devSession(service, email = `u${randomBytes(4).toString("hex")}@example.test`) {
  const env = { ...service.env };
  if (service.embedded) {
    delete env.DATABASE_URL;
    delete env.NATS_URL;
  } else {
    env.DATABASE_URL = service.databaseUrl;
    delete env.NATS_URL;
  }
  const r = spawnSync(PYTHON, ["-m", "keyledger.cli", "dev-session", "--email", email], {
    env, cwd: service.dataDir ?? os.tmpdir(), encoding: "utf8", timeout: 60_000,
  });
  if (r.status !== 0) throw new Error(`dev-session failed (${r.status}): ${r.stderr}`);
  const cookie = /^Cookie: (.+)$/m.exec(r.stdout)?.[1];
  const userId = /# user (\S+)/.exec(r.stderr)?.[1];
  if (!cookie) throw new Error(`dev-session printed no cookie: ${r.stdout}`);
  return { cookie: cookie.trim(), userId };
}

async function call(service, route, { headers = {}, body } = {}) {
  const r = await fetch(service.url + route, {
    method: body === undefined ? "GET" : "POST",
    headers: { ...(body === undefined ? {} : { "content-type": "application/json" }), ...headers },
    body: body === undefined ? undefined : JSON.stringify(body),
    signal: AbortSignal.timeout(10_000),
  });
  const text = await r.text();
  let json = null;
  try {
    json = JSON.parse(text);
  } catch {
    // not JSON
  }
  return { status: r.status, json, text };
}

function sessionHeaders(session) {
  return { cookie: session.cookie, origin: ORIGIN };
}

/** POST create with the session's cookie: the answer has `id`, `key` (plaintext, once) and `referenceId`. */
export async function createKey(service, session, body = {}) {
  const r = await call(service, "/api/auth/api-key/create", { headers: sessionHeaders(session), body });
  if (r.status !== 200) throw new Error(`create: ${r.status} ${r.text}`);
  return r.json;
}

/** A key with server-only fields (`remaining`, rate limits), created as a server caller for `userId`. */
export async function createServerKey(service, userId, body) {
  const r = await call(service, "/api/auth/api-key/create", {
    headers: { authorization: `Bearer ${service.serviceToken}` },
    body: { userId, ...body },
  });
  if (r.status !== 200) throw new Error(`server create: ${r.status} ${r.text}`);
  return r.json;
}

/** Revoke: POST delete. Returns when keyledger answered 200. */
export async function revokeKey(service, session, keyId) {
  const r = await call(service, "/api/auth/api-key/delete", { headers: sessionHeaders(session), body: { keyId } });
  if (r.status !== 200) throw new Error(`delete: ${r.status} ${r.text}`);
  return r.json;
}

export async function revocation(service, session, keyId) {
  return call(service, `/api/auth/api-key/revocation?id=${encodeURIComponent(keyId)}`, { headers: sessionHeaders(session) });
}

/** keyledger's own verify, without any cache. */
export async function verifyDirect(service, key) {
  return (await call(service, "/api/auth/api-key/verify", { body: { key } })).json;
}

// --------------------------------------------------------------------------------------------------------------
// A TCP proxy on loopback: cut() drops every connection and refuses new ones; start() listens again.
// --------------------------------------------------------------------------------------------------------------
export class TcpProxy {
  constructor(targetPort, port = null) {
    this.targetPort = targetPort;
    this.port = port;
    this.server = null;
    this.sockets = new Set();
  }

  async start() {
    if (this.port === null) this.port = await freePort();
    const server = net.createServer((client) => {
      const upstream = net.connect(this.targetPort, "127.0.0.1");
      for (const s of [client, upstream]) {
        this.sockets.add(s);
        s.on("close", () => this.sockets.delete(s));
        s.on("error", () => {});
      }
      client.pipe(upstream);
      upstream.pipe(client);
      client.on("close", () => upstream.destroy());
      upstream.on("close", () => client.destroy());
    });
    await new Promise((resolve, reject) => {
      server.once("error", reject);
      server.listen(this.port, "127.0.0.1", resolve);
    });
    this.server = server;
    return this;
  }

  get url() {
    return `127.0.0.1:${this.port}`;
  }

  async cut() {
    const server = this.server;
    this.server = null;
    for (const s of this.sockets) s.destroy();
    this.sockets.clear();
    if (server) await new Promise((resolve) => server.close(() => resolve()));
  }
}

/**
 * Poll `cache.verifyCached(key)` until it stops serving; return the monotonic time read just *before* the last
 * call that served the entry (null if it never did). The cache decides with performance.now() too, so "served at
 * t" means its own clock read at least t: comparing that with a deadline needs no allowance for scheduling.
 */
export async function lastServed(cache, key, timeoutMs = WAIT_MS) {
  let last = null;
  const deadline = performance.now() + timeoutMs;
  for (;;) {
    const before = performance.now();
    if (cache.verifyCached(key) === null) return last;
    last = before;
    if (performance.now() > deadline) throw new Error("the entry never stopped being served");
    await sleep(1);
  }
}
