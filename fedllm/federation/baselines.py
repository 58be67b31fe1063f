"""The centralised, non-private baseline: the same model trained on all hospitals' data pooled.

It answers "what do federation and DP cost?": it sees as many examples as the federation
(``rounds × local_steps`` steps of ``cohort_size × batch_size`` expected sequences) and is
evaluated on exactly the hospitals' held-out splits. Only a simulation can run it: in a real
consortium no single party holds the pooled data.
"""

from __future__ import annotations

import time
from typing import Any

from fedllm.config.schema import ExperimentConfig
from fedllm.federation.hospital import evaluation_texts, pick_device, score_evaluation
from fedllm.federation.hospital_data import hospital_data
from fedllm.models.loading import load_lora_model, load_tokenizer
from fedllm.privacy.randomness import SeededStream
from fedllm.training.evaluation import combine
from fedllm.training.local import train_locally
from fedllm.training.sequences import encode_texts


def run_centralized_baseline(config: ExperimentConfig) -> dict[str, Any]:
    """Train on the pooled training records without DP; return perplexities and timing."""
    started = time.perf_counter()
    device = pick_device(config.training.device)
    tokenizer = load_tokenizer(config.model)
    model = load_lora_model(config.model, device, config.run.seed)
    length = config.model.max_seq_length
    hospitals = [hospital_data(config, i) for i in range(config.federation.num_hospitals)]
    pooled = encode_texts(tokenizer, [r.text for h in hospitals for r in h.train], length)
    training = config.training
    result = train_locally(
        model,
        pooled,
        steps=config.run.rounds * training.local_steps,
        expected_batch_size=training.batch_size * config.federation.cohort_size,
        learning_rate=training.learning_rate,
        optimizer_name=training.optimizer,
        dp=None,
        # a non-private baseline: its sampling is public, so the run's seed may drive it
        stream=SeededStream(config.run.seed),
    )
    per_hospital = {
        h.name: score_evaluation(
            model, encode_texts(tokenizer, evaluation_texts(h.eval, config), length), config
        )
        for h in hospitals
    }
    overall = combine(list(per_hospital.values()))
    return {
        "perplexity": overall.perplexity,
        "eval_loss": overall.mean_loss,
        "perplexity_per_hospital": {n: r.perplexity for n, r in per_hospital.items()},
        "train_loss": result.mean_loss,
        "seconds": round(time.perf_counter() - started, 3),
    }
