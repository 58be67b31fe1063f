"""Errors the router turns into clear JSON answers, and the handlers that do it.

Every user mistake becomes a 4xx ``{"detail": ...}``; only a genuine bug becomes a 500, and
even then the body says nothing about the request (it may hold a prompt).
"""

from __future__ import annotations

from typing import Any

import structlog
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

log = structlog.get_logger(__name__)


class ApiError(Exception):
    """An HTTP error with a user-facing message (and optional headers such as Retry-After)."""

    def __init__(self, status_code: int, detail: str, headers: dict[str, str] | None = None):
        super().__init__(detail)
        self.status_code = status_code
        self.detail = detail
        self.headers = headers


def error_body(status_code: int, detail: str) -> dict[str, Any]:
    """The router's error shape, ``{"detail": ...}``, also for errors raised below the app
    (connection limits, slow or oversized requests, malformed HTTP)."""
    del status_code
    return {"detail": detail}


def retry_after(seconds: float) -> dict[str, str]:
    """A Retry-After header in whole seconds (at least 1)."""
    return {"Retry-After": str(max(1, int(seconds + 0.999)))}


def install_error_handlers(app: FastAPI) -> None:
    """JSON for ApiError and validation errors; a bare 500 for anything unexpected."""

    @app.exception_handler(ApiError)
    async def _api_error(_request: Request, error: ApiError) -> JSONResponse:
        return JSONResponse(
            {"detail": error.detail}, status_code=error.status_code, headers=error.headers
        )

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_request: Request, error: RequestValidationError) -> JSONResponse:
        problems = [
            {
                "loc": list(item.get("loc", ())),
                "msg": str(item.get("msg", "")),
                "type": str(item.get("type", "")),
            }
            for item in error.errors()
        ]
        return JSONResponse({"detail": problems}, status_code=422)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_request: Request, error: StarletteHTTPException) -> JSONResponse:
        return JSONResponse(
            {"detail": error.detail}, status_code=error.status_code, headers=error.headers
        )

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, error: Exception) -> JSONResponse:
        log.error(
            "router_internal_error",
            path=request.url.path,
            error_type=type(error).__name__,
        )
        return JSONResponse({"detail": "internal router error"}, status_code=500)
