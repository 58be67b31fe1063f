"""A hospital node's work, independent of Flower: train a round under DP, evaluate, report status.

The Flower ClientApp is a thin adapter over this class, so the privacy-critical sequence
(check the cap, charge the ledger, then train) is tested without a federation. The ledger is
charged *before* training: once noisy steps have run, their privacy cost is spent even if the
process dies before the update leaves the hospital.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any

import structlog
import torch

from fedllm.config.schema import ExperimentConfig
from fedllm.data import SPECIALTIES, ClinicalRecord
from fedllm.federation.hospital_data import LocalDataSource, hospital_data, training_texts
from fedllm.models.adapters import AdapterState, adapter_state, load_adapter_state
from fedllm.models.loading import load_lora_model, load_tokenizer
from fedllm.privacy.events import event_to_dict
from fedllm.privacy.node_ledger import NodePrivacyLedger
from fedllm.privacy.plan import HospitalPrivacyPlan, plan_hospital
from fedllm.privacy.releases import release_counts, release_scalar
from fedllm.training.evaluation import EvaluationResult, evaluate
from fedllm.training.local import DpSgdSettings, train_locally
from fedllm.training.sequences import encode_texts
from fedllm.training.statistics import clipped_square_loss_sum

PROFILE_BINS = (*SPECIALTIES, "unknown")

log = structlog.get_logger(__name__)


def pick_device(preference: str) -> torch.device:
    """``auto`` is CUDA when present, else CPU; asking for CUDA without one is an error."""
    if preference == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("training.device is 'cuda' but no CUDA device is available")
    if preference == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(preference)


def specialty_counts(records: list[ClinicalRecord], unit: str) -> dict[str, int]:
    """Training units per specialty; a patient counts once (first record's specialty).

    Counting each unit once keeps the histogram's sensitivity at 1 for either privacy unit.
    """
    counts = dict.fromkeys(PROFILE_BINS, 0)
    seen: set[str] = set()
    for record in records:
        if unit == "patient":
            if record.patient_id in seen:
                continue
            seen.add(record.patient_id)
        counts[record.specialty if record.specialty in counts else "unknown"] += 1
    return counts


def stable_seed(*parts: object) -> int:
    """A seed that is the same in every process (unlike ``hash``, which is salted per process)."""
    digest = hashlib.sha256("/".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:4], "big")


@dataclass(frozen=True)
class RoundOutcome:
    """A trained adapter and the metrics that travel back to the server with it."""

    adapter: AdapterState
    events: list[dict[str, Any]]
    metrics: dict[str, float | int]


class HospitalSite:
    """One hospital: its data, its copy of the model and its persistent privacy ledger.

    ``local_data`` is a deployed hospital's own records file; without it the records come
    from the experiment config (simulation).
    """

    def __init__(
        self,
        config: ExperimentConfig,
        index: int,
        ledger_url: str,
        epsilon_cap: float | None = None,
        local_data: LocalDataSource | None = None,
    ) -> None:
        self.config = config
        self.index = index
        self.profile = config.federation.profiles()[index]
        self.device = pick_device(config.training.device)
        data = hospital_data(config, index, local_data)
        tokenizer = load_tokenizer(config.model, config.run.seed)
        length = config.model.max_seq_length
        self.train_data = encode_texts(
            tokenizer, training_texts(data.train, config.privacy.unit), length
        )
        eval_texts = [r.text for r in data.eval][: config.evaluation.max_eval_sequences]
        self.eval_data = encode_texts(tokenizer, eval_texts, length)
        self.specialty_counts = specialty_counts(data.train, config.privacy.unit)
        self.model = load_lora_model(config.model, self.device, config.run.seed)
        self.plan: HospitalPrivacyPlan | None = None
        self.ledger: NodePrivacyLedger | None = None
        if config.privacy.enabled:
            cap = epsilon_cap if epsilon_cap is not None else self.profile.epsilon_cap
            self.plan = plan_hospital(config, self.profile.name, len(self.train_data), cap)
            self.ledger = NodePrivacyLedger(
                ledger_url,
                self.profile.name,
                epsilon_cap=self.plan.epsilon_cap,
                delta=config.privacy.delta,
                accountant=config.privacy.accountant,
            )

    @property
    def name(self) -> str:
        return self.profile.name

    def status(self) -> dict[str, Any]:
        """What the server needs to decide eligibility: spent ε and the next round's ε."""
        status: dict[str, Any] = {
            "hospital": self.name,
            "hospital-index": self.index,
            "num-units": len(self.train_data),
            "speed": self.profile.speed,
        }
        if self.plan is not None and self.ledger is not None:
            status |= {
                "epsilon": self.ledger.spent_epsilon(),
                "epsilon-next": self.ledger.projected_epsilon(self.plan.round_events()),
                "epsilon-cap": self.plan.epsilon_cap,
                "can-afford": int(self.ledger.can_afford(self.plan.round_events())),
                # what a round will charge, so the server can mirror it if the reply is lost
                "round-events": json.dumps(
                    [event_to_dict(event) for event in self.plan.round_events()]
                ),
            }
        return status

    def release_profile(self, run_id: str) -> list[float] | None:
        """The noised specialty counts (bins ``PROFILE_BINS``), released and charged once per run.

        Returns None when the plan releases no profile, the cap cannot afford it, or it was
        already released in this run (by this or another process serving this hospital: the
        ledger is the record, and the server keeps the profile it was sent).
        """
        if self.plan is None or self.ledger is None:
            return [float(self.specialty_counts[b]) for b in PROFILE_BINS]
        release = self.plan.profile_release
        already = any(
            row["run_id"] == run_id and row["round_id"] == 0 for row in self.ledger.history()
        )
        if release is None or already or not self.ledger.can_afford(self.plan.one_off_events()):
            return None
        self.ledger.charge(self.plan.one_off_events(), round_id=0, run_id=run_id)
        noised = release_counts(self.specialty_counts, release.noise_multiplier)
        return [noised[b] for b in PROFILE_BINS]

    def train_round(
        self, global_adapter: AdapterState, server_round: int, run_id: str
    ) -> RoundOutcome:
        """Charge the ledger for one round (refusing past the cap), then run local DP-SGD."""
        load_adapter_state(self.model, global_adapter)
        dp = None
        charged: list[dict[str, Any]] = []
        if self.plan is not None and self.ledger is not None:
            self.ledger.charge(self.plan.round_events(), round_id=server_round, run_id=run_id)
            charged = [event_to_dict(event) for event in self.plan.round_events()]
            dp = DpSgdSettings(self.plan.noise_multiplier, self.config.privacy.max_grad_norm)
        generator = torch.Generator().manual_seed(
            stable_seed(self.config.run.seed, self.index, server_round, run_id)
        )
        training = self.config.training
        result = train_locally(
            self.model,
            self.train_data,
            steps=training.local_steps,
            expected_batch_size=training.batch_size,
            learning_rate=training.learning_rate,
            optimizer_name=training.optimizer,
            dp=dp,
            generator=generator,
        )
        metrics: dict[str, float | int] = {
            "num-examples": len(self.train_data),
            "hospital-index": self.index,
            "train-loss": result.mean_loss,
            "train-seconds": result.seconds,
            "sample-rate": result.sample_rate,
            "round-steps": result.steps,
        }
        if self.config.needs_utility_statistics:
            clip = self.config.strategy.loss_clip
            statistic_rate = min(
                1.0, self.config.strategy.utility_sample_size / len(self.train_data)
            )
            square_sum = clipped_square_loss_sum(
                self.model, self.train_data, statistic_rate, clip, generator
            )
            if self.plan is not None and self.plan.utility_release is not None:
                square_sum = release_scalar(
                    square_sum, clip**2, self.plan.utility_release.noise_multiplier
                )
            metrics["utility-square-loss-sum"] = square_sum
            metrics["utility-sample-size"] = statistic_rate * len(self.train_data)
        if self.plan is not None and self.ledger is not None:
            metrics |= {
                "epsilon": self.ledger.spent_epsilon(),
                "epsilon-cap": self.plan.epsilon_cap,
                "noise-multiplier": self.plan.noise_multiplier,
                "steps": self.ledger.total_steps(),
                "rounds-participated": self.ledger.rounds_participated(),
            }
        log.info("hospital.trained", hospital=self.name, round=server_round, **metrics)
        return RoundOutcome(adapter_state(self.model), charged, metrics)

    def evaluate(self, global_adapter: AdapterState) -> EvaluationResult:
        """Held-out loss of the global adapter on this hospital's evaluation split."""
        load_adapter_state(self.model, global_adapter)
        return evaluate(self.model, self.eval_data)
