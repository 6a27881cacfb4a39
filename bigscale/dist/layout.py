"""How the ranks of a job split into data-, sequence- and tensor-parallel groups.

One object answers every question about the layout, so the sampler, the metrics, the loss and the
checkpoints cannot disagree on it. Ranks are numbered with the model-parallel axis innermost:
the ``sp * tp`` ranks of one model replica are consecutive (``rank // (sp * tp)`` is the
data-parallel rank), so with ``launcher.nproc_per_node`` a multiple of ``sp * tp`` a replica's
all-to-all (sequence) or all-reduce (tensor) traffic stays inside a node and only the gradient
reduction between replicas crosses nodes. DeepSpeed builds its sequence-parallel groups the same
way (``parallel_state_sp``: consecutive ranks).

Pure Python: the launcher validates a layout before any rank starts.
"""

from __future__ import annotations

from dataclasses import dataclass

from bigscale.config.schema import StrategyConfig


@dataclass(frozen=True)
class ParallelLayout:
    world_size: int
    sp: int = 1
    """Sequence-parallel size: ranks that share one sequence (Ulysses)."""
    tp: int = 1
    """Tensor-parallel size: ranks that share every weight matrix (AutoTP)."""

    def __post_init__(self) -> None:
        # The config validation words these for the user; this guards programming errors.
        if self.sp < 1 or self.tp < 1 or self.world_size % (self.sp * self.tp):
            raise ValueError(f"world {self.world_size} does not split into sp={self.sp} x tp={self.tp}")

    @property
    def replica(self) -> int:
        """Ranks that together hold one copy of the model and one micro batch."""
        return self.sp * self.tp

    @property
    def dp(self) -> int:
        """Data-parallel size: model replicas, each on its own share of the data."""
        return self.world_size // self.replica

    def dp_rank(self, rank: int) -> int:
        """Which share of the data ``rank`` reads: the ranks of one replica read the same."""
        return rank // self.replica

    def sp_rank(self, rank: int) -> int:
        """Which slice of the sequence ``rank`` computes (0 without sequence parallelism)."""
        return (rank % self.replica) // self.tp

    def tp_rank(self, rank: int) -> int:
        return rank % self.tp

    def replica_ranks(self, rank: int) -> list[int]:
        first = self.dp_rank(rank) * self.replica
        return list(range(first, first + self.replica))

    def sp_groups(self) -> list[list[int]]:
        """Every sequence-parallel group, as DeepSpeed's ``parallel_state_sp`` builds them."""
        return [list(range(i, i + self.sp)) for i in range(0, self.world_size, self.sp)]

    def counts_data(self, rank: int) -> bool:
        """Whether ``rank`` counts its batch's tokens and samples: one rank per replica, so a
        sequence split across ranks or a batch seen by a whole tensor group counts once."""
        return rank % self.replica == 0

    @property
    def loss_divisor(self) -> int:
        """The sum of every rank's loss divided by this is the mean loss of the step: sequence
        ranks hold parts that add up to their sequence's loss, tensor ranks hold copies."""
        return self.world_size // self.sp

    def describe(self) -> str:
        parts = [f"{self.dp} data-parallel"]
        if self.sp > 1:
            parts.append(f"{self.sp} sequence-parallel")
        if self.tp > 1:
            parts.append(f"{self.tp} tensor-parallel")
        return " x ".join(parts) + f" = {self.world_size} ranks"


def layout_of(strategy: StrategyConfig, world_size: int) -> ParallelLayout:
    return ParallelLayout(
        world_size, sp=strategy.sequence_parallel_size, tp=strategy.tensor_parallel_size
    )


def data_parallel_size(strategy: StrategyConfig, world_size: int) -> int:
    """Model replicas among ``world_size`` ranks; the global batch is counted over these. A
    layout that does not divide (refused by validation) counts as pure data parallel here."""
    replica = max(1, strategy.sequence_parallel_size) * max(1, strategy.tensor_parallel_size)
    return world_size // replica if world_size % replica == 0 else world_size
