"""The hospital node under slow, oversized, malformed and sloppy requests, over real sockets.

One node (ConstantBackend, uvicorn on loopback) with short timeouts and a small connection
limit serves every test; raw sockets play the clients that well-behaved libraries never are.
"""

from __future__ import annotations

import time

import httpx
import pytest
from raw_http import connect, exchange, read_response, send_until_refused, uvicorn_errors

from fedllm.config.loading import ConfigError
from fedllm.serving.node.app import create_node_app
from fedllm.serving.node.backends import ConstantBackend
from fedllm.serving.node.config import NodeServerConfig, validate_node_config
from fedllm.serving.node.server import BackgroundServer

LIMITS = {
    "max_request_bytes": 64 * 1024,
    "max_header_bytes": 4096,
    "header_timeout_s": 1.0,
    "body_timeout_s": 1.0,
    "max_incoming_connections": 6,
}


@pytest.fixture(scope="module")
def node():
    config = NodeServerConfig.model_validate(
        {"node_id": "node-r", "hospital_id": "hospital-r", "backend": "constant", "limits": LIMITS}
    )
    with BackgroundServer(create_node_app(config, ConstantBackend())) as server:
        yield server


def _assert_node_error(response, status: int, fragment: str) -> None:
    """The node's documented error shape: FastAPI's detail plus OpenAI's error object."""
    assert response.status == status, response.body
    assert response.headers["content-type"] == "application/json"
    body = response.json()
    assert fragment in body["detail"]
    assert body["error"]["code"] == status


def test_no_api_docs_or_schema(node):
    for path in ("/docs", "/redoc", "/openapi.json"):
        assert httpx.get(node.url + path).status_code == 404


def test_declared_oversized_body_is_413_before_reading(node):
    head = (
        b"POST /v1/inference HTTP/1.1\r\nHost: node\r\nContent-Type: application/json\r\n"
        b"Content-Length: 10485760\r\n\r\n"
    )
    response = exchange(node.url, head)
    _assert_node_error(response, 413, "larger than 65536 bytes")
    assert response.headers["connection"] == "close"


def test_streamed_oversized_body_is_413(node):
    chunk = b'{"prompt": "' + b"a" * 70_000 + b'"}'
    response = httpx.post(
        node.url + "/v1/inference",
        content=iter([chunk[:30_000], chunk[30_000:]]),  # chunked: no Content-Length to trust
        headers={"content-type": "application/json"},
    )
    assert response.status_code == 413
    assert "larger than 65536 bytes" in response.json()["detail"]


@pytest.mark.parametrize(
    "body",
    [
        {"prompt": "hi", "max_tokens": True},
        {"prompt": "hi", "max_tokens": 4.0},
        {"prompt": "hi", "require_consensus": "yes"},
        {"prompt": "hi", "temperature": "0.5"},
    ],
)
def test_request_schemas_are_strict(node, body):
    response = httpx.post(node.url + "/v1/inference", json=body)
    assert response.status_code == 422, response.text
    assert response.json()["error"]["code"] == 422


def test_json_numbers_still_count_as_floats(node):
    response = httpx.post(
        node.url + "/v1/completions", json={"prompt": "hi", "temperature": 0, "max_tokens": 2}
    )
    assert response.status_code == 200, response.text


def test_headers_that_never_end_time_out(node):
    with connect(node.url) as sock:
        sock.sendall(b"POST /v1/inference HTTP/1.1\r\nHost: node\r\nX-Slow: 1\r\n")
        response = read_response(sock, timeout_s=5)
    _assert_node_error(response, 408, "headers not received within 1 s")
    assert response.elapsed_s < 3


def test_silent_connection_times_out(node):
    with connect(node.url) as sock:
        response = read_response(sock, timeout_s=5)
    assert response.status == 408
    assert response.elapsed_s < 3


def test_body_shorter_than_content_length_times_out(node):
    with uvicorn_errors() as errors, connect(node.url) as sock:
        sock.sendall(
            b"POST /v1/inference HTTP/1.1\r\nHost: node\r\nContent-Type: application/json\r\n"
            b'Content-Length: 100\r\n\r\n{"prompt": '
        )
        response = read_response(sock, timeout_s=5)
    _assert_node_error(response, 408, "body not received within 1 s")
    assert response.elapsed_s < 3
    assert errors == []


def test_oversized_headers_are_431(node):
    for head in (
        b"GET /v1/health HTTP/1.1\r\nHost: node\r\nX-Big: " + b"a" * 8000 + b"\r\n\r\n",
        b"GET /v1/health HTTP/1.1\r\nHost: node\r\n" + b"X-Many: b\r\n" * 1000 + b"\r\n",
    ):
        response = exchange(node.url, head)
        _assert_node_error(response, 431, "exceed 4096 bytes")


def test_one_megabyte_of_headers_is_cut_off(node):
    with connect(node.url) as sock:
        sock.sendall(b"GET /v1/health HTTP/1.1\r\nHost: node\r\nX-Big: ")
        sent = send_until_refused(sock, 1024 * 1024)
    assert sent < 1024 * 1024  # the node answered 431 (above) and hung up long before


def test_malformed_http_is_a_json_400(node):
    response = exchange(node.url, b"NOT HTTP AT ALL\r\n\r\n")
    _assert_node_error(response, 400, "malformed HTTP request")


def test_client_leaving_mid_body_is_not_an_error(node):
    with uvicorn_errors() as errors:
        with connect(node.url) as sock:
            sock.sendall(
                b"POST /v1/inference HTTP/1.1\r\nHost: node\r\nContent-Type: application/json\r\n"
                b'Content-Length: 1000\r\n\r\n{"prompt": "'
            )
            time.sleep(0.2)
        time.sleep(0.5)
        assert httpx.get(node.url + "/v1/health").status_code == 200
    assert errors == []


def test_connection_limit(node):
    held = []
    try:
        for _ in range(LIMITS["max_incoming_connections"]):
            held.append(connect(node.url))
        time.sleep(0.2)
        with connect(node.url) as extra:
            response = read_response(extra, timeout_s=5)
        _assert_node_error(response, 503, "too many open connections (limit 6)")
    finally:
        for sock in held:
            sock.close()
    time.sleep(0.2)
    assert httpx.get(node.url + "/v1/health").status_code == 200


def test_limits_are_validated_naming_the_key():
    base = {"node_id": "n", "hospital_id": "h", "backend": "constant"}
    for key, value in [("header_timeout_s", float("inf")), ("max_request_bytes", 10**12)]:
        with pytest.raises(ConfigError, match=f"limits.{key}"):
            validate_node_config({**base, "limits": {key: value}})
