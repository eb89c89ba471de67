"""The guard `hive-serve` puts around the FastAPI app transformers' `build_server` returns.

- `ServeGuard` (ASGI middleware): the `--api-key` check on `/v1/...` (a Bearer token, as vLLM and OpenAI take it),
  the request-body cap (`--max-request-bytes`, HTTP 413), and the current request's connection (`client_gone()`)
  so that a non-streaming generation whose client hung up is stopped;
- the admin endpoints transformers serve adds (`/load_model`, `/reset`) and the endpoints hive-serve does not
  guard (`/v1/completions`, `/v1/responses`, `/v1/systemone`, `/v1/audio/transcriptions`) answer 403 / 404;
- every error is OpenAI's body (`{"error": {"message", "type", "param", "code"}}`, so the openai client raises
  `BadRequestError` etc. with the message), its message cut to `MAX_ERROR_CHARS` and never quoting the payload.
"""

from __future__ import annotations

import contextvars
import hmac
import logging

from .serve_media import MediaRefused
from .serve_requests import RequestRefused, capped

logger = logging.getLogger(__name__)

ADMIN_ROUTES = ("/load_model", "/reset")
UNGUARDED_ROUTES = ("/v1/completions", "/v1/responses", "/v1/systemone", "/v1/audio/transcriptions")
SERVED = "this server answers /v1/chat/completions, /v1/models and /health"

_connection: contextvars.ContextVar = contextvars.ContextVar("hive_serve_connection", default=None)


async def client_gone() -> bool:
    """Whether the client of the request being handled has hung up (False outside a request)."""
    request = _connection.get()
    return request is not None and await request.is_disconnected()


def error_body(message: str, kind: str = "invalid_request_error", param: str | None = None, code=None) -> dict:
    return {"error": {"message": capped(message), "type": kind, "param": param, "code": code}}


class ServeGuard:
    """ASGI middleware: API key, body cap, and the connection of each request for `client_gone()`."""

    def __init__(self, app, *, api_key: str | None, max_request_bytes: int):
        self.app, self.api_key, self.max_request_bytes = app, api_key, max_request_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        from starlette.requests import Request

        headers = {key.decode("latin-1").lower(): value.decode("latin-1") for key, value in scope["headers"]}
        if self.api_key is not None and scope["path"].startswith("/v1") and scope["method"] != "OPTIONS":
            scheme, _, token = headers.get("authorization", "").partition(" ")
            if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), self.api_key.encode()):
                message = "a valid API key is needed: send the header 'Authorization: Bearer <key>'"
                return await _answer(send, 401, error_body(message, code="invalid_api_key"))
        declared = headers.get("content-length", "")
        if declared.isdigit() and int(declared) > self.max_request_bytes:
            return await _answer(send, 413, self._too_large())
        body, more = [], True
        size = 0
        while more and scope["method"] in ("POST", "PUT", "PATCH"):
            message = await receive()
            if message["type"] == "http.disconnect":
                return None
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_request_bytes:
                return await _answer(send, 413, self._too_large())
            body.append(chunk)
            more = message.get("more_body", False)
        replayed = False

        async def replay():  # the body read above, once; then the connection itself (its disconnect)
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": b"".join(body), "more_body": False}
            return await receive()

        token = _connection.set(Request(scope, replay))
        try:
            return await self.app(scope, replay, send)
        finally:
            _connection.reset(token)

    def _too_large(self) -> dict:
        return error_body(
            f"the request body is over {self.max_request_bytes} bytes (the server's --max-request-bytes); send "
            "smaller pictures"
        )


async def _answer(send, status: int, body: dict) -> None:
    import json

    payload = json.dumps(body).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": payload})


def guard_app(app, *, api_key: str | None, max_request_bytes: int):
    """`app` (transformers serve's) with the guard, the refused routes and OpenAI-shaped, capped errors."""
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse
    from starlette.exceptions import HTTPException

    app.router.routes = [
        route for route in app.router.routes if getattr(route, "path", None) not in ADMIN_ROUTES + UNGUARDED_ROUTES
    ]

    async def admin_refused():
        message = "refused: this server serves the model it was started with; restart it to serve another"
        return JSONResponse(error_body(message, kind="permission_error"), status_code=403)

    async def not_served():
        return JSONResponse(error_body(f"not served: {SERVED}", kind="not_found_error"), status_code=404)

    for path in ADMIN_ROUTES:
        app.add_api_route(path, admin_refused, methods=["GET", "POST"])
    for path in UNGUARDED_ROUTES:
        app.add_api_route(path, not_served, methods=["GET", "POST"])

    async def refused(_request, error: RequestRefused):
        logger.warning("request refused (%d): %s", error.status, capped(error.message))
        return JSONResponse(error_body(error.message, param=error.param), status_code=error.status)

    async def media_refused(_request, error: MediaRefused):
        logger.warning("picture refused: %s", capped(str(error)))
        return JSONResponse(error_body(str(error), param=error.where), status_code=400)

    async def client_error(_request, error: Exception):
        message = capped(f"{type(error).__name__}: {error}")
        logger.warning("request refused: %s", message)
        return JSONResponse(error_body(message), status_code=400)

    async def http_error(_request, error: HTTPException):
        kind = "invalid_request_error" if error.status_code < 500 else "server_error"
        return JSONResponse(error_body(str(error.detail), kind=kind), status_code=error.status_code)

    async def malformed(_request, error: RequestValidationError):
        fields = sorted({".".join(str(part) for part in item.get("loc", ())) for item in error.errors()})
        message = f"the request body must be a JSON object (problem at: {', '.join(fields)})"
        return JSONResponse(error_body(message), status_code=400)

    async def server_error(_request, error: Exception):
        message = capped(f"{type(error).__name__}: {error}")
        logger.error("request failed: %s", message)
        return JSONResponse(error_body(f"the server failed: {message}", kind="server_error"), status_code=500)

    app.add_exception_handler(RequestRefused, refused)
    app.add_exception_handler(MediaRefused, media_refused)
    # ValueError: HiveProcessor's refusals (image count vs markers), generate's refusals of a request's values
    app.add_exception_handler(ValueError, client_error)
    app.add_exception_handler(HTTPException, http_error)
    app.add_exception_handler(RequestValidationError, malformed)
    app.add_exception_handler(Exception, server_error)
    app.add_middleware(ServeGuard, api_key=api_key, max_request_bytes=max_request_bytes)
    return app
