"""Running ASGI apps with uvicorn: the node server in the foreground, any app in a thread.

`build_node_app` builds a hospital node from its config and key ring source (backend, privacy
ledger, app) and `serve_node` serves it with the configured TLS; with ``tls.client_ca_file``
it is mutual TLS, so only holders of a certificate from the federation's CA (the router) can
reach it.

`BackgroundServer` exists so tests and benchmarks talk to a real HTTP server (real sockets,
real TLS) without subprocesses: the listening socket is bound before uvicorn starts, so the
port is known up front and no other process can take it in between.
"""

from __future__ import annotations

import socket
import ssl
import threading
import time
from contextlib import ExitStack
from types import TracebackType
from typing import Any

import uvicorn
from fastapi import FastAPI

from fedllm.privacy.node_ledger import NodePrivacyLedger
from fedllm.security.encryption import KeyRingSource
from fedllm.serving.http_limits import uvicorn_options
from fedllm.serving.node.app import create_node_app, create_probe_app
from fedllm.serving.node.backends import ConstantBackend, GenerationBackend
from fedllm.serving.node.config import NodeServerConfig

LOOPBACK = "127.0.0.1"
STARTUP_TIMEOUT_S = 15.0
SHUTDOWN_TIMEOUT_S = 10.0


class BackgroundServer:
    """Context manager running an ASGI app with uvicorn in a daemon thread on loopback.

    ``with BackgroundServer(app) as server: httpx.get(server.url + "/v1/health")``. TLS is on
    when ``ssl_certfile`` is given; ``ssl_ca_certs`` with ``ssl_cert_reqs=ssl.CERT_REQUIRED``
    makes it mutual TLS (clients must present a certificate signed by that CA). ``port`` 0 picks
    a free port; a fixed one lets a stopped server come back at the same address.
    """

    def __init__(
        self,
        app: Any,
        *,
        ssl_certfile: str | None = None,
        ssl_keyfile: str | None = None,
        ssl_ca_certs: str | None = None,
        ssl_cert_reqs: int = ssl.CERT_NONE,
        port: int = 0,
        host: str = LOOPBACK,
    ) -> None:
        self._app = app
        self._ssl = {
            "ssl_certfile": ssl_certfile,
            "ssl_keyfile": ssl_keyfile,
            "ssl_ca_certs": ssl_ca_certs,
            "ssl_cert_reqs": ssl_cert_reqs,
        }
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None
        self._socket: socket.socket | None = None
        self.host = host
        self.port = port

    @property
    def url(self) -> str:
        """Base URL of the running server, e.g. ``http://127.0.0.1:54321``."""
        scheme = "https" if self._ssl["ssl_certfile"] else "http"
        return f"{scheme}://{self.host}:{self.port}"

    def __enter__(self) -> BackgroundServer:
        return self.start()

    def start(self) -> BackgroundServer:
        """Bind, start uvicorn in its thread and wait until it serves."""
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((self.host, self.port))
        self._socket = sock
        self.port = sock.getsockname()[1]
        config = uvicorn.Config(
            self._app,
            host=self.host,
            port=self.port,
            log_level="warning",
            access_log=False,
            ws="none",
            timeout_graceful_shutdown=2,
            **self._ssl,
            **uvicorn_options(self._app),
        )
        server = uvicorn.Server(config)
        thread = threading.Thread(
            target=server.run,
            kwargs={"sockets": [sock]},
            name=f"uvicorn-{self.port}",
            daemon=True,
        )
        self._server, self._thread = server, thread
        thread.start()
        self._wait_started(server, thread)
        return self

    def _wait_started(self, server: uvicorn.Server, thread: threading.Thread) -> None:
        """Block until uvicorn serves, or fail with a clear error if it died or hung."""
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while not server.started:
            if not thread.is_alive():
                self._close_socket()
                raise RuntimeError(f"server on {self.url} failed to start (see log above)")
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"server on {self.url} did not start in {STARTUP_TIMEOUT_S}s")
            time.sleep(0.01)

    def stop(self) -> None:
        """Ask uvicorn to exit, wait for its thread, release the socket (idempotent)."""
        if self._server is not None:
            self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(SHUTDOWN_TIMEOUT_S)
        self._close_socket()

    def _close_socket(self) -> None:
        if self._socket is not None:
            self._socket.close()
            self._socket = None

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()


def build_backend(config: NodeServerConfig, *, keyring: KeyRingSource | None) -> GenerationBackend:
    """The configured model: ``constant`` (tests, benchmarks) or the real model + adapters."""
    if config.backend == "constant":
        return ConstantBackend()
    from fedllm.serving.node.generation import ModelBackend  # torch/transformers only when needed

    return ModelBackend(
        config.model,
        adapter_dir=config.adapter_dir,
        local_adapter=config.local_adapter,
        reload_interval_s=config.reload_interval_s,
        device=config.device,
        allow_non_dp_adapters=config.allow_non_dp_adapters,
        keyring=keyring,
    )


def open_ledger(
    config: NodeServerConfig, *, keyring: KeyRingSource | None
) -> NodePrivacyLedger | None:
    """The hospital's privacy ledger, or None (consensus disabled) when none is configured."""
    if config.ledger is None:
        return None
    return NodePrivacyLedger(
        config.ledger.url,
        config.hospital_id,
        epsilon_cap=config.ledger.epsilon_cap,
        delta=config.ledger.delta,
        accountant=config.ledger.accountant,
        keyring=keyring,
    )


def build_node_app(config: NodeServerConfig, *, keyring: KeyRingSource | None) -> FastAPI:
    """Backend, ledger and app for ``config``, ready to serve; ``keyring`` is the key ring
    source `fedllm serve` read from its environment (adapters and ledger at rest)."""
    backend = build_backend(config, keyring=keyring)
    return create_node_app(config, backend, open_ledger(config, keyring=keyring))


def tls_options(config: NodeServerConfig) -> dict[str, Any]:
    """uvicorn's TLS keyword arguments for ``config`` (empty: plain HTTP)."""
    if config.tls is None:
        return {}
    options: dict[str, Any] = {
        "ssl_certfile": str(config.tls.cert_file),
        "ssl_keyfile": str(config.tls.key_file),
    }
    if config.tls.client_ca_file is not None:
        options["ssl_ca_certs"] = str(config.tls.client_ca_file)
        options["ssl_cert_reqs"] = ssl.CERT_REQUIRED
    return options


def serve_node(config: NodeServerConfig, app: FastAPI) -> None:
    """Serve ``app`` (from `build_node_app`) as ``config`` says until interrupted (blocking)."""
    with ExitStack() as probes:
        if config.probe_port is not None:
            probes.enter_context(
                BackgroundServer(create_probe_app(app), host=config.host, port=config.probe_port)
            )
        uvicorn.run(
            app,
            host=config.host,
            port=config.port,
            log_level="warning",
            access_log=False,
            ws="none",
            **tls_options(config),
            **uvicorn_options(app),
        )
