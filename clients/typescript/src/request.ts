/** Framework-free helpers: where a request carries its key, and verifying it. */
import type { KeyCache, VerifyResult } from "./cache.js";

/** The body a refused request gets (as Rybbit answers): `{"error":"Unauthorized"}`, content-type application/json. */
export const UNAUTHORIZED_BODY = '{"error":"Unauthorized"}';

/** Request headers in any of the usual shapes: Node's `IncomingHttpHeaders`, a fetch `Headers`, or a plain record. */
export type HeadersLike =
  | { get(name: string): string | null }
  | Record<string, string | string[] | undefined>;

const MISSING_KEY: VerifyResult = Object.freeze({
  valid: false,
  error: Object.freeze({ message: "API key is required", code: "KEY_NOT_FOUND" }),
  key: null,
}) as VerifyResult;

function header(headers: HeadersLike | null | undefined, name: string): string | undefined {
  if (!headers) return undefined;
  if (typeof (headers as { get?: unknown }).get === "function") {
    return (headers as { get(name: string): string | null }).get(name) ?? undefined;
  }
  const record = headers as Record<string, string | string[] | undefined>;
  let value = record[name];
  if (value === undefined) {
    for (const k of Object.keys(record)) {
      if (k.toLowerCase() === name) {
        value = record[k];
        break;
      }
    }
  }
  return Array.isArray(value) ? value[0] : value;
}

/**
 * The key a request carries: `Authorization: Bearer <key>`, else the `api_key` query parameter of `url` (a path with
 * its query, as in `req.url`, or an absolute URL). `null` when there is none.
 */
export function keyFromRequest(headers: HeadersLike | null | undefined, url?: string | URL | null): string | null {
  const authorization = header(headers, "authorization");
  if (authorization) {
    const space = authorization.indexOf(" ");
    const scheme = space < 0 ? authorization : authorization.slice(0, space);
    const token = space < 0 ? "" : authorization.slice(space + 1).trim();
    if (scheme.toLowerCase() === "bearer" && token) return token;
  }
  if (url) {
    const text = typeof url === "string" ? url : url.href;
    const q = text.indexOf("?");
    if (q >= 0 && text.includes("api_key=", q)) {
      const end = text.indexOf("#", q);
      const value = new URLSearchParams(text.slice(q + 1, end < 0 ? undefined : end)).get("api_key");
      if (value) return value;
    }
  }
  return null;
}

/**
 * Verify the key a request carries (see `keyFromRequest`) through `cache`: from memory when that is provably fresh,
 * else over HTTP. A request without a key answers invalid (`KEY_NOT_FOUND`). Never rejects.
 */
export function verifyRequest(
  cache: KeyCache,
  headers: HeadersLike | null | undefined,
  url?: string | URL | null,
): Promise<VerifyResult> {
  const key = keyFromRequest(headers, url);
  if (key === null) return Promise.resolve(MISSING_KEY);
  return cache.verify(key);
}
