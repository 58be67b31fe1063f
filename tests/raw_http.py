"""Raw-socket HTTP for robustness tests: what a slow, sloppy or hostile client really sends."""

from __future__ import annotations

import json
import logging
import socket
import ssl
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit


@dataclass
class RawResponse:
    status: int
    headers: dict[str, str]
    body: bytes
    elapsed_s: float

    def json(self) -> Any:
        return json.loads(self.body)


def connect(url: str, ssl_context: ssl.SSLContext | None = None, timeout_s: float = 10.0):
    """A connected (TLS-wrapped for https) socket to the server at ``url``."""
    parts = urlsplit(url)
    sock = socket.create_connection((parts.hostname, parts.port), timeout=timeout_s)
    if parts.scheme == "https":
        assert ssl_context is not None
        sock = ssl_context.wrap_socket(sock, server_hostname=parts.hostname)
    return sock


def read_response(sock: socket.socket, timeout_s: float = 10.0) -> RawResponse:
    """Read until the server closes the connection (every refusal here closes it)."""
    started = time.monotonic()
    sock.settimeout(timeout_s)
    data = b""
    while True:
        try:
            chunk = sock.recv(65536)
        except (ConnectionResetError, ssl.SSLError):
            break
        if not chunk:
            break
        data += chunk
    elapsed = time.monotonic() - started
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    assert lines[0].startswith("HTTP/1.1 "), f"no HTTP response: {data[:200]!r}"
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return RawResponse(int(lines[0].split()[1]), headers, body, elapsed)


def exchange(
    url: str, data: bytes, ssl_context: ssl.SSLContext | None = None, timeout_s: float = 10.0
) -> RawResponse:
    """Send ``data`` as is and read the answer."""
    with connect(url, ssl_context, timeout_s) as sock:
        if data:
            sock.sendall(data)
        return read_response(sock, timeout_s)


def send_until_refused(sock: socket.socket, total: int, chunk: int = 16384) -> int:
    """Trickle up to ``total`` bytes of header; how many were sent before the server hung up."""
    sent = 0
    try:
        while sent < total:
            sock.sendall(b"a" * chunk)
            sent += chunk
            time.sleep(0.001)
    except OSError:
        pass
    return sent


@contextmanager
def uvicorn_errors() -> Iterator[list[logging.LogRecord]]:
    """ERROR records (tracebacks of unhandled exceptions) uvicorn logs while the block runs."""
    records: list[logging.LogRecord] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record)

    handler = Collect(level=logging.ERROR)
    logger = logging.getLogger("uvicorn.error")
    logger.addHandler(handler)
    try:
        yield records
    finally:
        logger.removeHandler(handler)
