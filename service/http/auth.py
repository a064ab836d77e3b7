"""better-auth's session cookie and origin check, reproduced exactly.

Cookie value: URL-encoded ``token + "." + base64(HMAC-SHA256(secret, token))`` (standard base64, padded).
A bad signature is treated as no session at all, exactly like better-auth. The signature is compared in
constant time. The session itself is looked up by token in better-auth's ``session`` table (store.py).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
from collections.abc import Mapping
from urllib.parse import quote, unquote, urlsplit

from .errors import ApiError

# The ``__Secure-`` cookie first: only an HTTPS response from this origin can set it, while a plain one can be
# tossed in by a sibling subdomain. With both present, the ``__Secure-`` one is the session.
COOKIE_NAMES = ("__Secure-better-auth.session_token", "better-auth.session_token")


def sign(token: str, secret: str) -> str:
    mac = hmac.new(secret.encode(), token.encode(), hashlib.sha256).digest()
    return base64.b64encode(mac).decode()


def cookie_value(token: str, secret: str) -> str:
    """The cookie value better-auth would set for ``token`` (URL-encoded)."""
    return quote(f"{token}.{sign(token, secret)}", safe="")


def session_token(cookies: dict[str, str], secret: str) -> str | None:
    """The session token from a validly signed cookie, or None (missing, malformed or forged)."""
    raw = next((cookies[name] for name in COOKIE_NAMES if cookies.get(name)), None)
    if not raw:
        return None
    value = unquote(raw)
    token, dot, signature = value.rpartition(".")
    if not dot or not token or not signature:
        return None
    if not hmac.compare_digest(sign(token, secret).encode(), signature.encode()):
        return None
    return token


def check_origin(headers: Mapping[str, str], has_cookie: bool, trusted: tuple[str, ...]) -> None:
    """better-auth's CSRF defence: a cookie-carrying POST must come from a trusted origin.

    As better-auth's ``originCheckMiddleware`` (1.7): the origin is ``Origin || Referer``, so a literal ``null``
    Origin (sandboxed frames, privacy redirects) is taken as is and is never replaced by a Referer; missing or
    ``null`` is 403 ``MISSING_OR_NULL_ORIGIN``, except with ``Sec-Fetch-Site: same-origin``, where the browser
    itself vouches that the request comes from this origin. Anything else must be a trusted origin (the
    Referer's scheme://host[:port]), or 403 ``INVALID_ORIGIN``.
    """
    if not has_cookie:
        return
    origin = headers.get("origin") or headers.get("referer") or ""
    if origin and origin != "null":
        parts = urlsplit(origin)
        origin = f"{parts.scheme}://{parts.netloc}" if parts.scheme and parts.netloc else ""
    if not origin or origin == "null":
        if (headers.get("sec-fetch-site") or "").lower() == "same-origin":
            return
        raise ApiError(403, "MISSING_OR_NULL_ORIGIN", "Missing or null Origin")
    if origin not in trusted:
        raise ApiError(403, "INVALID_ORIGIN", "Invalid origin")

