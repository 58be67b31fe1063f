"""Router parts without servers: routing policies, cache, config validation, the CLI."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from fedllm.cli.app import app
from fedllm.config.loading import ConfigError
from fedllm.serving.router.cache import ResponseCache, cache_key
from fedllm.serving.router.config import load_router_config
from fedllm.serving.router.policies import (
    least_busy,
    lowest_latency,
    privacy_aware,
    specialisation,
)

ROOT = Path(__file__).resolve().parents[1]


@dataclass
class Node:
    node_id: str
    healthy: bool = True
    in_flight: int = 0
    ewma_latency_s: float | None = None
    specialisations: list[str] = field(default_factory=list)
    remaining_epsilon: float | None = None


def ids(nodes) -> list[str]:
    return [node.node_id for node in nodes]


def test_least_busy_orders_by_in_flight_and_skips_unhealthy():
    nodes = [Node("a", in_flight=3), Node("b", in_flight=1), Node("c", healthy=False), Node("d")]
    assert ids(least_busy(nodes)) == ["d", "b", "a"]


def test_latency_prefers_fast_nodes_and_measures_new_ones():
    nodes = [Node("slow", ewma_latency_s=0.5), Node("fast", ewma_latency_s=0.01), Node("new")]
    assert ids(lowest_latency(nodes)) == ["new", "fast", "slow"]


def test_specialisation_puts_matching_department_first():
    nodes = [
        Node("general", in_flight=0),
        Node("cardio-busy", in_flight=5, specialisations=["Cardiology"]),
        Node("cardio", in_flight=1, specialisations=["cardiology", "icu"]),
    ]
    assert ids(specialisation(nodes, "cardiology")) == ["cardio", "cardio-busy", "general"]
    assert ids(specialisation(nodes, None)) == ["general", "cardio", "cardio-busy"]
    assert ids(specialisation(nodes, "oncology")) == ["general", "cardio", "cardio-busy"]


def test_privacy_aware_prefers_most_remaining_epsilon():
    nodes = [
        Node("unknown"),
        Node("low", remaining_epsilon=0.5),
        Node("high", remaining_epsilon=7.0),
        Node("dead", healthy=False, remaining_epsilon=100.0),
    ]
    assert ids(privacy_aware(nodes)) == ["high", "low", "unknown"]


def test_cache_keys_separate_users_and_canonicalise_requests():
    first = cache_key("alice", "/v1/inference", {"prompt": "p", "max_tokens": 3})
    same = cache_key("alice", "/v1/inference", {"max_tokens": 3, "prompt": "p"})
    other_user = cache_key("bob", "/v1/inference", {"prompt": "p", "max_tokens": 3})
    assert first == same
    assert first != other_user


def test_cache_expires_and_can_be_disabled():
    cache = ResponseCache(max_entries=2, ttl_s=0.2)
    cache.put("k", {"v": 1})
    assert cache.get("k") == {"v": 1}
    time.sleep(0.3)
    assert cache.get("k") is None
    cache.put("a", 1)
    cache.put("b", 2)
    cache.put("c", 3)
    assert len(cache) == 2
    assert cache.get("a") is None
    cache.reconfigure(ttl_s=0)
    assert not cache.enabled
    cache.put("d", 4)
    assert cache.get("d") is None


def test_example_config_is_valid():
    config = load_router_config(ROOT / "configs" / "router.yaml")
    assert config.tls is not None
    assert not config.insecure
    assert config.listen.host == "127.0.0.1"
    assert config.nodes[0].url == "https://127.0.0.1:8081"
    assert config.nodes[0].hospital_id == "st-mary"
    assert config.node_tls is not None
    assert config.node_tls.client_cert_file is not None


def _write(tmp_path: Path, raw: dict) -> Path:
    path = tmp_path / "router.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


BASE = {
    "insecure": True,
    "auth": {"signing_key_env": "KEY"},
    "audit": {"redaction_key_env": "AUDIT"},
}


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"insecure": False}, "tls.cert_file and tls.key_file are required"),
        ({"routing": {"policy": "random"}}, "routing.policy: got 'random'"),
        ({"ruting": {}}, "ruting: unknown key"),
        ({"auth": {}}, "set exactly one of signing_key_file or signing_key_env"),
        ({"auth": {"signing_key_env": "K", "algorithm": "HS256"}}, "auth.algorithm"),
        ({"nodes": [{"node_id": "a", "url": "ftp://x"}]}, "nodes.0.url"),
        (
            {"nodes": [{"node_id": "a", "url": "http://x"}, {"node_id": "a", "url": "http://y"}]},
            "duplicate node_id",
        ),
        ({"consensus": {"min_nodes": 3, "max_nodes": 2}}, "max_nodes must be >= min_nodes"),
        ({"audit": None}, "audit"),
    ],
)
def test_config_errors_name_the_key(tmp_path, change, message):
    with pytest.raises(ConfigError, match=message):
        load_router_config(_write(tmp_path, {**BASE, **change}))


def test_cli_bad_config_is_one_line_exit_2(tmp_path):
    result = CliRunner().invoke(
        app, ["router", "--config", str(_write(tmp_path, {**BASE, "insecure": False}))]
    )
    assert result.exit_code == 2
    assert "tls.cert_file" in result.output
    assert "Traceback" not in result.output
    missing = CliRunner().invoke(app, ["router", "--config", str(tmp_path / "nope.yaml")])
    assert missing.exit_code == 2
    assert "not found" in missing.output


def test_cli_missing_key_file_is_a_clean_error(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    config = _write(
        tmp_path,
        {
            "insecure": True,
            "database": {"url": f"sqlite:///{tmp_path / 'r.db'}"},
            "auth": {"signing_key_file": str(tmp_path / "absent.pem")},
            "audit": {"redaction_key_env": "FEDLLM_TEST_AUDIT_KEY"},
        },
    )
    result = CliRunner().invoke(app, ["router", "--config", str(config)])
    assert result.exit_code == 2
    assert "absent.pem" in result.output
    assert "Traceback" not in result.output
