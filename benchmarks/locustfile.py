"""Load test of the router with locust (optional: ``pip install fedllm[bench]``).

Each simulated clinician logs in once, then posts plain /v1/inference requests. Run against a
router started with ``fedllm router --config ...`` (users created with ``fedllm users add``):

    FEDLLM_USER=bench FEDLLM_PASSWORD=... locust -f benchmarks/locustfile.py \\
        --host https://127.0.0.1:8443 --users 50 --spawn-rate 10 --run-time 1m --headless

All simulated users share that one account, so the router's per-user rate limit
(``rate_limit`` in router.yaml, 20 req/s by default) answers the excess with 429: raise it for
a load test of the router itself.

``FEDLLM_CA`` names the CA file that verifies the router's certificate (default: system CAs);
``FEDLLM_CONSENSUS_SHARE`` (0..1, default 0) sends that share of requests as consensus
answers, which spend the user's ε quota.
"""

from __future__ import annotations

import itertools
import os
import random

from locust import HttpUser, between, task

PROMPTS = itertools.cycle(
    [
        "Summarise the discharge note for a patient with chest pain.",
        "What follow-up is usual after a transient ischaemic attack?",
        "List red flags in a headache history.",
    ]
)


class Clinician(HttpUser):
    """Logs in, then asks questions."""

    wait_time = between(0.0, 0.1)

    def on_start(self) -> None:
        ca = os.environ.get("FEDLLM_CA")
        if ca:
            self.client.verify = ca
        response = self.client.post(
            "/v1/auth/token",
            json={
                "username": os.environ.get("FEDLLM_USER", "bench"),
                "password": os.environ["FEDLLM_PASSWORD"],
            },
            name="/v1/auth/token",
        )
        response.raise_for_status()
        token = response.json()["access_token"]
        self.client.headers["Authorization"] = f"Bearer {token}"
        self.consensus_share = float(os.environ.get("FEDLLM_CONSENSUS_SHARE", "0"))

    @task
    def inference(self) -> None:
        consensus = random.random() < self.consensus_share
        self.client.post(
            "/v1/inference",
            json={"prompt": next(PROMPTS), "max_tokens": 16, "require_consensus": consensus},
            name="/v1/inference (consensus)" if consensus else "/v1/inference",
        )
