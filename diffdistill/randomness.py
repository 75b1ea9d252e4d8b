"""Randomness that does not depend on how a global batch is split across processes.

Every draw is made for the whole global batch from a generator seeded by (seed, step, stream)
and each process keeps its own rows. So a run on 2 processes draws exactly the numbers a run on
one process draws, and a resumed run draws what the uninterrupted run drew: no RNG state has to
survive a checkpoint for the losses to be reproducible.
"""

from __future__ import annotations

import hashlib

import torch


def derive_seed(*parts) -> int:
    """A 63-bit seed from any printable parts, stable across Python processes (unlike hash())."""
    digest = hashlib.sha256("/".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


class BatchRandom:
    """Draws per-sample random tensors for a global batch and returns this process's rows.

    ``rand((n, ...))`` and ``randn((n, ...))`` take the *local* batch size ``n`` as the first dim.
    Each call advances the stream, so the order of draws in a loss must not depend on the rank.
    """

    def __init__(self, seed: int, rank: int = 0, world_size: int = 1, device="cpu"):
        self.generator = torch.Generator(device="cpu").manual_seed(seed)
        self.rank, self.world_size, self.device = rank, world_size, torch.device(device)

    def _local(self, draw, shape) -> torch.Tensor:
        n, *rest = shape
        full = draw((n * self.world_size, *rest), generator=self.generator, dtype=torch.float32)
        return full[self.rank * n : (self.rank + 1) * n].to(self.device)

    def rand(self, shape) -> torch.Tensor:
        return self._local(torch.rand, tuple(shape))

    def randn(self, shape) -> torch.Tensor:
        return self._local(torch.randn, tuple(shape))

    def randn_like(self, x: torch.Tensor) -> torch.Tensor:
        return self.randn(x.shape).to(x.dtype)

    def randint(self, low: int, high: int, shape) -> torch.Tensor:
        return (low + self.rand(shape) * (high - low)).floor().long().clamp(max=high - 1)

    def shared_randint(self, low: int, high: int) -> int:
        """One integer all processes agree on (e.g. DMD2's number of backward-simulation steps)."""
        return int(torch.randint(low, high, (1,), generator=self.generator))


def step_random(seed: int, step: int, stream: str, rank: int = 0, world_size: int = 1, device="cpu") -> BatchRandom:
    return BatchRandom(derive_seed(seed, step, stream), rank, world_size, device)
