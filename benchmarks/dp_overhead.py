"""DP-SGD step time over non-private step time: same model, LoRA, batches and sequence length.

Both paths run fedllm's own training loop (`train_locally`) with identical Poisson samples
(the same public benchmark seed; a real hospital's stream is seeded by the OS); the only
difference is Opacus' per-sample gradients, clipping and noise. Trials alternate DP and
non-DP so drift in machine load hits both alike, and the ratio of medians is reported. Run:

    .venv/bin/python benchmarks/dp_overhead.py [--steps 30] [--trials 5] [--markdown]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
from dataclasses import dataclass

import torch

from fedllm.config.schema import LoraConfig, ModelConfig, TinyModelConfig
from fedllm.data import generate_clinical_records
from fedllm.models.loading import load_lora_model, load_tokenizer
from fedllm.privacy.randomness import RandomStream, SeededStream
from fedllm.telemetry.logging import quiet_third_party_output
from fedllm.training.local import DpSgdSettings, train_locally
from fedllm.training.sequences import encode_texts


@dataclass(frozen=True)
class Case:
    name: str
    model: ModelConfig
    batch_size: int


QUICK_START_LORA = LoraConfig(r=4, alpha=8.0)
CASES = (
    Case(
        "quick-start tiny (2×128, r=4)", ModelConfig(max_seq_length=64, lora=QUICK_START_LORA), 64
    ),
    Case(
        "larger tiny (4×256, r=16)",
        ModelConfig(
            max_seq_length=96,
            lora=LoraConfig(r=16, alpha=32.0),
            tiny=TinyModelConfig(layers=4, hidden_size=256, heads=8, pretrain_steps=100),
        ),
        64,
    ),
)


def time_steps(
    case: Case,
    steps: int,
    dp: DpSgdSettings | None,
    seed: int,
    stream: RandomStream | None = None,
) -> float:
    """Seconds per step of `train_locally` on fixed data (``stream`` defaults to ``seed``)."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    tokenizer = load_tokenizer(case.model)
    model = load_lora_model(case.model, device)
    texts = [r.text for r in generate_clinical_records(600, None, seed=1)]
    data = encode_texts(tokenizer, texts, case.model.max_seq_length)
    train_locally(
        model,
        data,
        steps=2,
        expected_batch_size=case.batch_size,
        learning_rate=1e-3,
        dp=dp,
        stream=SeededStream(seed),
    )
    if device.type == "cuda":
        torch.cuda.synchronize()
    result = train_locally(
        model,
        data,
        steps=steps,
        expected_batch_size=case.batch_size,
        learning_rate=1e-3,
        dp=dp,
        stream=stream or SeededStream(seed),
    )
    if device.type == "cuda":
        torch.cuda.synchronize()
    return result.seconds / steps


def measure(case: Case, steps: int, trials: int) -> dict[str, float]:
    """Median step times over alternating trials and their ratio."""
    private, plain = [], []
    dp = DpSgdSettings(noise_multiplier=1.0, max_grad_norm=1.0)
    for trial in range(trials):
        plain.append(time_steps(case, steps, None, seed=trial))
        private.append(time_steps(case, steps, dp, seed=trial))
    dp_median, plain_median = statistics.median(private), statistics.median(plain)
    return {
        "dp_ms": 1e3 * dp_median,
        "plain_ms": 1e3 * plain_median,
        "ratio": dp_median / plain_median,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--trials", type=int, default=5)
    parser.add_argument("--markdown", action="store_true")
    args = parser.parse_args()
    quiet_third_party_output()
    device = "cuda: " + torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    print(
        f"machine: {platform.platform()}, {os.cpu_count()} cores, torch {torch.__version__},"
        f" {device}, {torch.get_num_threads()} threads"
    )
    print(f"command: python benchmarks/dp_overhead.py --steps {args.steps} --trials {args.trials}")
    rows = [(case, measure(case, args.steps, args.trials)) for case in CASES]
    if args.markdown:
        print("| model | batch | seq | non-DP ms/step | DP ms/step | DP / non-DP |")
        print("|---|---|---|---|---|---|")
        for case, r in rows:
            print(
                f"| {case.name} | {case.batch_size} | {case.model.max_seq_length} |"
                f" {r['plain_ms']:.1f} | {r['dp_ms']:.1f} | {r['ratio']:.3f}× |"
            )
        return
    for case, r in rows:
        print(
            f"{case.name:24s} batch {case.batch_size} seq {case.model.max_seq_length}:"
            f" non-DP {r['plain_ms']:.1f} ms  DP {r['dp_ms']:.1f} ms  ratio {r['ratio']:.3f}×"
        )


if __name__ == "__main__":
    main()
