/**
 * Fastify plugin: 401 `{"error":"Unauthorized"}` unless the request carries a valid keyledger key
 * (`Authorization: Bearer <key>` or `?api_key=<key>`); the verified record is `request.apiKey`.
 *
 *     import keyledgerAuth from "keyledger-client/fastify";
 *     await app.register(keyledgerAuth, { cache, exclude: ["/health"] });
 *
 * The hook applies to the scope the plugin is registered in (like a plugin wrapped by fastify-plugin): register it
 * at the root for the whole app, or inside a `register`ed scope to protect only that scope's routes.
 */
import type { FastifyInstance, FastifyPluginAsync, FastifyReply, FastifyRequest } from "fastify";

import type { ApiKeyRecord, KeyCache } from "./cache.js";
import { keyFromRequest, UNAUTHORIZED_BODY } from "./request.js";

// A Buffer, so Fastify sends the content-type exactly as set (it appends a charset to string payloads).
const UNAUTHORIZED = Buffer.from(UNAUTHORIZED_BODY);

declare module "fastify" {
  interface FastifyRequest {
    /** The verified key record (keyledger's verify answer), set by the keyledger plugin; null where not checked. */
    apiKey: ApiKeyRecord | null;
  }
}

export interface KeyledgerPluginOptions {
  /** The cache that verifies keys. */
  cache: KeyCache;
  /** Path prefixes that need no key (health checks, metrics). */
  exclude?: string[];
  /** Start the cache when the plugin is registered and close it when the app closes. Default false. */
  manageCache?: boolean;
}

const plugin: FastifyPluginAsync<KeyledgerPluginOptions> = async (
  app: FastifyInstance,
  options: KeyledgerPluginOptions,
) => {
  const { cache } = options;
  if (!cache || typeof cache.verify !== "function") {
    throw new Error("keyledger plugin: options.cache must be a KeyCache");
  }
  const exclude = [...(options.exclude ?? [])];
  if (options.manageCache) {
    await cache.start();
    app.addHook("onClose", async () => {
      await cache.close();
    });
  }
  if (!app.hasRequestDecorator("apiKey")) app.decorateRequest("apiKey", null);

  app.addHook("onRequest", async (request: FastifyRequest, reply: FastifyReply) => {
    if (exclude.length > 0) {
      const q = request.url.indexOf("?");
      const path = q < 0 ? request.url : request.url.slice(0, q);
      if (exclude.some((prefix) => path.startsWith(prefix))) return;
    }
    const key = keyFromRequest(request.headers, request.url);
    const result = key === null ? null : (cache.verifyCached(key) ?? (await cache.verify(key)));
    if (result === null || !result.valid) {
      return reply.code(401).header("content-type", "application/json").send(UNAUTHORIZED);
    }
    request.apiKey = result.key;
  });
};

// What fastify-plugin does: no encapsulation (the hook and the decorator apply to the registering scope), a name.
(plugin as unknown as Record<symbol, unknown>)[Symbol.for("skip-override")] = true;
(plugin as unknown as Record<symbol, unknown>)[Symbol.for("fastify.display-name")] = "keyledger-client";
(plugin as unknown as Record<symbol, unknown>)[Symbol.for("plugin-meta")] = { name: "keyledger-client", fastify: "4.x || 5.x" };

export const keyledgerAuth = plugin;
export default plugin;
