"""``GET /api/auth/api-key/history?id=<keyId>[&configId=org]``: a key's events for its owner's dashboard.

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
    from .app import _config_id, _identify, _may_manage, _rt  # late: app.py imports the router list

    params = dict(request.query_params)
    key_id = inputs.string_field(params, "id", required=True, where="query")
    config_id = _config_id(params)
    plausible = inputs.plausible_key_id(key_id)
    async with _rt(request).pool.connection() as conn:
        session, stream, _ = await _identify(request, conn, params, key_id if plausible else None, where="query")
        created = stream[0].event if stream and isinstance(stream[0].event, ApiKeyCreated) else None
        if created is None or created.config_id != config_id:
            raise ApiError(404, "KEY_NOT_FOUND", "API Key not found")
        if config_id == "org":  # the organization's owners and admins, like every other org-key endpoint
            await _may_manage(conn, session.user_id, created.reference_id)
        elif created.reference_id != session.user_id:
            raise ApiError(404, "KEY_NOT_FOUND", "API Key not found")
    return {"events": [msgspec.to_builtins(to_envelope(e)) for e in stream]}
