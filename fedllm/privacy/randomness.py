"""The random draws a DP guarantee rests on: fresh OS entropy in every process, never a seed.

DP-SGD's Poisson sampling and noise, and every Gaussian release a hospital makes, are only
private if nobody can predict them. A generator seeded from the config (``run.seed``), the
round number, a run id or anything else the server knows lets whoever holds that value
regenerate the noise and subtract it. So every :class:`RandomStream` used for privacy is
seeded here, from ``os.urandom``, afresh each time one is made (each round, in each process).

Two sources, chosen by ``privacy.random_source``:

* ``fast`` (default): PyTorch's generator (Mersenne Twister on the CPU, Philox on CUDA) and
  numpy's PCG64, each seeded with 64 or 128 bits of OS entropy. Statistically excellent and
  unpredictable to anyone without the seed, but not cryptographically secure: an adversary who
  saw enough *raw* outputs could reconstruct the state. DP-SGD never releases raw noise, only
  noisy sums, and no attack on that is known; the ``secure`` source removes the question.
* ``secure``: every uniform comes from ``os.urandom`` (the kernel's ChaCha20 CSPRNG) and
  Gaussians from Box–Muller on those uniforms; each Gaussian is the scaled sum of four draws,
  as in Opacus' secure mode (Holohan & Braghin 2021), which defeats the floating-point attacks
  on the low bits of a single Gaussian sample. ``benchmarks/random_source.py`` measures its cost.

``SeededStream`` exists for what is public (non-DP baselines, benchmarks that compare like with
like) and is never used for a DP mechanism.
"""

from __future__ import annotations

import math
import os
import secrets
from abc import ABC, abstractmethod
from typing import Literal

import numpy as np
import torch

RandomSource = Literal["fast", "secure"]
RANDOM_SOURCES: tuple[str, ...] = ("fast", "secure")

# 53 random bits make every double in [0, 1) on a 2**-53 grid equally likely.
_MANTISSA_BITS = 53
# Opacus' secure mode: the sum of 2n Gaussians of std σ, divided by √(2n), with n = 2.
_SECURE_SUMMANDS = 4


class RandomStream(ABC):
    """Uniforms for Poisson sampling and Gaussians for noise, from one source."""

    @abstractmethod
    def uniform(self, count: int) -> torch.Tensor:
        """``count`` float64 uniforms on [0, 1), on the CPU."""

    @abstractmethod
    def normal(
        self,
        shape: tuple[int, ...] | torch.Size,
        std: float,
        *,
        device: torch.device,
        dtype: torch.dtype,
    ) -> torch.Tensor:
        """Gaussian noise N(0, std²) of ``shape`` on ``device``."""

    def normal_array(self, count: int, std: float) -> np.ndarray:
        """``count`` float64 Gaussians N(0, std²) as a numpy array (statistics releases)."""
        draws = self.normal((count,), std, device=torch.device("cpu"), dtype=torch.float64)
        return draws.numpy()

    def poisson_mask(self, count: int, rate: float) -> torch.Tensor:
        """A boolean mask choosing each of ``count`` items independently with probability q."""
        return self.uniform(count) < rate


class TorchStream(RandomStream):
    """PyTorch's generators (Mersenne Twister on the CPU, Philox on CUDA), one per device."""

    def __init__(self) -> None:
        self._generators: dict[str, torch.Generator] = {}

    @abstractmethod
    def _next_seed(self) -> int:
        """The seed of the next device's generator."""

    def _generator(self, device: torch.device) -> torch.Generator:
        key = str(device)
        if key not in self._generators:
            self._generators[key] = torch.Generator(device=device).manual_seed(self._next_seed())
        return self._generators[key]

    def uniform(self, count: int) -> torch.Tensor:
        cpu = torch.device("cpu")
        return torch.rand(count, generator=self._generator(cpu), dtype=torch.float64)

    def normal(
        self,
        shape: tuple[int, ...] | torch.Size,
        std: float,
        *,
        device: torch.device,
        dtype: torch.dtype,
    ) -> torch.Tensor:
        return torch.normal(
            0.0, std, size=tuple(shape), generator=self._generator(device), device=device
        ).to(dtype)


class SeededStream(TorchStream):
    """Generators from a given seed: reproducible, hence only for public randomness."""

    def __init__(self, seed: int) -> None:
        super().__init__()
        self._seed = seed

    def _next_seed(self) -> int:
        # each device gets its own stream derived from the one (public) seed
        return (self._seed + len(self._generators)) % 2**63


class FastStream(TorchStream):
    """Generators each seeded with 63 bits of OS entropy: the default source of DP draws."""

    def _next_seed(self) -> int:
        return secrets.randbits(63)


class SecureStream(RandomStream):
    """Every bit from ``os.urandom``; Gaussians by Box–Muller, summed as Opacus' secure mode."""

    def uniform(self, count: int) -> torch.Tensor:
        if count == 0:
            return torch.zeros(0, dtype=torch.float64)
        words = np.frombuffer(os.urandom(8 * count), dtype=np.uint64)
        mantissas = (words >> np.uint64(64 - _MANTISSA_BITS)).astype(np.float64)
        return torch.from_numpy(mantissas * 2.0**-_MANTISSA_BITS)

    def _standard_normal(self, count: int) -> torch.Tensor:
        """Box–Muller: two uniforms give two independent standard Gaussians."""
        pairs = (count + 1) // 2
        u1 = 1.0 - self.uniform(pairs)  # (0, 1]: the logarithm stays finite
        u2 = self.uniform(pairs)
        radius = torch.sqrt(-2.0 * torch.log(u1))
        angle = 2.0 * math.pi * u2
        return torch.cat((radius * torch.cos(angle), radius * torch.sin(angle)))[:count]

    def normal(
        self,
        shape: tuple[int, ...] | torch.Size,
        std: float,
        *,
        device: torch.device,
        dtype: torch.dtype,
    ) -> torch.Tensor:
        count = math.prod(shape)
        total = torch.zeros(count, dtype=torch.float64)
        for _ in range(_SECURE_SUMMANDS):
            total += self._standard_normal(count)
        noise = total * (std / math.sqrt(_SECURE_SUMMANDS))
        return noise.reshape(tuple(shape)).to(device=device, dtype=dtype)


def fresh_stream(source: str = "fast") -> RandomStream:
    """A new stream for a DP mechanism, seeded (``fast``) or fed (``secure``) by the OS."""
    if source == "fast":
        return FastStream()
    if source == "secure":
        return SecureStream()
    raise ValueError(f"privacy.random_source: got {source!r}; expected one of {RANDOM_SOURCES}")
