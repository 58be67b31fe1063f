"""The experiment schema: every key a YAML config may hold, its type, default and bounds.

Researchers change experiments by editing YAML, never Python, so the schema is the contract:
unknown keys are rejected (``extra="forbid"``) so that a typo can never silently fall back to a
default, and every bound that would otherwise surface as a confusing failure deep inside
training (a cohort larger than the federation, a δ of 1) is checked here, up front.
"""

from __future__ import annotations

import math
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, PositiveFloat, PositiveInt, model_validator

from fedllm.data import SPECIALTIES
from fedllm.telemetry.tracing import TracingConfig


class StrictModel(BaseModel):
    """Base for every config section: unknown keys are errors, values are validated on set."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class RunConfig(StrictModel):
    """Identity of an experiment and where its outputs go (``<output_dir>/<name>/``).

    ``publish_adapter_dir`` is a stable place (relative to ``output_dir`` unless absolute) where
    every completed run also writes its final adapter, so hospital inference servers watching
    it serve each new federated model without a restart, while run directories are never
    overwritten.
    """

    name: str = Field("quickstart", pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
    seed: int = 7
    rounds: PositiveInt = 3
    output_dir: str = "runs"
    publish_adapter_dir: str | None = None


class HospitalProfile(StrictModel):
    """One simulated hospital: how much data it holds, what kind, how fast it is, its ε cap."""

    # No ".": report.json keys per-hospital values by name, and tools that flatten JSON
    # (pandas.json_normalize) join nested keys with ".", which would merge or split hospitals.
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_-]*$")
    data_size: PositiveInt = 200
    specialty_mix: dict[str, PositiveFloat] | None = None
    speed: PositiveFloat = 1.0
    epsilon_cap: PositiveFloat | None = None

    @model_validator(mode="after")
    def _known_specialties(self) -> HospitalProfile:
        unknown = sorted(set(self.specialty_mix or {}) - set(SPECIALTIES))
        if unknown:
            raise ValueError(
                f"unknown specialty {unknown}; expected one of {', '.join(SPECIALTIES)}"
            )
        return self


class FederationConfig(StrictModel):
    """Who takes part: the hospitals and how many of them train each round."""

    num_hospitals: PositiveInt = 3
    cohort_size: PositiveInt = 3
    hospitals: list[HospitalProfile] | None = None

    @model_validator(mode="after")
    def _consistent(self) -> FederationConfig:
        if self.cohort_size > self.num_hospitals:
            raise ValueError(
                f"cohort_size ({self.cohort_size}) must be <= num_hospitals ({self.num_hospitals})"
            )
        if self.hospitals is not None:
            if len(self.hospitals) != self.num_hospitals:
                raise ValueError(
                    f"hospitals lists {len(self.hospitals)} profiles but num_hospitals is "
                    f"{self.num_hospitals}"
                )
            names = [h.name for h in self.hospitals]
            if len(set(names)) != len(names):
                raise ValueError(f"hospital names must be unique, got {names}")
        return self

    def profiles(self) -> list[HospitalProfile]:
        """The explicit profiles, or evenly sized defaults each leaning to one specialty."""
        if self.hospitals is not None:
            return list(self.hospitals)
        defaults = []
        for index in range(self.num_hospitals):
            lean = SPECIALTIES[index % len(SPECIALTIES)]
            mix = {s: (4.0 if s == lean else 1.0) for s in SPECIALTIES}
            defaults.append(HospitalProfile(name=f"hospital-{index}", specialty_mix=mix))
        return defaults


class LoraConfig(StrictModel):
    """LoRA adapter shape; ``target_modules: null`` picks the attention projections of the model."""

    r: PositiveInt = 8
    alpha: PositiveFloat = 16.0
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    target_modules: list[str] | None = None


class TinyModelConfig(StrictModel):
    """The embedded default base model: built from a config, pretrained on public text, cached.

    ``build_seed`` seeds its tokenizer corpus, initialisation and pretraining. It is part of
    this config, never ``run.seed``: a seed sweep must train on one base model, not a new one
    per seed.
    """

    build_seed: int = 0
    layers: PositiveInt = 2
    hidden_size: PositiveInt = 128
    heads: PositiveInt = 4
    pretrain_steps: PositiveInt = 400
    pretrain_texts: PositiveInt = 4000

    @model_validator(mode="after")
    def _heads_divide_hidden(self) -> TinyModelConfig:
        if self.hidden_size % self.heads:
            raise ValueError(
                f"hidden_size ({self.hidden_size}) must be divisible by heads ({self.heads})"
            )
        return self


class ModelConfig(StrictModel):
    """Base model (``tiny``, a Hugging Face id or a local path) and its LoRA adapter."""

    name: str = "tiny"
    max_seq_length: int = Field(64, ge=8, le=4096)
    lora: LoraConfig = LoraConfig()
    tiny: TinyModelConfig = TinyModelConfig()


class DataConfig(StrictModel):
    """Where the hospitals' records come from and how they are split between hospitals.

    A shared file is split between the simulated hospitals at random (``partition``:
    ``dirichlet`` by specialty, or ``iid``), or by its own hospital column (``partition:
    column`` with ``hospital_field``): each record goes to the hospital it names, so a real
    multi-site export keeps its sites.
    """

    source: Literal["synthetic", "jsonl", "csv", "huggingface"] = "synthetic"
    path: str | None = None
    text_field: str = "text"
    specialty_field: str | None = None
    patient_field: str | None = None
    hospital_field: str | None = None
    split: str = "train"
    partition: Literal["dirichlet", "iid", "column"] = "dirichlet"
    dirichlet_alpha: PositiveFloat = 0.5
    eval_fraction: float = Field(0.2, gt=0.0, lt=1.0)

    @model_validator(mode="after")
    def _path_for_files(self) -> DataConfig:
        if self.source != "synthetic" and not self.path:
            raise ValueError(f"data.path is required when data.source is '{self.source}'")
        if (self.partition == "column") != (self.hospital_field is not None):
            raise ValueError(
                "data.partition: column and data.hospital_field go together (the column that "
                "names each record's hospital)"
            )
        if self.partition == "column" and self.source == "synthetic":
            raise ValueError(
                "data.partition: column needs file data (data.source jsonl, csv or huggingface)"
            )
        return self


class TrainingConfig(StrictModel):
    """Local DP-SGD at each hospital: steps per round, expected (Poisson) batch size, optimiser."""

    local_steps: PositiveInt = 10
    batch_size: PositiveInt = 16
    learning_rate: PositiveFloat = 3e-3
    optimizer: Literal["adamw", "sgd"] = "adamw"
    device: Literal["auto", "cpu", "cuda"] = "auto"


class PrivacyConfig(StrictModel):
    """Patient-level (or record-level) DP-SGD at each hospital and how ε is accounted.

    Either ``target_epsilon`` (σ is calibrated so that a hospital taking part in
    ``planned_rounds`` rounds, by default every round of the run, ends at that ε) or an explicit
    ``noise_multiplier``. ``epsilon_cap`` is the hard limit a hospital never crosses over the
    life of its dataset; it defaults to the target.

    ``unit: patient`` makes one patient (all of their records) one unit of sampling and
    clipping; records without a patient id are each their own patient. ε is accounted for
    replace-one neighbours, because hospitals' dataset sizes are public; only the ``pld``
    accountant bounds that relation. ``random_source`` picks the generator of DP noise and
    sampling (always seeded by the OS, never by ``run.seed``): ``fast`` or ``secure`` (a
    CSPRNG). ``ledger_dir`` is where simulated hospitals whose records come from files or a
    hub dataset keep their ledgers and split keys, per dataset, so that repeated experiments on
    the same data compose (default ``$FEDLLM_LEDGER_DIR``, else ``~/.local/share/fedllm/ledgers``).
    """

    enabled: bool = True
    target_epsilon: PositiveFloat | None = 8.0
    noise_multiplier: PositiveFloat | None = None
    max_grad_norm: PositiveFloat = 1.0
    delta: float = Field(1e-5, gt=0.0, lt=1.0)
    accountant: Literal["pld", "rdp", "prv"] = "pld"
    epsilon_cap: PositiveFloat | None = None
    unit: Literal["record", "patient"] = "patient"
    planned_rounds: PositiveInt | None = None
    random_source: Literal["fast", "secure"] = "fast"
    ledger_dir: str | None = None

    @model_validator(mode="after")
    def _replace_one_needs_pld(self) -> PrivacyConfig:
        if self.enabled and self.accountant != "pld":
            raise ValueError(
                f"privacy.accountant: got {self.accountant!r}; expected 'pld' (hospitals' "
                "dataset sizes are public, so ε is accounted for replace-one neighbours, which "
                "only the pld accountant bounds)"
            )
        return self

    @model_validator(mode="after")
    def _one_noise_source(self) -> PrivacyConfig:
        if self.enabled and (self.target_epsilon is None) == (self.noise_multiplier is None):
            raise ValueError(
                "set exactly one of privacy.target_epsilon and privacy.noise_multiplier "
                f"(got target_epsilon={self.target_epsilon}, "
                f"noise_multiplier={self.noise_multiplier})"
            )
        return self

    def cap(self) -> float:
        """The default per-hospital cap: explicit cap, else the target, else no limit."""
        if self.epsilon_cap is not None:
            return self.epsilon_cap
        return self.target_epsilon if self.target_epsilon is not None else math.inf


class EvaluationConfig(StrictModel):
    """Held-out perplexity each round, and baselines that show the cost of DP and federation.

    Evaluating on a hospital's own held-out patients is a release about them. ``release``:
    ``dp`` (default) clips each evaluation unit's mean token loss to ``loss_clip`` and releases
    the sum with Gaussian noise of ``noise_multiplier × loss_clip``, charged to the hospital's
    ledger and included in σ's calibration; ``off`` releases nothing; ``exact`` returns exact
    token-weighted losses and is for simulations only, where the run generated or loaded the
    data itself (the report labels those figures simulation-only; a deployed hospital refuses).
    """

    baselines: list[Literal["centralized", "federated_no_dp"]] = ["centralized"]
    max_eval_sequences: PositiveInt = 256
    release: Literal["dp", "exact", "off"] = "dp"
    noise_multiplier: PositiveFloat = 10.0
    loss_clip: PositiveFloat = 8.0


class ServerDpSettings(StrictModel):
    """Optional hospital-level DP on the aggregate: clip each hospital's update, add noise."""

    mode: Literal["off", "fixed", "adaptive"] = "off"
    noise_multiplier: float = Field(1.0, ge=0.0)
    clip_norm: PositiveFloat = 0.1
    target_quantile: float = Field(0.5, gt=0.0, lt=1.0)
    clip_learning_rate: PositiveFloat = 0.2


class StrategyConfig(StrictModel):
    """How the server picks each round's cohort and combines the hospitals' adapters.

    ``selection``: ``random`` (uniform among eligible hospitals), ``oort`` (the K highest
    utilities), ``quantum`` (the cohort QUBO, utility minus λ·redundancy, solved by the
    quantum-inspired sampler; the cohort is drawn from its low-energy ensemble) or ``exact``
    (the same QUBO solved to optimality by MILP). ``solver`` overrides the QUBO solver by name
    (see ``fedllm select --help``), including any dimod sampler as ``dimod:module.Class``.
    ``strategy_class`` (``package.module:Class``) names a subclass of ``PrivacyAwareStrategy``
    to run instead, so an ML engineer's override of one hook is selected from YAML.
    With probability ``uniform_mix`` a QUBO round draws a uniform cohort instead, which keeps
    every eligible hospital's inclusion probability ≥ uniform_mix·K/|eligible| and so bounds
    the n_i/π_i aggregation weights.
    ``round_timeout_s`` bounds how long the server waits for replies to any message of a round
    (status query, training, evaluation), so a hospital that drops out cannot stall the run;
    a round with fewer than ``min_cohort`` successful training replies is recorded as skipped
    and leaves the global adapter unchanged.
    """

    strategy_class: str | None = Field(None, pattern=r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$")
    selection: Literal["random", "oort", "quantum", "exact"] = "quantum"
    solver: str | None = None
    solver_options: dict[str, float | int | str | bool] = {}
    redundancy_weight: float = Field(0.5, ge=0.0)
    aggregation: Literal["weighted", "inclusion-weighted", "trimmed-mean", "median"] = (
        "inclusion-weighted"
    )
    trim_fraction: float = Field(0.2, ge=0.0, lt=0.5)
    server_dp: ServerDpSettings = ServerDpSettings()
    exploration_weight: float = Field(0.5, ge=0.0)
    straggler_penalty: float = Field(2.0, ge=0.0)
    utility_noise_multiplier: PositiveFloat = 20.0
    utility_sample_size: PositiveInt = 512
    profile_noise_multiplier: PositiveFloat = 20.0
    loss_clip: PositiveFloat = 5.0
    uniform_mix: float = Field(0.1, ge=0.0, le=1.0)
    ledger_url: str | None = None
    round_timeout_s: PositiveFloat = 3600.0
    min_cohort: PositiveInt = 1


class ExperimentConfig(StrictModel):
    """A whole experiment, as read from one YAML file.

    ``tracing`` (the same section as router.yaml's and node.yaml's) turns on the server's
    OpenTelemetry round traces; absent, the server makes none.
    """

    run: RunConfig = RunConfig()
    federation: FederationConfig = FederationConfig()
    model: ModelConfig = ModelConfig()
    data: DataConfig = DataConfig()
    training: TrainingConfig = TrainingConfig()
    privacy: PrivacyConfig = PrivacyConfig()
    evaluation: EvaluationConfig = EvaluationConfig()
    strategy: StrategyConfig = StrategyConfig()
    tracing: TracingConfig | None = None

    @model_validator(mode="after")
    def _min_cohort_reachable(self) -> ExperimentConfig:
        if self.strategy.min_cohort > self.federation.cohort_size:
            raise ValueError(
                f"strategy.min_cohort ({self.strategy.min_cohort}) must be <= "
                f"federation.cohort_size ({self.federation.cohort_size})"
            )
        return self

    @model_validator(mode="after")
    def _synthetic_only_profile_keys(self) -> ExperimentConfig:
        """``data_size`` and ``specialty_mix`` shape generated data; a file decides both itself."""
        if self.data.source == "synthetic":
            return self
        for index, hospital in enumerate(self.federation.hospitals or []):
            for key in ("data_size", "specialty_mix"):
                if key in hospital.model_fields_set:
                    raise ValueError(
                        f"federation.hospitals.{index}.{key} shapes synthetic data only; with "
                        f"data.source '{self.data.source}' the file decides what each hospital "
                        "holds (data.partition): remove it"
                    )
        return self

    @property
    def selects(self) -> bool:
        """Whether there is a choice to make: fewer cohort places than hospitals."""
        return self.federation.cohort_size < self.federation.num_hospitals

    @property
    def needs_utility_statistics(self) -> bool:
        """Whether hospitals report a loss statistic each round (noised under DP)."""
        return self.selects and self.strategy.selection != "random"

    @property
    def evaluations_per_run(self) -> int:
        """Evaluation releases a hospital makes in a run: one before round 1, one per round."""
        return 0 if self.evaluation.release == "off" else self.run.rounds + 1

    @property
    def needs_profiles(self) -> bool:
        """Whether hospitals report a data profile once per run (noised under DP)."""
        return (
            self.selects
            and self.strategy.selection in ("quantum", "exact")
            and self.strategy.redundancy_weight > 0
        )
