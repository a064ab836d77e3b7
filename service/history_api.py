"""``GET /api/auth/api-key/history?id=<keyId>``: a key's events for its owner's dashboard.

Ownership comes from the LOG (the ``ApiKeyCreated`` event's ``referenceId``), not from ``active_api_keys``:
a revoked key is gone from the projection but its history is exactly what an owner wants to see. Anyone
else, an unknown id and an implausible id all get 404 ``KEY_NOT_FOUND``, like ``get``: ids cannot be probed.
"""

from __future__ import annotations

from typing import Any

import msgspec
from litestar import Request, get

from . import inputs
from .errors import ApiError
from .events import ApiKeyCreated, to_envelope


@get("/api-key/history", summary="A key's lifecycle events, oldest first (owner only)")
async def key_history(request: Request[Any, Any, Any]) -> dict[str, Any]:
    from .app import _identify, _rt  # late: app.py imports the router list

    params = dict(request.query_params)
    key_id = inputs.string_field(params, "id", required=True, where="query")
    plausible = inputs.plausible_key_id(key_id)
    async with _rt(request).pool.connection() as conn:
        session, stream, _ = await _identify(request, conn, params, key_id if plausible else None, where="query")
    if not stream or not isinstance(stream[0].event, ApiKeyCreated) or stream[0].event.reference_id != session.user_id:
        raise ApiError(404, "KEY_NOT_FOUND", "API Key not found")
    return {"events": [msgspec.to_builtins(to_envelope(e)) for e in stream]}
