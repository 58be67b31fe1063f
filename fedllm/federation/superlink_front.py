"""The SuperLink's public face: a TLS front that lets the network reach the Fleet API only.

Flower 1.42's ``flower-superlink`` serves the Fleet API (SuperNodes), the Control API
(``flwr run``, ``flwr supernode register``) and the Runtime API (its own ServerApp) on one
HTTPS port, and the open-source build authenticates only the Fleet API (SuperNode keys); its
Control API account login is an Enterprise feature. So ``fedllm superlink start`` binds
``flower-superlink`` to 127.0.0.1 and runs this front on the public address with the same
certificate. It forwards ``POST /v1/fleet/<method>`` and ``GET /health`` to the SuperLink and
answers everything else with 403 and a one-line reason: anyone who can reach the public port
can be a SuperNode only with a registered key, and nobody can start a run or register a key
from the network. The Control API stays on the SuperLink host (or an operator's ``ssh -L``).

Fleet requests are protobuf bodies in plain HTTP/1.1 POSTs (httpx on the SuperNode, uvicorn on
the SuperLink), signed by the node's key in headers the front passes through untouched.
Bodies are streamed both ways, so the front holds no model update in memory.

Run as ``python -m fedllm.federation.superlink_front --host ... --port ... --upstream ...``.
"""

from __future__ import annotations

import argparse
import re
import ssl
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from pathlib import Path

import httpx
import structlog
import uvicorn
from starlette.applications import Starlette
from starlette.background import BackgroundTask
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route

log = structlog.get_logger(__name__)

# Every Fleet API method is a lowercase, dash-separated name under /v1/fleet/; a path that
# does not match exactly (dot segments, encoded characters, a query) is never forwarded.
FLEET_PATH = re.compile(r"/v1/fleet/[a-z][a-z-]*")
HEALTH_PATH = "/health"
# connection-level headers (RFC 9110 §7.6.1) and those the front sets itself
_NOT_FORWARDED = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "proxy-connection",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "host",
        "x-forwarded-for",
        "x-forwarded-proto",
        "forwarded",
    }
)
_NOT_RETURNED = frozenset({*_NOT_FORWARDED, "date", "server"})
UPSTREAM_TIMEOUT = httpx.Timeout(120.0, connect=10.0)


def refusal(method: str, path: str, query: str = "") -> str | None:
    """Why the front refuses a request (one line), or None when it forwards it."""
    if method == "POST" and FLEET_PATH.fullmatch(path) and not query:
        return None
    if method == "GET" and path == HEALTH_PATH and not query:
        return None
    if path.startswith("/v1/control/"):
        what = "the Control API (flwr run, flwr supernode register)"
    elif path.startswith("/v1/runtime/"):
        what = "the Runtime API"
    else:
        what = "not a Fleet API request"
    return (
        f"{method} {path}: {what} is not served on this port; it answers on the SuperLink "
        "host's loopback address only (use ssh -L to reach it); this port serves SuperNodes "
        "(POST /v1/fleet/...)"
    )


def create_app(upstream: str, verify: ssl.SSLContext | bool) -> Starlette:
    """The front's ASGI app, forwarding allowed requests to ``upstream`` (a base URL)."""
    client = httpx.AsyncClient(base_url=upstream, verify=verify, timeout=UPSTREAM_TIMEOUT)

    async def handle(request: Request) -> Response:
        path, query = request.url.path, request.url.query
        reason = refusal(request.method, path, query)
        if reason is not None:
            log.warning("superlink_front.refused", client=_client(request), reason=reason)
            return PlainTextResponse(reason + "\n", status_code=403)
        headers = [(k, v) for k, v in request.headers.items() if k not in _NOT_FORWARDED]
        headers += [
            ("x-forwarded-for", _client(request)),
            ("x-forwarded-proto", request.url.scheme),
        ]
        outgoing = client.build_request(
            request.method,
            path,
            headers=headers,
            content=request.stream() if request.method == "POST" else None,
        )
        try:
            answer = await client.send(outgoing, stream=True)
        except httpx.HTTPError as error:
            message = f"the SuperLink behind this front is not answering: {error!r}"
            log.error("superlink_front.upstream_failed", path=path, error=repr(error))
            return PlainTextResponse(message + "\n", status_code=502)
        return StreamingResponse(
            answer.aiter_raw(),
            status_code=answer.status_code,
            headers={k: v for k, v in answer.headers.items() if k not in _NOT_RETURNED},
            background=BackgroundTask(answer.aclose),
        )

    @asynccontextmanager
    async def lifespan(_: Starlette) -> AsyncIterator[None]:
        async with client:
            yield

    methods = ["GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS"]
    return Starlette(routes=[Route("/{path:path}", handle, methods=methods)], lifespan=lifespan)


def _client(request: Request) -> str:
    return request.client.host if request.client else "unknown"


def upstream_verification(ca_cert: Path | None) -> ssl.SSLContext | bool:
    """Verify the loopback SuperLink against the consortium CA (False: insecure test mode)."""
    if ca_cert is None:
        return False
    return ssl.create_default_context(cafile=str(ca_cert))


def front_arguments(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """The front's command line (see :func:`fedllm.federation.deployment.front_command`)."""
    parser = argparse.ArgumentParser(description="TLS front of the SuperLink: Fleet API only")
    parser.add_argument("--host", required=True, help="public interface to listen on")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--upstream", required=True, help="the SuperLink as 127.0.0.1:PORT")
    parser.add_argument("--ssl-ca-certfile", type=Path, help="consortium CA (verifies upstream)")
    parser.add_argument("--ssl-certfile", type=Path, help="the SuperLink's certificate")
    parser.add_argument("--ssl-keyfile", type=Path, help="the SuperLink's private key")
    parser.add_argument("--insecure", action="store_true", help="plain HTTP (tests only)")
    arguments = parser.parse_args(argv)
    tls = (arguments.ssl_ca_certfile, arguments.ssl_certfile, arguments.ssl_keyfile)
    if any(tls) if arguments.insecure else not all(tls):
        parser.error("give all three --ssl-* files, or --insecure")
    return arguments


def main(argv: Sequence[str] | None = None) -> None:
    """Serve the front until SIGTERM / Ctrl-C."""
    arguments = front_arguments(argv)
    scheme = "http" if arguments.insecure else "https"
    app = create_app(
        f"{scheme}://{arguments.upstream}",
        upstream_verification(None if arguments.insecure else arguments.ssl_ca_certfile),
    )
    log.info(
        "superlink_front.start",
        listen=f"{arguments.host}:{arguments.port}",
        upstream=arguments.upstream,
        tls=not arguments.insecure,
    )
    uvicorn.run(
        app,
        host=arguments.host,
        port=arguments.port,
        ssl_certfile=None if arguments.insecure else str(arguments.ssl_certfile),
        ssl_keyfile=None if arguments.insecure else str(arguments.ssl_keyfile),
        server_header=False,
        log_level="info",
    )


if __name__ == "__main__":
    main()
