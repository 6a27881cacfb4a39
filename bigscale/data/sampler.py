"""A distributed sampler that can stop mid-epoch and resume at the same sample."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from torch.utils.data import Sampler


class ResumableDistributedSampler(Sampler[int]):
    """Each rank's share of a seeded per-epoch permutation, with a resumable position.

    Every rank draws the same permutation (``seed + epoch``), cut to a multiple of ``world_size``
    so all ranks yield the same count (the tail is dropped), and rank ``r`` takes ``r::world_size``.
    ``consumed`` counts what this rank has yielded in the current epoch; ``state_dict`` /
    ``load_state_dict`` carry ``epoch`` and ``consumed`` so a restored sampler yields exactly the
    rest of the epoch.

    ``start`` (0 unless restored) skips that many positions of the permutation first: the ranks
    share out only what follows, the same way. The first ``n`` positions of an epoch's order do
    not depend on the world size, so a run resumed on another number of ranks sets ``start`` to
    the samples all ranks together had consumed and continues with the very next one.

    Epochs: ``set_epoch(e)`` with a new epoch starts it from the beginning; iterating again after
    a finished epoch moves to the next one by itself, so a step-based loop may simply re-iterate.
    After ``load_state_dict``, take the epoch from ``sampler.epoch``.

    ``consumed`` advances as the DataLoader draws indices. With ``num_workers=0`` that is exactly
    what the training loop has received; with workers the loader draws ahead (prefetch), so a
    checkpoint should store the count the loop actually consumed instead.
    """

    def __init__(
        self, num_samples: int, rank: int, world_size: int, seed: int, shuffle: bool = True
    ) -> None:
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in a world of size {world_size}")
        self.num_samples = num_samples
        self.rank = rank
        self.world_size = world_size
        self.seed = seed
        self.shuffle = shuffle
        self.epoch = 0
        self.start = 0
        self.consumed = 0

    def __len__(self) -> int:
        """Samples this rank yields in a full epoch (after ``start``)."""
        return max(0, self.num_samples - self.start) // self.world_size

    def _indices(self) -> list[int]:
        end = self.start + len(self) * self.world_size
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed + self.epoch)
            order = torch.randperm(self.num_samples, generator=g)[:end].tolist()
        else:
            order = list(range(end))
        return order[self.start + self.rank : end : self.world_size]

    def __iter__(self) -> Iterator[int]:
        if self.consumed >= len(self) > 0:
            self.epoch += 1
            self.start = self.consumed = 0
        indices = self._indices()
        while self.consumed < len(indices):
            index = indices[self.consumed]
            self.consumed += 1
            yield index

    def set_epoch(self, epoch: int) -> None:
        """Start ``epoch`` from its beginning; the current epoch again keeps the position."""
        if epoch != self.epoch:
            self.epoch = epoch
            self.start = self.consumed = 0

    def state_dict(self) -> dict[str, int]:
        state = {"epoch": self.epoch, "consumed": self.consumed}
        if self.start:
            state["start"] = self.start
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.epoch = int(state["epoch"])
        self.start = int(state.get("start", 0))
        self.consumed = int(state["consumed"])
