"""What hospital IT sees with ``fedllm hospital status``: budget, history, model, served adapter.

Everything comes from the hospital's own files, as its processes read them: the privacy
ledger (ε spent and left under the hospital's cap, every charged event), the base model's
content hash (what the federation checks with every message), and the DP record of the
adapter in the inference server's adapter directory (which run's adapter is served, its hash,
its guarantee). No sqlite3, no router certificate, no running server is needed; the ledger is
read at the δ it was opened with, and a missing ledger means nothing was spent yet. Both the
ledger and the adapter are read with the key ring source the CLI hands in, as the hospital's
processes read them.
"""

from __future__ import annotations

import hashlib
import math
from typing import Any

from fedllm.federation.hospital_config import HospitalConfig
from fedllm.security.encryption import KeyRingSource
from fedllm.storage.database import sqlite_path


def hospital_status(config: HospitalConfig, *, keyring: KeyRingSource | None) -> dict[str, Any]:
    """The hospital's status as one JSON-able mapping (``fedllm hospital status --json``)."""
    model = base_model_status(config)
    return {
        "hospital": config.hospital,
        "privacy": ledger_status(config, keyring=keyring),
        "base_model": model,
        "adapter": adapter_status(config, model.get("sha256") if model else None, keyring=keyring),
    }


def ledger_status(config: HospitalConfig, *, keyring: KeyRingSource | None) -> dict[str, Any]:
    """ε spent and remaining under ``privacy.epsilon_cap``, and every charged event in order."""
    from fedllm.privacy.node_ledger import NodePrivacyLedger, recorded_delta

    url = config.privacy.ledger_url
    cap = config.privacy.epsilon_cap
    status: dict[str, Any] = {
        "ledger_url": url,
        "epsilon_cap": cap,
        "delta": None,
        "spent_epsilon": 0.0,
        "remaining_epsilon": cap,
        "events": [],
    }
    path = sqlite_path(url)
    if path is not None and not path.is_file():
        return status  # opened by the first run; reading must not create it
    delta = recorded_delta(url, config.hospital)
    if delta is None:
        return status
    # the cap is policy and only matters for charging; reading needs the recorded δ
    ledger = NodePrivacyLedger(
        url,
        config.hospital,
        epsilon_cap=cap if cap is not None else math.inf,
        delta=delta,
        keyring=keyring,
    )
    spent = ledger.spent_epsilon()
    status |= {
        "delta": delta,
        "spent_epsilon": spent,
        "remaining_epsilon": None if cap is None else max(cap - spent, 0.0),
        "events": ledger.history(),
    }
    return status


def base_model_status(config: HospitalConfig) -> dict[str, Any] | None:
    """The inference server's base model (name, revision, content hash), verified on disk."""
    from fedllm.models.loading import ModelLoadError, base_model

    if config.inference is None:
        return None
    try:
        return base_model(config.inference.model).record()
    except ModelLoadError as error:
        return {"name": config.inference.model.name, "error": str(error).splitlines()[0]}


def adapter_status(
    config: HospitalConfig, base_sha256: str | None, *, keyring: KeyRingSource | None
) -> dict[str, Any] | None:
    """The adapter in ``inference.adapter_dir``: its version, run and DP guarantee, checked.

    ``version`` is what the inference server reports as ``model_version`` (the weights' hash,
    first 12 hex digits); ``refusal`` says why the server would not serve it (its record does
    not describe these weights, or was trained on another base model than ``base_sha256``),
    else None.
    """
    from fedllm.federation.delivery import ADAPTER_WEIGHTS
    from fedllm.models.checkpoints import read_artifact
    from fedllm.models.dp_record import DP_RECORD_FILE, parse_dp_record
    from fedllm.security.encryption import EncryptionError

    if config.inference is None or config.inference.adapter_dir is None:
        return None
    directory = config.inference.adapter_dir
    status: dict[str, Any] = {"adapter_dir": str(directory)}
    weights, record_file = directory / ADAPTER_WEIGHTS, directory / DP_RECORD_FILE
    if not weights.is_file() or not record_file.is_file():
        return status | {"version": None, "refusal": "no published adapter there yet"}
    try:
        digest = hashlib.sha256(read_artifact(weights, keyring=keyring)).hexdigest()
        record = parse_dp_record(read_artifact(record_file, keyring=keyring))
    except (OSError, ValueError, EncryptionError) as error:
        return status | {"version": None, "refusal": str(error).splitlines()[0]}
    return status | {
        "version": digest[:12],
        "adapter_sha256": digest,
        "run_id": record.run_id,
        "created_at": record.created_at,
        "base_model_sha256": record.base_model.get("sha256"),
        "dp": record.summary(),
        "refusal": record.refusal(digest)
        or (record.base_model_refusal(base_sha256) if base_sha256 else None),
    }
