"""``dp-record.json``: the privacy guarantee a published global adapter was trained under.

Inference servers answer from the global adapter as post-processing of a DP release ("0 ε").
That claim is only true for an adapter that was trained with DP, so every published adapter
directory carries this record and a node serves no adapter without one (unless its operator
explicitly allows non-DP adapters). The record is built from the run's report (the same numbers
``report.json`` shows), bound to the exact weights it describes by their SHA-256, and read back
by the node before it swaps an adapter in. Writer (the federation server) and reader (the
inference server) both go through this module, so the format has one definition.

Pure pydantic, no torch: it is cheap to import from anywhere.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from fedllm.config.schema import ModelConfig
from fedllm.models.identity import resolve_base_model

DP_RECORD_FILE = "dp-record.json"
RECORD_FORMAT = "fedllm-dp-record"
RECORD_VERSION = 1

Neighbouring = Literal["replace-one", "add-remove"]


class DPRecordError(ValueError):
    """A DP record is missing, malformed, or does not make its adapter servable."""


class _Strict(BaseModel):
    """No coercion, no unknown keys, immutable: a record is evidence, not a suggestion."""

    model_config = ConfigDict(strict=True, extra="forbid", frozen=True)


class HospitalGuarantee(_Strict):
    """One hospital's cumulative ε as the run's report states it."""

    epsilon: float | None = Field(ge=0.0, allow_inf_nan=False)
    epsilon_cap: float | None = Field(ge=0.0, allow_inf_nan=False)
    epsilon_confirmed: bool


class DPRecord(_Strict):
    """What a published adapter's DP guarantee is, and which weights and base model it covers.

    ``neighbouring`` is ``None`` when the run's report did not state the neighbouring relation
    (reports from before it was recorded); the record is still valid, but the guarantee is then
    only as precise as ``unit``. ``epsilon_confirmed`` false means the hospital's last round was
    lost or failed and ``epsilon`` is its own projection, an upper bound.
    """

    format: Literal["fedllm-dp-record"] = RECORD_FORMAT
    record_version: Literal[1] = RECORD_VERSION
    run_id: str = Field(min_length=1, max_length=512)
    created_at: str = Field(min_length=1)
    adapter_sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    privacy_enabled: bool
    delta: float | None = Field(gt=0.0, lt=1.0)
    accountant: Literal["pld", "rdp", "prv"] | None
    unit: Literal["record", "patient"]
    neighbouring: Neighbouring | None
    hospitals: dict[str, HospitalGuarantee]
    base_model: dict[str, Any]

    @model_validator(mode="after")
    def _dp_fields_present(self) -> DPRecord:
        if self.privacy_enabled and (self.delta is None or self.accountant is None):
            raise ValueError("a record with privacy_enabled needs delta and accountant")
        return self

    def refusal(self, adapter_sha256: str) -> str | None:
        """Why this record does not make the adapter with ``adapter_sha256`` servable, or None.

        The hash check matters because the record and the weights are separate files: a record
        left behind by an earlier DP run must not vouch for whatever weights now sit next to it.
        """
        if not self.privacy_enabled:
            return f"the DP record of run {self.run_id!r} says privacy was disabled"
        if self.adapter_sha256 != adapter_sha256:
            return (
                f"the DP record of run {self.run_id!r} describes other weights "
                f"({self.adapter_sha256[:12]}, found {adapter_sha256[:12]})"
            )
        return None

    def base_model_refusal(self, loaded_sha256: str) -> str | None:
        """Why this adapter must not be applied to the base model hashed ``loaded_sha256``.

        An adapter trained on other base weights (or another tokenizer) loads without error
        and answers nonsense; only the content hash tells them apart, never the name.
        """
        recorded = self.base_model.get("sha256")
        if not isinstance(recorded, str):
            return (
                f"the DP record of run {self.run_id!r} names no base-model hash "
                "(published before base models were hashed); republish it from a current run"
            )
        if recorded != loaded_sha256:
            return (
                f"it was trained on base model {recorded[:12]} "
                f"({self.base_model.get('name')!r}), this server loaded {loaded_sha256[:12]}"
            )
        return None

    def summary(self) -> dict[str, Any]:
        """The guarantee in brief, for health endpoints and log lines."""
        epsilons = [h.epsilon for h in self.hospitals.values() if h.epsilon is not None]
        return {
            "run_id": self.run_id,
            "epsilon": {name: h.epsilon for name, h in self.hospitals.items()},
            "max_epsilon": max(epsilons) if epsilons else None,
            "epsilon_confirmed": all(h.epsilon_confirmed for h in self.hospitals.values()),
            "delta": self.delta,
            "accountant": self.accountant,
            "unit": self.unit,
            "neighbouring": self.neighbouring,
        }

    def to_bytes(self) -> bytes:
        """UTF-8 JSON, indented so an operator can read it (when it is not encrypted)."""
        return (json.dumps(self.model_dump(mode="json"), indent=2) + "\n").encode("utf-8")


def base_model_identity(model: ModelConfig) -> dict[str, Any]:
    """What identifies the base model an adapter was trained on: name, revision, content hash.

    The hash (of weights, config and tokenizer files; see fedllm.models.identity) is what an
    inference server compares with the base model it loaded: a name does not fix the weights.
    Resolving the model verifies its files against their recorded hash (and builds the tiny
    model if absent), so the record never vouches for a model that changed on disk.
    """
    return resolve_base_model(model).record()


def publication_refusal(privacy: Mapping[str, Any]) -> str | None:
    """Why a run with this report ``privacy`` section must not publish its adapter, or None.

    Only DP-trained adapters are published: servers answer from the published adapter as a
    0 ε post-processing of a DP release, which a non-DP adapter is not.
    """
    if not privacy.get("enabled"):
        return "privacy is disabled for this run (privacy.enabled: false): not a DP adapter"
    return None


def record_from_report(
    *,
    run_id: str,
    privacy: Mapping[str, Any],
    model: ModelConfig,
    adapter_sha256: str,
) -> DPRecord:
    """The record of a DP run from its report's ``privacy`` section (``report.data["privacy"]``).

    ``model`` is the run's base model; the record carries its content hash.

    ε is taken as reported, with ``epsilon_confirmed`` per hospital. Raises `DPRecordError` when
    privacy is disabled (such an adapter is never published) or the section is malformed.
    """
    refusal = publication_refusal(privacy)
    if refusal is not None:
        raise DPRecordError(refusal)
    raw = {
        "run_id": run_id,
        "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "adapter_sha256": adapter_sha256,
        "privacy_enabled": True,
        "delta": _float_or_none(privacy.get("delta")),
        "accountant": privacy.get("accountant"),
        "unit": privacy.get("unit"),
        "neighbouring": privacy.get("neighbouring"),
        "hospitals": {
            str(name): {
                "epsilon": _float_or_none(state.get("epsilon")),
                "epsilon_cap": _float_or_none(state.get("epsilon_cap")),
                # unknown is not confirmed: never claim more than the report says
                "epsilon_confirmed": state.get("epsilon_confirmed", False),
            }
            for name, state in (privacy.get("hospitals") or {}).items()
        },
        "base_model": base_model_identity(model),
    }
    try:
        return DPRecord.model_validate(raw)
    except ValidationError as error:
        raise DPRecordError(
            f"cannot build a DP record from the report: {_reasons(error)}"
        ) from None


def parse_dp_record(data: bytes) -> DPRecord:
    """Parse and validate a record file's bytes; `DPRecordError` names what is wrong."""
    try:
        return DPRecord.model_validate_json(data)
    except ValidationError as error:
        raise DPRecordError(f"invalid DP record: {_reasons(error)}") from None


def _float_or_none(value: Any) -> float | None:
    """Report numbers may be JSON ints (``1`` for ``1.0``); bools are not numbers here."""
    if isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    return value


def _reasons(error: ValidationError) -> str:
    return "; ".join(
        f"{'.'.join(str(p) for p in item['loc']) or 'record'}: {item['msg']}"
        for item in error.errors()
    )
