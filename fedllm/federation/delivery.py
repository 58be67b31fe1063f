"""Delivering a run's published DP adapter to every hospital's inference server, through Flower.

The published adapter is written on the SuperLink's host, under the researcher's run
directory; the hospitals' inference servers hot-reload theirs from a directory at the hospital.
At the end of a run that published, the ServerApp sends one last message
(``query.deliver``) to every connected hospital carrying the adapter's files (plaintext: the
channel is Flower's TLS), its DP record and the server's base-model hash. The hospital checks
them itself before writing anything, because it is about to serve these weights as a 0 ε
answer to its own users: the DP record must be valid and say DP was on, the weights must be the
ones the record describes (their SHA-256), and the record's base model must be the one this
hospital holds. It then writes the directory as the server wrote it (staged, sidecar first,
one rename per file; encrypted with the hospital's own key ring when it has one), where its
inference server's hot reload picks it up.

The reply is an acknowledgement only: the hospital's name (public) and the adapter hash the
server sent, echoed. Both are in the release inventory.

The same message delivers a finished run's adapter again on demand (``fedllm deliver``): a
Flower run whose run config carries ``deliver-request`` trains nothing and sends only this
message, for the adapter the run directory's report says it published
(`published_adapter`), and records the outcome in ``deliveries/<request>.json`` there.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import structlog
from flwr.app import ConfigRecord, Message, MessageType, RecordDict

from fedllm.models.checkpoints import read_adapter_files, write_adapter_files
from fedllm.models.dp_record import DP_RECORD_FILE, DPRecord, parse_dp_record
from fedllm.report.run_report import REPORT_FILE, read_report_json, write_json_atomically
from fedllm.security.encryption import EncryptionError, KeyRingSource

log = structlog.get_logger(__name__)

DELIVER_ACTION = "deliver"
DELIVER_MESSAGE = f"{MessageType.QUERY}.{DELIVER_ACTION}"
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
DELIVERED_FILES = (ADAPTER_CONFIG, ADAPTER_WEIGHTS, DP_RECORD_FILE)
ADAPTER_RECORD = "adapter"
ACK_RECORD = "delivery"
# run config key of a delivery-only Flower run: the request's id, which names its record
DELIVER_REQUEST = "deliver-request"
DELIVERIES_DIR = "deliveries"


class DeliveryRefusedError(ValueError):
    """A hospital refuses a delivered adapter (invalid DP record, other weights, other model)."""


class NothingToDeliverError(ValueError):
    """A run directory holds no published DP adapter of its own to deliver (one line)."""


@dataclass
class DeliveryOutcome:
    """Which hospitals installed the adapter, which run no inference server (``skipped``:
    training-only or simulated hospitals), and why the others did not (one line each)."""

    adapter_sha256: str
    delivered: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    refused: list[str] = field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        """The report's ``adapter_delivery`` section."""
        return {
            "adapter_sha256": self.adapter_sha256,
            "delivered": sorted(self.delivered),
            "skipped": sorted(self.skipped),
            "refused": sorted(self.refused),
        }


def delivery_content(
    directory: Path, run_context: Mapping[str, str], *, keyring: KeyRingSource | None
) -> RecordDict:
    """The message content delivering the published adapter in ``directory``.

    ``run_context`` is what every message of the run carries (run dir and id, base-model hash);
    ``keyring`` decrypts the published files (the ServerApp's key ring source).
    """
    files = read_adapter_files(directory, DELIVERED_FILES, keyring=keyring)
    return RecordDict(
        {
            "config": ConfigRecord(dict(run_context)),
            ADAPTER_RECORD: ConfigRecord(dict(files)),
        }
    )


def deliver_adapter(
    grid: Any,
    directory: Path,
    run_context: Mapping[str, str],
    timeout: float | None,
    *,
    keyring: KeyRingSource | None,
) -> DeliveryOutcome:
    """Send the published adapter to every connected hospital and collect their answers.

    A refusal or an unreachable hospital is logged and listed, never a failed run: the run and
    its published adapter are complete, and delivery can be repeated (see docs/deploy.md).
    """
    content = delivery_content(directory, run_context, keyring=keyring)
    digest = hashlib.sha256(content[ADAPTER_RECORD][ADAPTER_WEIGHTS]).hexdigest()
    messages = [
        Message(content.copy(), dst_node_id=node_id, message_type=DELIVER_MESSAGE)
        for node_id in grid.get_node_ids()
    ]
    outcome = DeliveryOutcome(adapter_sha256=digest)
    for reply in grid.send_and_receive(messages, timeout=timeout):
        if reply.has_error():
            outcome.refused.append(reply.error.reason)
            continue
        ack = reply.content[ACK_RECORD]
        if ack.get("adapter-sha256") == "":
            outcome.skipped.append(str(ack["hospital"]))
            continue
        if ack.get("adapter-sha256") != digest:
            outcome.refused.append(f"hospital {ack.get('hospital')}: acknowledged other weights")
            continue
        outcome.delivered.append(str(ack["hospital"]))
    answered = len(outcome.delivered) + len(outcome.skipped) + len(outcome.refused)
    if answered < len(messages):
        outcome.refused.append(f"{len(messages) - answered} hospital(s) did not answer in time")
    if outcome.refused:
        log.warning("adapter.delivery_incomplete", **outcome.summary())
    else:
        log.info("adapter.delivered", **outcome.summary())
    return outcome


def published_adapter(run_dir: Path, *, keyring: KeyRingSource | None) -> Path:
    """The directory of the DP adapter that the run in ``run_dir`` published, checked.

    Checked before any hospital is contacted: the report must name a published adapter, its
    DP record must be this run's (a later run publishing to the same directory replaces it)
    and must vouch for the weights beside it. Raises `NothingToDeliverError` (one line).
    """
    if not (run_dir / REPORT_FILE).is_file():
        raise NothingToDeliverError(f"{run_dir} has no {REPORT_FILE}: not a run directory")
    try:
        report = read_report_json(run_dir)
    except (OSError, ValueError) as error:
        first_line = (str(error).strip().splitlines() or [""])[0]
        raise NothingToDeliverError(
            f"{run_dir}: its {REPORT_FILE} cannot be read: {first_line}"
        ) from None
    published = report.get("published_adapter") if isinstance(report, dict) else None
    if not published:
        raise NothingToDeliverError(
            f"{run_dir}: the run published no DP adapter (run.publish_adapter_dir unset, DP "
            "off, or the run failed)"
        )
    directory = Path(str(published))
    try:
        files = read_adapter_files(directory, DELIVERED_FILES, keyring=keyring)
        record = parse_dp_record(files[DP_RECORD_FILE])
    except (OSError, ValueError, EncryptionError) as error:
        first_line = (str(error).strip().splitlines() or [""])[0]
        raise NothingToDeliverError(
            f"{run_dir}: its published adapter {directory} cannot be read: {first_line}"
        ) from None
    if record.run_id != run_dir.name:
        raise NothingToDeliverError(
            f"{run_dir}: {directory} now holds the adapter of run {record.run_id!r}, which "
            "published over it; deliver that run instead"
        )
    reason = record.refusal(hashlib.sha256(files[ADAPTER_WEIGHTS]).hexdigest())
    if reason is not None:
        raise NothingToDeliverError(f"{run_dir}: {reason}")
    return directory


def delivery_record_path(run_dir: Path, request: str) -> Path:
    """Where the outcome of the on-demand delivery ``request`` is recorded."""
    if not request.isalnum():
        raise ValueError(f"{DELIVER_REQUEST}: got {request!r}; expected letters and digits")
    return run_dir / DELIVERIES_DIR / f"{request}.json"


def record_delivery(run_dir: Path, request: str, outcome: DeliveryOutcome) -> Path:
    """Write the outcome of an on-demand delivery beside the run's report; its path."""
    path = delivery_record_path(run_dir, request)
    path.parent.mkdir(exist_ok=True)
    write_json_atomically(path, {"request": request, **outcome.summary()})
    return path


def read_delivery(run_dir: Path, request: str) -> dict[str, Any] | None:
    """The recorded outcome of ``request``, or None when none was recorded."""
    path = delivery_record_path(run_dir, request)
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None


def verify_delivery(files: Mapping[str, bytes], own_base_sha256: str) -> DPRecord:
    """The delivered adapter's DP record, once it makes these exact files servable here.

    Raises `DeliveryRefusedError` (one line) when a file is missing, the record is invalid or
    says DP was off, the weights are not the ones it describes, or it was trained on another
    base model than this hospital's.
    """
    missing = [name for name in DELIVERED_FILES if name not in files]
    if missing:
        raise DeliveryRefusedError(f"the delivered adapter lacks {', '.join(missing)}")
    try:
        record = parse_dp_record(files[DP_RECORD_FILE])
    except ValueError as error:
        raise DeliveryRefusedError(str(error).splitlines()[0]) from None
    digest = hashlib.sha256(files[ADAPTER_WEIGHTS]).hexdigest()
    reason = record.refusal(digest) or record.base_model_refusal(own_base_sha256)
    if reason is not None:
        raise DeliveryRefusedError(f"refused the delivered adapter: {reason}")
    return record


def install_delivery(
    adapter: ConfigRecord,
    adapter_dir: Path,
    own_base_sha256: str,
    *,
    keyring: KeyRingSource | None,
) -> str:
    """Verify a delivered adapter and write it into ``adapter_dir``; returns its weights' hash.

    Nothing is written unless every check passes (`verify_delivery`). With a ``keyring`` (the
    hospital's own, from its ClientApp) the files are encrypted at rest, as its inference
    server expects.
    """
    files = {name: bytes(adapter[name]) for name in DELIVERED_FILES if name in adapter}
    record = verify_delivery(files, own_base_sha256)
    write_adapter_files(adapter_dir, files, sidecars=(DP_RECORD_FILE,), keyring=keyring)
    log.info(
        "adapter.installed",
        path=str(adapter_dir),
        run_id=record.run_id,
        adapter_sha256=record.adapter_sha256,
    )
    return record.adapter_sha256
