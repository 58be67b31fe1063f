"""A hospital node's work, independent of Flower: train a round under DP, evaluate, report status.

The Flower ClientApp is a thin adapter over this class, so the privacy-critical sequence
(check the cap, charge the ledger, then train) is tested without a federation. The ledger is
charged *before* training: once noisy steps have run, their privacy cost is spent even if the
process dies before the update leaves the hospital.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

import structlog
import torch

from fedllm.config.schema import ExperimentConfig
from fedllm.federation.hospital_data import hospital_data, training_texts
from fedllm.models.adapters import AdapterState, adapter_state, load_adapter_state
from fedllm.models.loading import load_lora_model, load_tokenizer
from fedllm.privacy.node_ledger import NodePrivacyLedger
from fedllm.privacy.plan import HospitalPrivacyPlan, plan_hospital
from fedllm.training.evaluation import EvaluationResult, evaluate
from fedllm.training.local import DpSgdSettings, train_locally
from fedllm.training.sequences import encode_texts

log = structlog.get_logger(__name__)


def pick_device(preference: str) -> torch.device:
    """``auto`` is CUDA when present, else CPU; asking for CUDA without one is an error."""
    if preference == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("training.device is 'cuda' but no CUDA device is available")
    if preference == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(preference)


def stable_seed(*parts: object) -> int:
    """A seed that is the same in every process (unlike ``hash``, which is salted per process)."""
    digest = hashlib.sha256("/".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:4], "big")


@dataclass(frozen=True)
class RoundOutcome:
    """A trained adapter and the metrics that travel back to the server with it."""

    adapter: AdapterState
    metrics: dict[str, float | int]


class HospitalSite:
    """One hospital: its data, its copy of the model and its persistent privacy ledger."""

    def __init__(
        self,
        config: ExperimentConfig,
        index: int,
        ledger_url: str,
        epsilon_cap: float | None = None,
    ) -> None:
        self.config = config
        self.index = index
        self.profile = config.federation.profiles()[index]
        self.device = pick_device(config.training.device)
        data = hospital_data(config, index)
        tokenizer = load_tokenizer(config.model, config.run.seed)
        length = config.model.max_seq_length
        self.train_data = encode_texts(
            tokenizer, training_texts(data.train, config.privacy.unit), length
        )
        eval_texts = [r.text for r in data.eval][: config.evaluation.max_eval_sequences]
        self.eval_data = encode_texts(tokenizer, eval_texts, length)
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
            }
        return status

    def train_round(
        self, global_adapter: AdapterState, server_round: int, run_id: str
    ) -> RoundOutcome:
        """Charge the ledger for one round (refusing past the cap), then run local DP-SGD."""
        load_adapter_state(self.model, global_adapter)
        dp = None
        if self.plan is not None and self.ledger is not None:
            self.ledger.charge(self.plan.round_events(), round_id=server_round, run_id=run_id)
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
        if self.plan is not None and self.ledger is not None:
            metrics |= {
                "epsilon": self.ledger.spent_epsilon(),
                "epsilon-cap": self.plan.epsilon_cap,
                "noise-multiplier": self.plan.noise_multiplier,
                "steps": self.ledger.total_steps(),
                "rounds-participated": self.ledger.rounds_participated(),
            }
        log.info("hospital.trained", hospital=self.name, round=server_round, **metrics)
        return RoundOutcome(adapter_state(self.model), metrics)

    def evaluate(self, global_adapter: AdapterState) -> EvaluationResult:
        """Held-out loss of the global adapter on this hospital's evaluation split."""
        load_adapter_state(self.model, global_adapter)
        return evaluate(self.model, self.eval_data)
