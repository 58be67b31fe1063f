"""The hospital inference server over real HTTP: uvicorn on loopback, httpx and openai clients."""

from __future__ import annotations

import hashlib
import os
import signal
import socket
import ssl
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import openai
import pytest
import torch
import yaml
from federation_helpers import TINY_TEST_MODEL
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from fedllm.cli.app import app as cli_app
from fedllm.config.loading import ConfigError
from fedllm.config.schema import ModelConfig
from fedllm.models.checkpoints import read_artifact, write_artifact
from fedllm.models.dp_record import DP_RECORD_FILE, record_from_report
from fedllm.models.loading import load_base_model, with_lora
from fedllm.privacy.accountant import compute_epsilon
from fedllm.privacy.consensus import ledger_event
from fedllm.privacy.events import GaussianRelease
from fedllm.privacy.node_ledger import NodePrivacyLedger
from fedllm.security.certs import init_credentials
from fedllm.serving.node.app import create_node_app
from fedllm.serving.node.backends import ConstantBackend
from fedllm.serving.node.ballots import CONSENSUS_DISABLED
from fedllm.serving.node.config import NodeServerConfig, load_node_config, validate_node_config
from fedllm.serving.node.generation import ModelBackend
from fedllm.serving.node.server import BackgroundServer, tls_options

TINY = ModelConfig.model_validate({**TINY_TEST_MODEL, "lora": {"r": 2, "alpha": 4.0}})
PROMPT = "Question: a patient reports chest pain. Answer:"
DELTA = 1e-5
# A report's privacy section (report.data["privacy"]) of a DP run: what a published adapter's
# dp-record.json is built from.
DP_PRIVACY = {
    "enabled": True,
    "delta": DELTA,
    "accountant": "pld",
    "unit": "record",
    "neighbouring": "replace-one",
    "hospitals": {
        "north": {"epsilon": 2.5, "epsilon_cap": 4.0, "epsilon_confirmed": True},
        "south": {"epsilon": 3.1, "epsilon_cap": 4.0, "epsilon_confirmed": False},
    },
}


def node_config(**overrides) -> NodeServerConfig:
    return NodeServerConfig.model_validate(
        {
            "node_id": "node-a",
            "hospital_id": "hospital-a",
            "backend": "constant",
            "model": TINY.model_dump(),
            "specialisations": ["cardiology"],
            "consensus": {"insecure_loopback": True},
            **overrides,
        }
    )


def write_adapter(directory: Path, seed: int, *, dp: bool = True) -> str:
    """A peft save_pretrained adapter with random (non-zero) LoRA weights; returns its hash.

    ``dp`` also writes the DP record a published adapter carries (nodes refuse one without).
    """
    torch.manual_seed(seed)
    model = with_lora(load_base_model(TINY, torch.device("cpu")), TINY)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_" in name:
                parameter.copy_(torch.randn_like(parameter))
    model.save_pretrained(directory)
    if dp:
        record_adapter(directory)
    weights = (directory / "adapter_model.safetensors").read_bytes()
    return hashlib.sha256(weights).hexdigest()[:12]


def record_adapter(directory: Path, privacy: dict = DP_PRIVACY, run_id: str = "test-run") -> None:
    """Write the dp-record.json of a DP run for the weights now in ``directory``."""
    weights = read_artifact(directory / "adapter_model.safetensors", keyring=None)
    record = record_from_report(
        run_id=run_id,
        privacy=privacy,
        model=TINY,
        adapter_sha256=hashlib.sha256(weights).hexdigest(),
    )
    write_artifact(directory / DP_RECORD_FILE, record.to_bytes(), keyring=None)


def wait_for(predicate, timeout_s: float = 15.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.05)


@pytest.fixture(scope="module")
def constant_server():
    with BackgroundServer(create_node_app(node_config(), ConstantBackend())) as server:
        yield server


@pytest.fixture(scope="module")
def model_backend():
    backend = ModelBackend(TINY, reload_interval_s=0, device="cpu")
    yield backend
    backend.close()


@pytest.fixture(scope="module")
def model_server(model_backend):
    app = create_node_app(node_config(backend="model"), model_backend)
    with BackgroundServer(app) as server:
        yield server


def test_health_reports_node_and_model(constant_server):
    health = httpx.get(f"{constant_server.url}/v1/health").json()
    assert health == {
        "status": "ok",
        "node_id": "node-a",
        "hospital_id": "hospital-a",
        "model_version": "constant",
        "specialisations": ["cardiology"],
        "in_flight": 0,
        "remaining_epsilon": None,
        "adapter": None,
        "adapter_issue": None,
        "limits": {"max_prompt_chars": 8000, "max_tokens": 256},
        "consensus": None,
    }


def test_inference_with_tiny_model_is_free_post_processing(model_server, model_backend):
    body = {"prompt": PROMPT, "max_tokens": 8, "temperature": 0.0}
    first = httpx.post(f"{model_server.url}/v1/inference", json=body, timeout=30)
    second = httpx.post(f"{model_server.url}/v1/inference", json=body, timeout=30)
    assert first.status_code == 200, first.text
    reply = first.json()
    assert reply["privacy_cost"] == 0.0
    assert "0 ε" in reply["privacy_note"]
    assert reply["node_id"] == "node-a"
    assert reply["model_version"] == "base"
    assert reply["response"], "greedy decoding of 8 tokens produced no text"
    assert second.json()["response"] == reply["response"]  # temperature 0 is deterministic
    expected = model_backend.generate(PROMPT, 8, 0.0).text
    assert reply["response"] == expected


def test_seeded_sampling_is_reproducible(model_backend):
    first = model_backend.generate(PROMPT, 12, 1.5, seed=11)
    again = model_backend.generate(PROMPT, 12, 1.5, seed=11)
    other = model_backend.generate(PROMPT, 12, 1.5, seed=12)
    assert first == again
    assert first.text != other.text


def test_openai_client_completions_and_chat(model_server, model_backend):
    client = openai.OpenAI(base_url=f"{model_server.url}/v1", api_key="x", max_retries=0)
    completion = client.completions.create(
        model="fedllm", prompt=PROMPT, max_tokens=6, temperature=0
    )
    assert completion.choices[0].text == model_backend.generate(PROMPT, 6, 0.0).text
    assert completion.choices[0].finish_reason in {"stop", "length"}
    usage = completion.usage
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens
    assert 1 <= usage.completion_tokens <= 6
    assert completion.system_fingerprint == "base"

    chat = client.chat.completions.create(
        model="fedllm",
        messages=[
            {"role": "system", "content": "You are a clinical assistant."},
            {"role": "user", "content": "Chest pain on exertion?"},
        ],
        max_tokens=5,
        temperature=0,
    )
    assert chat.object == "chat.completion"
    assert chat.choices[0].message.role == "assistant"
    assert isinstance(chat.choices[0].message.content, str)
    assert 1 <= chat.usage.completion_tokens <= 5

    with pytest.raises(openai.BadRequestError, match="n=2"):
        client.completions.create(model="fedllm", prompt=PROMPT, max_tokens=3, n=2)


def test_stop_sequences_cut_the_text(constant_server):
    body = {"model": "m", "prompt": "hi", "max_tokens": 50, "stop": ["reply"]}
    reply = httpx.post(f"{constant_server.url}/v1/completions", json=body).json()
    assert reply["choices"][0] == {
        "index": 0,
        "text": "This is a constant ",
        "finish_reason": "stop",
        "logprobs": None,
    }


@pytest.mark.parametrize(
    ("path", "body", "field"),
    [
        ("/v1/inference", {"prompt": "bad \x00 byte"}, "prompt"),
        ("/v1/inference", {"prompt": "escape \x1b[31m"}, "prompt"),
        ("/v1/inference", {"prompt": "x" * 40_000}, "prompt"),
        ("/v1/inference", {"prompt": "x" * 9_000}, "prompt"),  # over this node's 8000
        ("/v1/inference", {"prompt": ""}, "prompt"),
        ("/v1/inference", {"prompt": "ok", "max_tokens": 0}, "max_tokens"),
        ("/v1/inference", {"prompt": "ok", "max_tokens": 300}, "max_tokens"),  # node limit 256
        ("/v1/inference", {"prompt": "ok", "temperature": 5}, "temperature"),
        ("/v1/inference", {"prompt": "ok", "privacy_budget": -1}, "privacy_budget"),
        ("/v1/inference", {"prompt": "ok", "privacy_budget": 1e9}, "privacy_budget"),
        ("/v1/inference", {"prompt": "ok", "surprise": 1}, "surprise"),
        ("/v1/completions", {"model": "m", "prompt": "a\x07"}, "prompt"),
        ("/v1/completions", {"model": "m", "prompt": "ok", "temperature": -0.5}, "temperature"),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "\x01"}]}, "messages"),
        ("/v1/chat/completions", {"messages": []}, "messages"),
        ("/v1/consensus/candidates", {"prompt": "ok", "k": 0}, "k"),
        ("/v1/consensus/open", {"session_id": "s", "noise_multiplier": 0, "max_tokens": 3}, None),
    ],
)
def test_bad_requests_are_422_with_a_message(constant_server, path, body, field):
    reply = httpx.post(f"{constant_server.url}{path}", json=body)
    assert reply.status_code == 422, reply.text
    detail = reply.json()["detail"]
    assert detail[0]["msg"]
    if field is not None:
        assert field in detail[0]["loc"]
    assert "x" * 100 not in reply.text  # the prompt is not echoed back


def test_allowed_whitespace_and_malformed_json(constant_server):
    ok = httpx.post(f"{constant_server.url}/v1/inference", json={"prompt": "a\n\tb\r\nc"})
    assert ok.status_code == 200
    broken = httpx.post(
        f"{constant_server.url}/v1/inference",
        content=b"{not json",
        headers={"content-type": "application/json"},
    )
    assert broken.status_code == 422


def test_hot_reload_follows_the_adapter_without_restart(tmp_path):
    adapter_dir = tmp_path / "checkpoint"
    version_a = write_adapter(adapter_dir, seed=1)
    backend = ModelBackend(TINY, adapter_dir=adapter_dir, reload_interval_s=0.1, device="cpu")
    app = create_node_app(node_config(backend="model", adapter_dir=str(adapter_dir)), backend)
    body = {"prompt": PROMPT, "max_tokens": 10}
    try:
        with BackgroundServer(app) as server:
            health = httpx.get(f"{server.url}/v1/health").json()
            assert (health["status"], health["model_version"]) == ("ok", version_a)
            assert health["adapter"]["version"] == version_a
            assert health["adapter"]["dp_record"]["run_id"] == "test-run"
            text_a = httpx.post(f"{server.url}/v1/inference", json=body, timeout=30).json()

            version_b = write_adapter(adapter_dir, seed=2)
            wait_for(
                lambda: httpx.get(f"{server.url}/v1/health").json()["model_version"] == version_b
            )
            text_b = httpx.post(f"{server.url}/v1/inference", json=body, timeout=30).json()
            assert text_b["model_version"] == version_b
            assert text_b["response"] != text_a["response"]
            reference = ModelBackend(TINY, adapter_dir=adapter_dir, reload_interval_s=0)
            assert text_b["response"] == reference.generate(PROMPT, 10, 0.0).text

            # A half-written adapter is logged and ignored: the last good one keeps serving.
            weights = adapter_dir / "adapter_model.safetensors"
            weights.write_bytes(weights.read_bytes()[:100])
            assert backend.check_for_update() is False
            time.sleep(0.3)
            after = httpx.post(f"{server.url}/v1/inference", json=body, timeout=30).json()
            assert (after["model_version"], after["response"]) == (version_b, text_b["response"])
    finally:
        backend.close()


def make_misfit(adapter_dir: Path) -> None:
    """Rewrite a valid adapter with one tensor of the wrong shape (e.g. another base model's);
    its DP record is rewritten for the new weights so that the misfit, not the record, is what
    the node refuses."""
    weights = adapter_dir / "adapter_model.safetensors"
    state = load_file(weights)
    name = next(iter(state))
    state[name] = torch.zeros(state[name].shape[0] + 1, state[name].shape[1])
    save_file(state, weights)
    record_adapter(adapter_dir)


def test_missing_or_misfit_adapter_serves_base_model_degraded_until_a_good_one(tmp_path):
    adapter_dir = tmp_path / "not-yet"
    backend = ModelBackend(TINY, adapter_dir=adapter_dir, reload_interval_s=0, device="cpu")
    base_text = backend.generate(PROMPT, 8, 0.0).text
    app = create_node_app(node_config(backend="model", adapter_dir=str(adapter_dir)), backend)
    with BackgroundServer(app) as server:
        health = httpx.get(f"{server.url}/v1/health").json()
        assert (health["status"], health["model_version"]) == ("degraded", "base")

        write_adapter(adapter_dir, seed=6)
        make_misfit(adapter_dir)
        assert backend.check_for_update() is False
        assert backend.generate(PROMPT, 8, 0.0).text == base_text  # model left as it was

        version = write_adapter(adapter_dir, seed=3)
        assert backend.check_for_update() is True
        health = httpx.get(f"{server.url}/v1/health").json()
        assert (health["status"], health["model_version"]) == ("ok", version)
        good_text = backend.generate(PROMPT, 8, 0.0).text

        make_misfit(adapter_dir)  # a misfit replacing a loaded adapter: the loaded one stays
        assert backend.check_for_update() is False
        assert backend.model_version == version
        assert backend.generate(PROMPT, 8, 0.0).text == good_text


def test_candidates_come_from_global_model_and_votes_from_local_adapter(tmp_path):
    write_adapter(tmp_path / "global", seed=4)
    write_adapter(tmp_path / "local", seed=5)
    backend = ModelBackend(
        TINY,
        adapter_dir=tmp_path / "global",
        local_adapter=tmp_path / "local",
        reload_interval_s=0,
        device="cpu",
    )
    global_only = ModelBackend(TINY, adapter_dir=tmp_path / "global", reload_interval_s=0)
    local_only = ModelBackend(TINY, adapter_dir=tmp_path / "local", reload_interval_s=0)
    context = [5, 6]
    assert backend.candidates(PROMPT, context, 8) == global_only.candidates(PROMPT, context, 8)
    candidates = global_only.candidates(PROMPT, context, 8)
    local_choice = local_only.candidates(PROMPT, context, 1024)
    expected = min(range(8), key=lambda i: local_choice.index(candidates[i]))
    assert backend.vote(PROMPT, context, candidates) == expected
    assert backend.generate(PROMPT, 6, 0.0) == global_only.generate(PROMPT, 6, 0.0)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        backend.vote(PROMPT, context, [10**6])


def test_consensus_session_charges_the_ledger_once_and_limits_votes(tmp_path):
    sigma, tokens = 2.0, 4
    one_session = compute_epsilon(
        [GaussianRelease(sigma, count=tokens)], DELTA, "pld", neighbouring="add-remove"
    )
    ledger = NodePrivacyLedger(
        f"sqlite:///{tmp_path / 'ledger.db'}",
        "hospital-a",
        epsilon_cap=1.5 * one_session,
        delta=DELTA,
    )
    app = create_node_app(node_config(), ConstantBackend(vote_index=2), ledger)
    open_body = {
        "session_id": "s1",
        "prompt": PROMPT,
        "noise_multiplier": sigma,
        "max_tokens": tokens,
    }
    vote_body = {"session_id": "s1", "prompt": PROMPT, "token_ids": [], "candidates": [7, 8, 9]}
    with BackgroundServer(app) as server, httpx.Client(base_url=server.url) as client:
        assert client.post("/v1/consensus/vote", json=vote_body).status_code == 404

        opened = client.post("/v1/consensus/open", json=open_body)
        assert opened.status_code == 200, opened.text
        assert opened.json()["charged"] is True
        assert opened.json()["remaining_epsilon"] == pytest.approx(0.5 * one_session)
        assert ledger.events() == [ledger_event(sigma, tokens)]
        assert ledger.history()[0]["run_id"] == "consensus:s1"

        again = client.post("/v1/consensus/open", json=open_body)
        assert again.json()["charged"] is False
        assert ledger.events() == [ledger_event(sigma, tokens)]
        changed = client.post("/v1/consensus/open", json={**open_body, "max_tokens": 9})
        assert changed.status_code == 409

        for _ in range(tokens):
            vote = client.post("/v1/consensus/vote", json=vote_body).json()
            assert vote["node_id"] == "node-a"
            assert len(vote["ballot"]) == 3  # never the raw vote: a noisy one-hot ballot
            assert vote["ballot"] != [0.0, 0.0, 1.0]
        over = client.post("/v1/consensus/vote", json=vote_body)
        assert over.status_code == 409
        assert "ballots" in over.json()["detail"]

        refused = client.post("/v1/consensus/open", json={**open_body, "session_id": "s2"})
        assert refused.status_code == 409
        assert "privacy budget exceeded" in refused.json()["detail"]
        assert ledger.events() == [ledger_event(sigma, tokens)]
        assert client.get("/v1/health").json()["remaining_epsilon"] == pytest.approx(
            0.5 * one_session
        )

        candidates = client.post("/v1/consensus/candidates", json={"prompt": "p", "k": 3})
        assert candidates.json() == {"candidates": [0, 1, 2], "model_version": "constant"}
        decoded = client.post("/v1/consensus/decode", json={"token_ids": [4, 5]}).json()
        assert decoded == {"text": "t4 t5", "eos_token_id": ConstantBackend().eos_token_id}


def test_consensus_without_ledger_is_503(constant_server):
    body = {"session_id": "s", "prompt": "p", "noise_multiplier": 1.0, "max_tokens": 3}
    reply = httpx.post(f"{constant_server.url}/v1/consensus/open", json=body)
    assert reply.status_code == 503
    assert reply.json()["detail"] == CONSENSUS_DISABLED


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    """The consortium's own credentials: CA, hospital h1's server cert, the router's client cert."""
    credentials = init_credentials(tmp_path_factory.mktemp("pki") / "credentials", hospitals=["h1"])
    return (
        credentials.ca_cert,
        credentials.node_server_certs["h1"],
        (credentials.router_client_cert, credentials.router_client_key),
    )


def test_tls_and_mutual_tls(pki):
    ca_file, (server_cert, server_key), (client_cert, client_key) = pki
    tls = {"cert_file": str(server_cert), "key_file": str(server_key)}
    config = node_config(tls=tls)
    with BackgroundServer(create_node_app(config, ConstantBackend()), **tls_options(config)) as s:
        assert s.url.startswith("https://")
        trust = ssl.create_default_context(cafile=str(ca_file))
        assert httpx.get(f"{s.url}/v1/health", verify=trust).json()["status"] == "ok"
        with pytest.raises(httpx.ConnectError):
            httpx.get(f"{s.url}/v1/health")  # the test CA is not in the system trust store

    config = node_config(tls={**tls, "client_ca_file": str(ca_file)})
    with BackgroundServer(create_node_app(config, ConstantBackend()), **tls_options(config)) as s:
        with pytest.raises((httpx.ConnectError, httpx.ReadError, httpx.RemoteProtocolError)):
            httpx.get(f"{s.url}/v1/health", verify=ssl.create_default_context(cafile=str(ca_file)))
        with_cert = ssl.create_default_context(cafile=str(ca_file))
        with_cert.load_cert_chain(str(client_cert), str(client_key))
        assert httpx.get(f"{s.url}/v1/health", verify=with_cert).status_code == 200


def test_node_config_errors_name_key_and_value(tmp_path):
    with pytest.raises(ConfigError, match=r"backend: got 'gpu'"):
        validate_node_config({"node_id": "n", "hospital_id": "h", "backend": "gpu"})
    with pytest.raises(ConfigError, match=r"prot: unknown key"):
        validate_node_config({"node_id": "n", "hospital_id": "h", "prot": 1})
    with pytest.raises(ConfigError, match=r"file not found"):
        validate_node_config(
            {"node_id": "n", "hospital_id": "h", "tls": {"cert_file": "a", "key_file": "b"}}
        )


def test_shipped_node_config_serves_consensus_only_behind_mutual_tls(tmp_path, monkeypatch):
    """configs/node.yaml after the README's `fedllm certs init ... --hospital st-mary`."""
    monkeypatch.chdir(tmp_path)
    init_credentials(Path("credentials"), hospitals=["st-mary"])
    example = load_node_config(Path(__file__).parents[1] / "configs" / "node.yaml")
    assert example.adapter_dir == Path("runs/published-adapter")
    assert example.ledger is not None
    assert example.authenticates_clients
    assert not example.consensus.insecure_loopback


def test_serve_cli_rejects_bad_config_in_one_line(tmp_path):
    bad = tmp_path / "node.yaml"
    bad.write_text("node_id: n\nhospital_id: h\nport: 99999\n")
    result = CliRunner().invoke(cli_app, ["serve", "--config", str(bad)])
    assert result.exit_code == 2
    assert "port: got 99999" in result.output
    assert "Traceback" not in result.output


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


SERVE_NODE = (
    "import sys\n"
    "from fedllm.serving.node.config import load_node_config\n"
    "from fedllm.serving.node.server import build_node_app, serve_node\n"
    "from fedllm.security.environment import keyring_from_environment\n"
    "config = load_node_config(sys.argv[1])\n"
    "serve_node(config, build_node_app(config, keyring=keyring_from_environment()))\n"
)


def test_serve_node_serves_a_config_until_stopped(tmp_path, pki):
    """`fedllm serve` minus the CLI import (which loads every command: slow): TLS from node.yaml."""
    ca_file, (server_cert, server_key), _ = pki
    port = _free_port()
    config = tmp_path / "node.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "node_id": "served",
                "hospital_id": "h",
                "backend": "constant",
                "port": port,
                "tls": {"cert_file": str(server_cert), "key_file": str(server_key)},
            }
        )
    )
    process = subprocess.Popen(
        [sys.executable, "-c", SERVE_NODE, str(config)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=dict(os.environ, FEDLLM_LOG_JSON="1"),
    )
    trust = ssl.create_default_context(cafile=str(ca_file))
    url = f"https://127.0.0.1:{port}/v1/health"
    try:

        def healthy() -> bool:
            assert process.poll() is None, process.stdout.read()
            try:
                return httpx.get(url, verify=trust).status_code == 200
            except httpx.TransportError:
                return False

        wait_for(healthy, timeout_s=60)
        assert httpx.get(url, verify=trust).json()["node_id"] == "served"
    finally:
        process.terminate()
        process.communicate(timeout=20)
    assert process.returncode in {0, -signal.SIGTERM}  # uvicorn re-raises SIGTERM after shutdown


def test_sessions_expire_and_in_flight_is_reported(tmp_path):
    ledger = NodePrivacyLedger(
        f"sqlite:///{tmp_path / 'ledger.db'}", "hospital-a", epsilon_cap=50.0, delta=DELTA
    )
    config = node_config(session_ttl_s=0.3)
    app = create_node_app(config, ConstantBackend(latency_s=0.6), ledger)
    open_body = {"session_id": "short", "prompt": "p", "noise_multiplier": 5.0, "max_tokens": 2}
    vote_body = {"session_id": "short", "prompt": "p", "candidates": [1, 2]}
    with BackgroundServer(app) as server, httpx.Client(base_url=server.url) as client:
        assert client.post("/v1/consensus/open", json=open_body).json()["charged"] is True
        time.sleep(0.4)
        assert client.post("/v1/consensus/vote", json=vote_body).status_code == 404
        # Re-opening an expired session is a new session: charged again (never under-counted).
        assert client.post("/v1/consensus/open", json=open_body).json()["charged"] is True
        assert len(ledger.events()) == 2

        with ThreadPoolExecutor(1) as pool:
            pending = pool.submit(client.post, "/v1/inference", json={"prompt": "p"})
            wait_for(lambda: client.get("/v1/health").json()["in_flight"] == 1, timeout_s=5)
            assert pending.result().status_code == 200
        assert client.get("/v1/health").json()["in_flight"] == 0
