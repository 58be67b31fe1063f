"""Running the router in the foreground with uvicorn (what `fedllm router` calls)."""

from __future__ import annotations

import structlog
import uvicorn
from fastapi import FastAPI

from fedllm.serving.http_limits import uvicorn_options
from fedllm.serving.router.app import create_router_app
from fedllm.serving.router.config import RouterConfig

log = structlog.get_logger(__name__)

INSECURE_WARNING = (
    "router is serving PLAIN HTTP (insecure: true): bearer tokens and prompts cross the network "
    "unencrypted; use this only on loopback for development"
)


def listen_url(config: RouterConfig) -> str:
    """The URL clients should use."""
    scheme = "http" if config.tls is None else "https"
    return f"{scheme}://{config.listen.host}:{config.listen.port}"


def serve_router(config: RouterConfig) -> None:
    """Build the app (ConfigError on a bad key, database or audit path) and serve until stopped."""
    run_router_app(create_router_app(config), config)


def run_router_app(app: FastAPI, config: RouterConfig) -> None:
    """Serve an already built router app in the foreground until interrupted."""
    if config.tls is None:
        log.warning("insecure_router", detail=INSECURE_WARNING)
    uvicorn.run(
        app,
        host=config.listen.host,
        port=config.listen.port,
        ssl_certfile=config.tls.cert_file if config.tls else None,
        ssl_keyfile=config.tls.key_file if config.tls else None,
        log_level="warning",
        access_log=False,
        ws="none",
        timeout_graceful_shutdown=5,
        **uvicorn_options(app),
    )
