"""Seeded, resumable, rank-aware batches from tensors in memory — for benchmarks and exactness tests.

Global micro-batch ``g`` is positions ``[g·B·W, (g+1)·B·W)`` of an endless stream of per-epoch permutations;
rank ``r`` of ``W`` takes its contiguous ``B`` of them. So one process with micro-batch ``B·W`` sees exactly the
samples ``W`` processes see together, and ``state_dict`` (micro-batches consumed) resumes the stream exactly.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch


class InMemoryBatches:
    def __init__(
        self,
        images: torch.Tensor,
        labels: torch.Tensor,
        batch_size: int,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
    ):
        self.images, self.labels = images, labels
        self.batch_size, self.seed, self.rank, self.world_size = batch_size, seed, rank, world_size
        self.position = 0

    def _indices(self, start: int, count: int) -> torch.Tensor:
        n = len(self.labels)
        out = []
        for pos in range(start, start + count):
            epoch, offset = divmod(pos, n)
            if offset == 0 or not out:
                perm = torch.randperm(n, generator=torch.Generator().manual_seed(self.seed + epoch))
            out.append(perm[offset])
        return torch.stack(out)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        global_batch = self.batch_size * self.world_size
        while True:
            start = self.position * global_batch + self.rank * self.batch_size
            idx = self._indices(start, self.batch_size)
            self.position += 1
            yield self.images[idx], self.labels[idx]

    def state_dict(self) -> dict[str, int]:
        return {"position": self.position}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.position = int(state["position"])
