"""``Edge``: the pure-ASGI outer layer. It refuses bodies over ``max_body_bytes`` (413, from the
Content-Length header or while the body streams in) and counts every response by endpoint and
status (``softprompt:http_requests_total``), errors included."""

from __future__ import annotations

from .errors import APIError, error_response
from .metrics import Metrics

ENDPOINTS = {"/v1/completions": "completions", "/v1/score": "score", "/v1/classify": "classify",
             "/v1/models": "models", "/v1/prompts": "prompts", "/health": "health",
             "/ready": "ready", "/metrics": "metrics", "/v1/chat/completions": "chat",
             "/tokenize": "tokenize", "/detokenize": "detokenize"}


def endpoint_of(path: str) -> str:
    """The endpoint label of a path (bounded: unknown paths are ``other``)."""
    return ENDPOINTS.get(path) or ("prompts" if path.startswith("/v1/prompts/") else "other")


class Edge:
    """Body limit and response counting around the whole app."""

    def __init__(self, app, max_body_bytes: int, metrics: Metrics):
        self.app, self.limit, self.metrics = app, max_body_bytes, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        endpoint = endpoint_of(scope["path"])
        status = 500

        async def counted_send(msg):
            nonlocal status
            if msg["type"] == "http.response.start":
                status = msg["status"]
            await send(msg)

        too_large = APIError(413, f"request body exceeds {self.limit} bytes (--max-body-bytes)",
                             code="body_too_large")
        length = dict(scope["headers"]).get(b"content-length")
        try:
            if length is not None and length.isdigit() and int(length) > self.limit:
                response = error_response(413, too_large.detail, code=too_large.code)
                await response(scope, receive, counted_send)
                return
            seen = 0

            async def limited_receive():
                nonlocal seen
                msg = await receive()
                if msg["type"] == "http.request":
                    seen += len(msg.get("body", b""))
                    if seen > self.limit:
                        raise too_large
                return msg

            await self.app(scope, limited_receive, counted_send)
        finally:
            self.metrics.responses.labels(endpoint, str(status)).inc()
