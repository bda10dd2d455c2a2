"""FastAPI dependencies: the app's ``ServerState`` and the API-key checks.

``require_key`` guards every /v1/* route (401 without a valid bearer key, when keys are set);
``require_admin`` guards prompt management (403 for a user key). Keys are compared in constant
time.
"""

from __future__ import annotations

import hmac

from fastapi import Request

from .errors import APIError
from .state import ServerState


def server_state(request: Request) -> ServerState:
    """The state ``create_app`` put on ``app.state.server``."""
    return request.app.state.server


def _bearer(request: Request) -> str | None:
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    return token.strip() if scheme.lower() == "bearer" and token.strip() else None


def _matches(key: str | None, keys: list[str]) -> bool:
    return key is not None and any(hmac.compare_digest(key.encode(), k.encode()) for k in keys)


async def require_key(request: Request) -> None:
    st = server_state(request)
    if not (st.api_keys or st.admin_keys):
        return
    key = _bearer(request)
    if not _matches(key, st.api_keys + st.admin_keys):
        raise APIError(401, "missing API key: send 'Authorization: Bearer KEY'" if key is None
                       else "invalid API key", code="invalid_api_key")


async def require_admin(request: Request) -> None:
    st = server_state(request)
    if not (st.api_keys or st.admin_keys):
        return
    await require_key(request)
    if not _matches(_bearer(request), st.admin_keys):
        raise APIError(403, "adding and removing prompts needs the admin key (--admin-key)",
                       type="permission_error", code="admin_key_required")
