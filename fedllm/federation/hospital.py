"""A hospital node's work, independent of Flower: train a round under DP, evaluate, report status.

The Flower ClientApp is a thin adapter over this class, so the privacy-critical sequence
(check the cap, charge the ledger, then train) is tested without a federation. The ledger is
charged *before* training: once noisy steps have run, their privacy cost is spent even if the
process dies before the update leaves the hospital.
"""

from __future__ import annotations

import json
import threading
from dataclasses import dataclass
from typing import Any

import structlog
import torch

from fedllm.config.schema import ExperimentConfig
from fedllm.data import SPECIALTIES, ClinicalRecord
from fedllm.federation.hospital_data import LocalDataSource, hospital_data, training_texts
from fedllm.federation.preflight import attach_lora
from fedllm.models.adapters import AdapterState, adapter_state, load_adapter_state
from fedllm.models.loading import base_model, load_base_model, load_tokenizer, public_seed
from fedllm.privacy.events import event_to_dict
from fedllm.privacy.node_ledger import BudgetExceededError, NodePrivacyLedger
from fedllm.privacy.plan import HospitalPrivacyPlan, plan_hospital
from fedllm.privacy.randomness import fresh_stream
from fedllm.privacy.releases import release_counts, release_scalar
from fedllm.security.encryption import KeyRingSource
from fedllm.storage.database import sqlite_path
from fedllm.storage.files import create_private_file
from fedllm.training.evaluation import EvaluationResult, evaluate, evaluate_clipped_units
from fedllm.training.local import DpSgdSettings, train_locally
from fedllm.training.sequences import EncodedSequences, encode_texts
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


def evaluation_texts(records: list[ClinicalRecord], config: ExperimentConfig) -> list[str]:
    """What evaluation scores: records when exact, privacy units under a DP evaluation.

    A DP evaluation clips each unit's loss, so a unit must be the privacy unit (a patient's
    records together) for one patient to move the sum by at most the clip.
    """
    texts = (
        [record.text for record in records]
        if config.evaluation.release == "exact"
        else training_texts(records, config.privacy.unit)
    )
    return texts[: config.evaluation.max_eval_sequences]


def score_evaluation(
    model: torch.nn.Module, data: EncodedSequences, config: ExperimentConfig
) -> EvaluationResult:
    """The configured evaluation figure, before any noise: exact, or Σ clipped unit losses."""
    if config.evaluation.release == "exact":
        return evaluate(model, data)
    return evaluate_clipped_units(model, data, config.evaluation.loss_clip)


class EvaluationRefusedError(RuntimeError):
    """The experiment asks a hospital for an evaluation it must not release."""


class BaseModelMismatchError(RuntimeError):
    """This hospital's base model is not the server's (by content hash): it must not train.

    An update computed on other base weights is meaningless in the aggregate, and its
    privacy cost would be spent for nothing.
    """


class LedgerDeltaError(ValueError):
    """The experiment's δ is not the one this hospital's ledger was opened with."""


def open_ledger(url: str, hospital: str, **settings: Any) -> NodePrivacyLedger:
    """The hospital's ledger, its SQLite file (and directory) private to this account.

    A ledger fixes δ when it is first opened: ε at different δ cannot be added, so an
    experiment with another δ is refused at every message. The refusal says so in one line
    that reaches the researcher (the reply's error reason), naming the δ to use.
    """
    database = sqlite_path(url)
    if database is not None:
        create_private_file(database)
    try:
        return NodePrivacyLedger(url, hospital, **settings)
    except ValueError as error:
        if "ledger uses delta=" not in str(error):
            raise
        stored = str(error).split("ledger uses delta=", 1)[1].split(";", 1)[0]
        raise LedgerDeltaError(
            f"this hospital's ledger accounts at delta={stored}, the experiment asks "
            f"delta={settings['delta']!r}: ε at different δ cannot be added; run with "
            f"privacy.delta: {stored}"
        ) from None


@dataclass(frozen=True)
class RoundOutcome:
    """A trained adapter and the metrics that travel back to the server with it."""

    adapter: AdapterState
    events: list[dict[str, Any]]
    metrics: dict[str, float | int]


class HospitalSite:
    """One hospital: its data, its copy of the model and its persistent privacy ledger.

    Building a site is the hospital's own check before it charges anything: its records load,
    the LoRA targets match the model and its privacy plan reaches the target ε, or the
    constructor raises a one-line error, before the ledger is even opened. The first message
    of a run (a status query, which charges nothing) builds it, so a hospital that cannot take
    part is known before any hospital releases anything.

    ``local_data`` is a deployed hospital's own records file, split with its own secret
    ``split_key``; without it the records come from the experiment config (simulation).
    ``evaluation_allowed`` is the hospital's own policy: False refuses every evaluation.
    ``base_model_sha256`` is the server's base-model hash: a site whose own base model hashes
    differently is refused first of all (see :meth:`require_base_model`); None skips the
    check, for a site built outside a federation. ``keyring`` is the process's key ring
    source (the ClientApp reads it from the environment); with one, the ledger's events are
    encrypted at rest.
    Every random draw a DP guarantee rests on comes from a stream seeded by the OS afresh for
    each release (:mod:`fedllm.privacy.randomness`), never from ``run.seed``.
    """

    def __init__(
        self,
        config: ExperimentConfig,
        index: int,
        ledger_url: str,
        epsilon_cap: float | None = None,
        local_data: LocalDataSource | None = None,
        split_key: bytes | None = None,
        evaluation_allowed: bool = True,
        base_model_sha256: str | None = None,
        keyring: KeyRingSource | None = None,
    ) -> None:
        self.config = config
        self.index = index
        self.profile = config.federation.profiles()[index]
        self.base_model = base_model(config.model)
        if base_model_sha256 is not None:
            self.require_base_model(base_model_sha256)
        self.device = pick_device(config.training.device)
        self.owns_records = local_data is not None
        self.evaluation_allowed = evaluation_allowed
        data = hospital_data(config, index, local_data, split_key)
        tokenizer = load_tokenizer(config.model)
        length = config.model.max_seq_length
        unit = config.privacy.unit
        self.train_data = encode_texts(tokenizer, training_texts(data.train, unit), length)
        self.eval_data = encode_texts(tokenizer, evaluation_texts(data.eval, config), length)
        self.specialty_counts = specialty_counts(data.train, config.privacy.unit)
        base = load_base_model(config.model, self.device)
        with public_seed(config.run.seed, self.device):
            self.model = attach_lora(base, config.model)
        self.plan: HospitalPrivacyPlan | None = None
        self.ledger: NodePrivacyLedger | None = None
        self._projection_ahead: threading.Thread | None = None
        if config.privacy.enabled:
            cap = epsilon_cap if epsilon_cap is not None else self.profile.epsilon_cap
            self.plan = plan_hospital(config, self.profile.name, len(self.train_data), cap)
            self.ledger = open_ledger(
                ledger_url,
                self.profile.name,
                epsilon_cap=self.plan.epsilon_cap,
                delta=config.privacy.delta,
                accountant=config.privacy.accountant,
                keyring=keyring,
            )

    @property
    def name(self) -> str:
        return self.profile.name

    def require_base_model(self, server_sha256: str | None) -> None:
        """Refuse (`BaseModelMismatchError`) unless the server's base-model hash is this site's.

        The server sends its hash with every message; a message without one comes from a
        server that cannot vouch for its base model, and is refused too.
        """
        own = self.base_model.sha256
        if not server_sha256:
            raise BaseModelMismatchError(
                f"the server sent no base-model hash; this hospital's base model is {own[:12]}"
            )
        if server_sha256 != own:
            raise BaseModelMismatchError(
                f"the server's base model is {server_sha256[:12]}, this hospital's "
                f"({self.base_model.name!r}) is {own[:12]}: install the model the operator "
                "distributed (fedllm model build)"
            )

    def status(self) -> dict[str, Any]:
        """What the server needs to decide eligibility: spent ε and the next round's ε."""
        self._await_projection_ahead()
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
            row["run_id"] == run_id and row["event"].get("purpose") == "profile"
            for row in self.ledger.history()
        )
        if release is None or already or not self.ledger.can_afford(self.plan.one_off_events()):
            return None
        self.ledger.charge(self.plan.one_off_events(), round_id=0, run_id=run_id)
        noised = release_counts(
            self.specialty_counts, release.noise_multiplier, fresh_stream(self.random_source)
        )
        return [noised[b] for b in PROFILE_BINS]

    @property
    def random_source(self) -> str:
        """``fast`` or ``secure`` (``privacy.random_source``); both seeded by the OS."""
        return self.config.privacy.random_source

    def train_round(
        self, global_adapter: AdapterState, server_round: int, run_id: str
    ) -> RoundOutcome:
        """Charge the ledger for one round (refusing past the cap), then run local DP-SGD."""
        self._await_projection_ahead()
        load_adapter_state(self.model, global_adapter)
        dp = None
        charged: list[dict[str, Any]] = []
        if self.plan is not None and self.ledger is not None:
            self.ledger.charge(self.plan.round_events(), round_id=server_round, run_id=run_id)
            charged = [event_to_dict(event) for event in self.plan.round_events()]
            dp = DpSgdSettings(self.plan.noise_multiplier, self.config.privacy.max_grad_norm)
        # fresh OS entropy for this round's sampling and noise: nothing the server knows
        stream = fresh_stream(self.random_source)
        training = self.config.training
        result = train_locally(
            self.model,
            self.train_data,
            steps=training.local_steps,
            expected_batch_size=training.batch_size,
            learning_rate=training.learning_rate,
            optimizer_name=training.optimizer,
            dp=dp,
            stream=stream,
        )
        # Only what the release inventory (docs/privacy.md) lists leaves the hospital: the
        # exact training loss and the measured duration (a function of the Poisson batch
        # sizes) stay here, in the hospital's own log.
        metrics: dict[str, float | int] = {
            "num-examples": len(self.train_data),
            "hospital-index": self.index,
            "sample-rate": result.sample_rate,
            "round-steps": result.steps,
        }
        if self.config.needs_utility_statistics:
            clip = self.config.strategy.loss_clip
            statistic_rate = min(
                1.0, self.config.strategy.utility_sample_size / len(self.train_data)
            )
            square_sum = clipped_square_loss_sum(
                self.model, self.train_data, statistic_rate, clip, stream
            )
            if self.plan is not None and self.plan.utility_release is not None:
                square_sum = release_scalar(
                    square_sum, clip**2, self.plan.utility_release.noise_multiplier, stream
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
        log.info(
            "hospital.trained",
            hospital=self.name,
            round=server_round,
            local_mean_loss=result.mean_loss,
            local_seconds=round(result.seconds, 3),
            **metrics,
        )
        if not self._evaluation_charges():  # else the evaluation's charge is the round's last
            self.project_next_round_ahead()
        return RoundOutcome(adapter_state(self.model), charged, metrics)

    def project_next_round_ahead(self) -> None:
        """Compose, in the background, the ε that the next status query projects.

        Called when a handler has charged its round's last events: the composition (a fifth of
        a second with the PLD accountant) then runs while the hospital waits for the server,
        and the next status query reads it from the accountant's cache instead of composing
        it on the round's path. Only a warm-up: the query composes it itself if this has not
        finished or failed.
        """
        if self.plan is None or self.ledger is None:
            return
        self._projection_ahead = threading.Thread(
            target=self._project_next_round, name="epsilon-ahead", daemon=True
        )
        self._projection_ahead.start()

    def _evaluation_charges(self) -> bool:
        return self.config.evaluation.release == "dp" and self.evaluation_allowed

    def _await_projection_ahead(self) -> None:
        """Wait for a projection still being composed, instead of composing it a second time
        beside it; what needs it then reads it from the cache."""
        if self._projection_ahead is not None:
            self._projection_ahead.join()
            self._projection_ahead = None

    def _project_next_round(self) -> None:
        try:
            self.ledger.projected_epsilon(self.plan.round_events())
        except Exception as error:  # the query computes it again and reports any real failure
            log.debug("hospital.projection_ahead_failed", hospital=self.name, reason=str(error))

    def evaluate(
        self, global_adapter: AdapterState, server_round: int, run_id: str
    ) -> tuple[EvaluationResult, list[dict[str, Any]]] | None:
        """Held-out loss of the global adapter, as the experiment's ``evaluation.release`` says.

        ``exact``: token-weighted, exact (simulation only: refused for a hospital's own
        records). ``dp``: Σ clipped per-unit loss plus Gaussian noise, charged to the ledger
        first (exact sum of clipped losses when the run has no DP at all). None when nothing
        may be released: evaluation off (by the experiment or this hospital), or the ledger
        cannot afford it. With the result come the events it charged (for the server's mirror).
        """
        release = self.config.evaluation.release
        if release == "off" or not self.evaluation_allowed:
            return None
        if release == "exact" and self.owns_records:
            raise EvaluationRefusedError(
                "evaluation.release 'exact' is for simulations on data the run generated or "
                "loaded itself; a hospital with its own records releases only DP evaluations "
                "(set evaluation.release to 'dp' or 'off')"
            )
        load_adapter_state(self.model, global_adapter)
        result = score_evaluation(self.model, self.eval_data, self.config)
        if release == "exact" or self.plan is None or self.ledger is None:
            return result, []
        events = self.plan.evaluation_events()
        self._await_projection_ahead()
        try:
            self.ledger.charge(events, round_id=server_round, run_id=run_id)
        except BudgetExceededError as refused:
            log.warning("hospital.evaluation_unaffordable", hospital=self.name, reason=str(refused))
            return None
        evaluation = self.config.evaluation
        noised = release_scalar(
            result.loss_sum,
            evaluation.loss_clip,
            evaluation.noise_multiplier,
            fresh_stream(self.random_source),
        )
        self.project_next_round_ahead()
        return EvaluationResult(noised, result.count), [event_to_dict(e) for e in events]
