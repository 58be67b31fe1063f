"""The router's node client (fedllm/serving/router/http_client.py) against real HTTP servers on
loopback: keep-alive reuse, errors, and a node that closes a kept-alive connection just as a
request arrives on it (only GET is resent; a POST may already have charged ε)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable

import pytest

from fedllm.federation.launcher import free_port
from fedllm.serving.router import http_client
from fedllm.serving.router.http_client import (
    NodeClient,
    NodeConnectError,
    NodeTimeoutError,
    NodeTransportError,
)


class Node:
    """A real HTTP/1.1 server that records each request with the connection it came on.

    It answers with keep-alive; with ``close_on_reuse`` it reads the second request on a
    connection and closes it without a byte of answer (an idle-timeout close racing the
    client's reuse). A request to ``/slow`` is never answered.
    """

    def __init__(self, *, close_on_reuse: bool = False) -> None:
        self.close_on_reuse = close_on_reuse
        self.connections = 0
        self.requests: list[tuple[int, str, bytes]] = []  # (connection, request line, body)
        self.url = ""
        self._server: asyncio.Server | None = None

    async def __aenter__(self) -> Node:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        port = self._server.sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"
        return self

    async def __aexit__(self, *_: object) -> None:
        assert self._server is not None
        self._server.close()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        connection = self.connections
        answered = 0
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                lines = head.decode().split("\r\n")
                headers = dict(line.split(": ", 1) for line in lines[1:] if line)
                body = await reader.readexactly(int(headers.get("Content-Length", "0")))
                self.requests.append((connection, lines[0], body))
                if lines[0].split()[1] == "/slow":
                    await asyncio.sleep(3600)
                if answered and self.close_on_reuse:
                    break
                reply = json.dumps({"connection": connection, "echo": body.decode()}).encode()
                writer.write(
                    b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                    + f"Content-Length: {len(reply)}\r\n\r\n".encode()
                    + reply
                )
                await writer.drain()
                answered += 1
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()


def client(**overrides: float) -> NodeClient:
    settings = {"timeout_s": 5.0, "connect_timeout_s": 5.0} | overrides
    return NodeClient(
        ssl_context=None,
        timeout_s=settings["timeout_s"],
        connect_timeout_s=settings["connect_timeout_s"],
        max_connections=4,
        max_idle_connections=4,
    )


def run(scenario: Callable[[], Awaitable[None]]) -> None:
    asyncio.run(asyncio.wait_for(scenario(), timeout=30))


def test_requests_reuse_one_kept_alive_connection():
    async def scenario() -> None:
        async with Node() as node:
            nodes = client()
            first = await nodes.request("POST", node.url, "/v1/inference", {"prompt": "a"})
            second = await nodes.request("GET", node.url, "/v1/health")
            await nodes.aclose()
        assert first.status_code == 200
        assert first.json() == {"connection": 1, "echo": '{"prompt":"a"}'}
        assert second.json()["connection"] == 1
        assert node.connections == 1
        assert [line for _, line, _ in node.requests] == [
            "POST /v1/inference HTTP/1.1",
            "GET /v1/health HTTP/1.1",
        ]

    run(scenario)


def test_get_on_a_connection_the_node_closed_is_retried_once_on_a_fresh_one():
    async def scenario() -> None:
        async with Node(close_on_reuse=True) as node:
            nodes = client()
            await nodes.request("GET", node.url, "/v1/health")
            response = await nodes.request("GET", node.url, "/v1/health")
            await nodes.aclose()
        assert response.status_code == 200
        assert response.json()["connection"] == 2
        # sent on the kept-alive connection (closed unanswered), then once on a new one
        assert [connection for connection, _, _ in node.requests] == [1, 1, 2]

    run(scenario)


def test_post_on_a_connection_the_node_closed_is_not_resent():
    async def scenario() -> None:
        async with Node(close_on_reuse=True) as node:
            nodes = client()
            await nodes.request("POST", node.url, "/v1/consensus/open", {"session": "s1"})
            with pytest.raises(NodeTransportError, match="closed before any response"):
                await nodes.request("POST", node.url, "/v1/consensus/open", {"session": "s2"})
            await asyncio.sleep(0.2)  # a resend, had there been one, would have arrived by now
            await nodes.aclose()
        assert [(connection, body) for connection, _, body in node.requests] == [
            (1, b'{"session":"s1"}'),
            (1, b'{"session":"s2"}'),
        ]
        assert node.connections == 1

    run(scenario)


def test_the_client_still_works_after_a_post_failed_on_a_closed_connection():
    async def scenario() -> None:
        async with Node(close_on_reuse=True) as node:
            nodes = client()
            await nodes.request("POST", node.url, "/v1/inference", {"prompt": "a"})
            with pytest.raises(NodeTransportError):
                await nodes.request("POST", node.url, "/v1/inference", {"prompt": "b"})
            response = await nodes.request("POST", node.url, "/v1/inference", {"prompt": "c"})
            await nodes.aclose()
        assert response.json() == {"connection": 2, "echo": '{"prompt":"c"}'}

    run(scenario)


def test_a_connection_idle_too_long_is_not_reused(monkeypatch):
    monkeypatch.setattr(http_client, "MAX_IDLE_REUSE_S", 0.0)

    async def scenario() -> None:
        async with Node(close_on_reuse=True) as node:
            nodes = client()
            await nodes.request("POST", node.url, "/v1/inference", {"prompt": "a"})
            await asyncio.sleep(0.01)
            response = await nodes.request("POST", node.url, "/v1/inference", {"prompt": "b"})
            await nodes.aclose()
        assert response.json()["connection"] == 2
        assert [connection for connection, _, _ in node.requests] == [1, 2]

    run(scenario)


def test_nothing_listening_is_a_connect_error():
    async def scenario() -> None:
        nodes = client()
        with pytest.raises(NodeConnectError):
            await nodes.request("POST", f"http://127.0.0.1:{free_port()}", "/v1/inference", {})
        await nodes.aclose()

    run(scenario)


def test_a_node_that_does_not_answer_times_out():
    async def scenario() -> None:
        async with Node() as node:
            nodes = client(timeout_s=0.3)
            with pytest.raises(NodeTimeoutError):
                await nodes.request("POST", node.url, "/slow", {"prompt": "a"})
            await nodes.aclose()
        assert [line for _, line, _ in node.requests] == ["POST /slow HTTP/1.1"]

    run(scenario)


def test_header_values_with_line_breaks_are_refused_before_sending():
    async def scenario() -> None:
        async with Node() as node:
            nodes = client()
            with pytest.raises(ValueError, match="line breaks"):
                await nodes.request(
                    "GET", node.url, "/v1/health", headers={"X-Evil": "a\r\nX-Injected: 1"}
                )
            await nodes.aclose()
        assert node.requests == []

    run(scenario)
