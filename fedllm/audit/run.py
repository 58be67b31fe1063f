"""Run a config's federation in-process with audit canaries, and measure what an attacker learns.

The audit replays the experiment's training the way its hospitals do it (same data split,
model, LoRA, σ from the same privacy plan, the same :func:`train_locally` with a fresh
OS-seeded noise stream each round) in one process, with every hospital in every round (the
worst case the accountant already assumes) and FedAvg weights n_i. Each audited hospital
gets m canary slots (:mod:`fedllm.audit.canaries`), which count as units of its dataset, so
its σ is planned for the dataset it really trains on. Then:

* white-box: the server's view, each round's released update of the hospital (less what the
  other hospitals' updates of that round predict of it), scored by its projection on each
  gradient canary;
* black-box: the final global model (and the public base model it was fine-tuned from),
  scored by the calibrated log-probability gap of each text-canary pair;
* the one-run bound (:func:`fedllm.audit.bounds.audit_one_run`) on those scores, compared with
  the ε the hospital's accountant reports for the DP-SGD steps the attacker observed;
* a loss-threshold membership attack on the hospitals' own records (training patients vs
  held-out patients), for the DP run and for the same federation without DP;
* with K independent runs, the same bound on the pooled canaries and the classic many-run
  Clopper–Pearson bound.

Nothing here leaves the process or touches a ledger: the audit is an experiment on a
simulation, not a release.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import structlog
import torch

from fedllm.aggregation.rules import weighted_mean
from fedllm.audit.attacks import auc, loss_threshold_auc
from fedllm.audit.bounds import audit_one_run, many_run_audit
from fedllm.audit.canaries import (
    CANARY_NORM_IN_CLIPPING_NORMS,
    DEFAULT_CANARIES,
    GradientCanaries,
    TextCanaries,
    draw_gradient_canaries,
    sequence_losses,
)
from fedllm.audit.plots import plot_audit
from fedllm.config.schema import ExperimentConfig
from fedllm.federation.hospital import pick_device
from fedllm.federation.hospital_data import hospital_data, training_texts
from fedllm.models.adapters import adapter_state, load_adapter_state
from fedllm.models.loading import load_lora_model, load_tokenizer
from fedllm.privacy.accountant import compute_epsilon
from fedllm.privacy.events import SampledGaussianSteps, sample_rate_for
from fedllm.privacy.plan import plan_hospital
from fedllm.privacy.randomness import fresh_stream
from fedllm.training.local import (
    DpSgdSettings,
    LocalTrainingResult,
    train_locally,
)
from fedllm.training.sequences import EncodedSequences, encode_texts

AuditMode = Literal["whitebox", "blackbox"]
AUDIT_MODES: tuple[str, ...] = ("whitebox", "blackbox")
Trainer = Callable[..., LocalTrainingResult]
# held-out and training patients scored per hospital by the membership attack
_MEMBERSHIP_UNITS = 512

log = structlog.get_logger(__name__)


@dataclass
class _Site:
    """One hospital of the audit simulation: its data, canaries and DP settings."""

    index: int
    name: str
    train: EncodedSequences
    real_units: int
    held_out: EncodedSequences
    canaries: GradientCanaries | TextCanaries | None
    dp: DpSgdSettings | None
    canary_rate: float
    reported_epsilon: float
    deltas: list[torch.Tensor] = field(default_factory=list)


def _concat(first: EncodedSequences, second: EncodedSequences) -> EncodedSequences:
    return EncodedSequences(
        torch.cat((first.input_ids, second.input_ids)),
        torch.cat((first.attention_mask, second.attention_mask)),
    )


def _flat(parameters: Sequence[torch.nn.Parameter]) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1).cpu().float() for p in parameters])


def audited_indices(config: ExperimentConfig, hospitals: Sequence[str] | None) -> list[int]:
    """Indices of the hospitals named (all when None); an unknown name is a ValueError."""
    names = [profile.name for profile in config.federation.profiles()]
    if not hospitals:
        return list(range(len(names)))
    unknown = sorted(set(hospitals) - set(names))
    if unknown:
        raise ValueError(f"--hospital {unknown[0]!r} is not in this config; it has {names}")
    return [names.index(name) for name in hospitals]


def simulate(
    config: ExperimentConfig,
    *,
    mode: AuditMode,
    canaries: int,
    audited: Sequence[int],
    confidence: float,
    trainer: Trainer = train_locally,
) -> dict[str, Any]:
    """One federation of ``config`` with canaries at ``audited``; per-hospital attack results.

    ``trainer`` is :func:`train_locally` except in tests, which substitute a deliberately
    broken one to check that the audit catches it.
    """
    started = time.perf_counter()
    device = pick_device(config.training.device)
    tokenizer = load_tokenizer(config.model)
    model = load_lora_model(config.model, device, config.run.seed)
    trainable = [p for p in model.parameters() if p.requires_grad]
    dimension = sum(p.numel() for p in trainable)
    length = config.model.max_seq_length
    privacy = config.privacy
    steps = config.training.local_steps * config.run.rounds
    gradient_canaries: dict[int, GradientCanaries] = {}
    if mode == "whitebox":
        drawn = draw_gradient_canaries(
            [canaries] * len(audited),
            dimension,
            CANARY_NORM_IN_CLIPPING_NORMS * privacy.max_grad_norm,
        )
        gradient_canaries = dict(zip(audited, drawn, strict=True))
    sites: list[_Site] = []
    for index in range(config.federation.num_hospitals):
        data = hospital_data(config, index)
        train = encode_texts(tokenizer, training_texts(data.train, privacy.unit), length)
        held_out = encode_texts(tokenizer, training_texts(data.eval, privacy.unit), length)
        planted: GradientCanaries | TextCanaries | None = gradient_canaries.get(index)
        if index in audited and mode == "blackbox":
            planted = TextCanaries.draw(canaries, tokenizer, length)
        units = len(train) + (canaries if planted is not None else 0)
        rate = sample_rate_for(config.training.batch_size, units)
        dp, reported = None, math.inf
        if privacy.enabled:
            plan = plan_hospital(config, data.name, units, None)
            dp = DpSgdSettings(plan.noise_multiplier, privacy.max_grad_norm)
            reported = compute_epsilon(
                [SampledGaussianSteps(plan.noise_multiplier, plan.sample_rate, steps)],
                privacy.delta,
                privacy.accountant,
            )
        real_units = len(train)
        if isinstance(planted, TextCanaries):
            train = _concat(train, planted.planted())
        sites.append(
            _Site(index, data.name, train, real_units, held_out, planted, dp, rate, reported)
        )
    global_state = adapter_state(model)
    for _ in range(config.run.rounds):
        states, weights = [], []
        for site in sites:
            load_adapter_state(model, global_state)
            before = _flat(trainable)
            hook = (
                site.canaries.sampler(site.canary_rate)
                if isinstance(site.canaries, GradientCanaries)
                else None
            )
            trainer(
                model,
                site.train,
                steps=config.training.local_steps,
                expected_batch_size=config.training.batch_size,
                learning_rate=config.training.learning_rate,
                optimizer_name=config.training.optimizer,
                dp=site.dp,
                stream=fresh_stream(privacy.random_source),
                extra_samples=hook,
            )
            site.deltas.append(_flat(trainable) - before)
            states.append(adapter_state(model))
            weights.append(float(len(site.train)))
        global_state = weighted_mean(states, weights)
    load_adapter_state(model, global_state)
    free = _canary_free(gradient_canaries.values(), dimension)
    results = {
        site.name: _attack(
            site, _others(sites, site), free, model, config.privacy.delta, confidence
        )
        for site in sites
    }
    log.info("audit.simulated", dp=privacy.enabled, seconds=time.perf_counter() - started)
    return results


def _finite_or_none(value: float) -> float | None:
    """JSON has no NaN: an undefined AUC (an empty class) is null."""
    return value if math.isfinite(value) else None


def _others(sites: list[_Site], site: _Site) -> list[torch.Tensor] | None:
    """Per round, the mean released update of every other hospital (None if there is none).

    The server sees these too; they moved the same coordinates from the same global model
    on similar data, so they predict much of ``site``'s own drift (the canary score's noise).
    """
    others = [other.deltas for other in sites if other is not site]
    if not others:
        return None
    return [torch.stack(round_deltas).mean(dim=0) for round_deltas in zip(*others, strict=True)]


def _canary_free(canaries: Iterable[GradientCanaries], dimension: int) -> np.ndarray:
    """The coordinates that hold no hospital's gradient canary (where the score is fitted)."""
    free = np.ones(dimension, dtype=bool)
    for planted in canaries:
        free[planted.coordinates.ravel()] = False
    return free


def _attack(
    site: _Site,
    references: list[torch.Tensor] | None,
    free: np.ndarray,
    model: torch.nn.Module,
    delta: float,
    confidence: float,
) -> dict[str, Any]:
    """Membership attack on real records, plus the canary audit where canaries were planted."""
    members = sequence_losses(model, site.train.select(torch.arange(site.real_units)))
    held_out = sequence_losses(model, site.held_out)
    result: dict[str, Any] = {
        "membership_auc": _finite_or_none(
            loss_threshold_auc(members[:_MEMBERSHIP_UNITS], held_out[:_MEMBERSHIP_UNITS])
        ),
        "training_units": site.real_units,
        "held_out_units": len(site.held_out),
        "noise_multiplier": site.dp.noise_multiplier if site.dp else None,
        "reported_epsilon": site.reported_epsilon if math.isfinite(site.reported_epsilon) else None,
    }
    if site.canaries is None:
        return result
    if isinstance(site.canaries, GradientCanaries):
        scores = site.canaries.scores(site.deltas, references, free)
    else:
        scores, planted, unplanted = site.canaries.scores(model)
        result["exposure"] = {
            "planted_mean": float(planted.mean()),
            "unplanted_mean": float(unplanted.mean()),
            "planted_max": float(planted.max()),
        }
    included = site.canaries.included
    bound = audit_one_run(scores, included, delta, confidence)
    result |= {
        "canaries": bound.canaries,
        "guesses": bound.guesses,
        "correct_guesses": bound.correct,
        "epsilon_lower_bound": bound.epsilon,
        "canary_auc": _finite_or_none(auc(scores, included)),
        "scores": [float(s) for s in scores],
        "included": [bool(b) for b in included],
    }
    return result


def run_audit(
    config: ExperimentConfig,
    *,
    mode: AuditMode = "whitebox",
    canaries: int | None = None,
    confidence: float = 0.95,
    hospitals: Sequence[str] | None = None,
    baseline: bool = True,
    runs: int = 1,
    trainer: Trainer = train_locally,
) -> dict[str, Any]:
    """The audit of ``config``: its DP run and (``baseline``) the same federation without DP.

    ``canaries`` defaults to :data:`DEFAULT_CANARIES` of the mode. With ``runs`` K >= 2 each
    is simulated K times with fresh canaries and coins, and the
    guesses are pooled (:func:`_pooled`). Returns the content of ``audit.json``: per audited
    hospital, the empirical ε lower bound(s), the reported ε, their ratio and the attacks'
    AUCs, for each run.
    """
    if mode not in AUDIT_MODES:
        raise ValueError(f"--mode: got {mode!r}; expected one of {', '.join(AUDIT_MODES)}")
    if canaries is None:
        canaries = DEFAULT_CANARIES[mode]
    if canaries < 2:
        raise ValueError(f"--canaries: got {canaries}; expected at least 2")
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"--confidence: got {confidence}; expected a number in (0, 1)")
    if runs < 1:
        raise ValueError(f"--runs: got {runs}; expected at least 1")
    audited = audited_indices(config, hospitals)
    names = [config.federation.profiles()[i].name for i in audited]
    started = time.perf_counter()
    settings = {"mode": mode, "canaries": canaries, "audited": audited, "confidence": confidence}
    configs: dict[str, ExperimentConfig] = {}
    if config.privacy.enabled:
        configs["dp"] = config
    if baseline or not config.privacy.enabled:
        configs["no_dp"] = config.model_copy(
            update={"privacy": config.privacy.model_copy(update={"enabled": False})}
        )
    results: dict[str, dict[str, Any]] = {}
    for run, run_config in configs.items():
        repeats = [simulate(run_config, **settings, trainer=trainer) for _ in range(runs)]
        results[run] = (
            repeats[0] if runs == 1 else _pooled(repeats, names, config.privacy.delta, confidence)
        )
    return {
        "mode": mode,
        "canaries": canaries,
        "confidence": confidence,
        "delta": config.privacy.delta,
        "rounds": config.run.rounds,
        "local_steps": config.training.local_steps,
        "audited": names,
        "independent_runs": runs,
        "seconds": round(time.perf_counter() - started, 1),
        "runs": results,
        "summary": {run: _summary(per_site, names) for run, per_site in results.items()},
    }


def _pooled(
    repeats: list[dict[str, Any]], audited: list[str], delta: float, confidence: float
) -> dict[str, Any]:
    """K independent runs' results per hospital, with the canaries of all K runs pooled.

    Two bounds on the pooled guesses. The one-run theorem applies unchanged: K independent
    runs are one mechanism with K·m canaries, still (ε, δ)-DP in each coin, so its bound is
    exactly as rigorous as a single run's and can reach higher. The classic many-run bound
    (:func:`many_run_epsilon`) thresholds the scores and bounds the false-positive and
    false-negative rates by Clopper–Pearson, as an audit over independent training runs does;
    it counts each canary as an independent trial, which holds across runs but only
    approximately among the canaries of one run (they share its noise and drift).
    """
    pooled: dict[str, Any] = {}
    for name, first in repeats[0].items():
        per_run = [repeat[name] for repeat in repeats]
        result: dict[str, Any] = {
            key: first[key] for key in ("training_units", "held_out_units", "noise_multiplier")
        }
        result["reported_epsilon"] = first["reported_epsilon"]
        memberships = [r["membership_auc"] for r in per_run if r["membership_auc"] is not None]
        result["membership_auc"] = float(np.mean(memberships)) if memberships else None
        if name in audited:
            scores = np.concatenate([r["scores"] for r in per_run])
            included = np.concatenate([r["included"] for r in per_run]).astype(bool)
            bound = audit_one_run(scores, included, delta, confidence)
            result |= {
                "per_run_epsilon_lower_bound": [r["epsilon_lower_bound"] for r in per_run],
                "canaries": bound.canaries,
                "guesses": bound.guesses,
                "correct_guesses": bound.correct,
                "epsilon_lower_bound": bound.epsilon,
                "many_run_epsilon_lower_bound": many_run_audit(scores, included, delta, confidence),
                "canary_auc": _finite_or_none(auc(scores, included)),
                "scores": [float(s) for s in scores],
                "included": [bool(b) for b in included],
            }
        pooled[name] = result
    return pooled


def _summary(results: dict[str, Any], audited: list[str]) -> dict[str, Any]:
    """Per hospital: the figures the CLI prints (no per-canary scores)."""
    rows = {}
    for name, result in results.items():
        row = {"membership_auc": result["membership_auc"]}
        if name in audited:
            reported = result["reported_epsilon"]
            bound = result["epsilon_lower_bound"]
            row |= {
                "epsilon_lower_bound": bound,
                "reported_epsilon": reported,
                "ratio": bound / reported if reported else None,
                "canary_auc": result["canary_auc"],
            }
            if "many_run_epsilon_lower_bound" in result:
                many = result["many_run_epsilon_lower_bound"]
                row |= {
                    "many_run_epsilon_lower_bound": many,
                    "many_run_ratio": many / reported if reported else None,
                }
        rows[name] = row
    return rows


def write_audit(audit: dict[str, Any], run_dir: Path) -> list[Path]:
    """``audit.json`` and ``audit.png`` in ``run_dir``; returns their paths."""
    path = run_dir / "audit.json"
    path.write_text(json.dumps(audit, indent=2, allow_nan=False) + "\n")
    return [path, plot_audit(audit, run_dir / "audit.png")]
