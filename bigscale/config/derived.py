"""Values derived from the config, computed in one place that the launcher and the ranks share.

``bigscale plan`` prints a ``RunShape``; every rank builds the same one from the same inputs (the
config, the world size and the tokenized training data, which the launcher leaves in the
tokenization cache for the ranks to reuse) and trains by it. Nothing here is written back into
the config: ``trainer.max_steps`` stays what the user set, and with ``trainer.epochs`` the steps
the run takes are ``RunShape.max_steps``."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from bigscale.config.schema import OptimConfig, TrainConfig
from bigscale.dist.layout import data_parallel_size
from bigscale.errors import ConfigError


@dataclass(frozen=True)
class DataStats:
    """What the tokenized training split tells about the run's shape."""

    rows: int
    """Rows the sampler draws from: examples, or packed rows with ``data.packing``."""
    longest: int
    """Tokens in the longest row (with packing, rows are padded to ``data.max_length``)."""
    packed: bool
    validation_rows: int | None = None
    """Rows of the validation split, where the plan tokenized it (DPO's reference pass scores
    them too); None where not counted."""

    @classmethod
    def of(cls, train: Any, packed: bool) -> DataStats:
        """From a tokenized ``datasets.Dataset``. The longest row is read from the arrow table
        behind it, without decoding a row: an upper bound when an index mapping (a mixture's
        interleave) selects only some of the table's rows, exact otherwise."""
        import pyarrow.compute as pc

        rows = len(train)
        longest = 0
        if rows:
            lengths = pc.list_value_length(train.data.column("input_ids"))
            longest = int(pc.max(lengths).as_py() or 0)
        return cls(rows=rows, longest=longest, packed=packed)

    @property
    def unit(self) -> str:
        return "packed rows" if self.packed else "examples"


@dataclass(frozen=True)
class RunShape:
    """How many sequences a step takes and how many steps the run has."""

    world_size: int
    global_batch: int
    """Sequences per optimizer step (``TrainerConfig.global_batch``)."""
    max_steps: int
    steps_from: str
    """Where ``max_steps`` comes from, for the plan and the rank's log."""
    data: DataStats | None = None
    """The training data's counts; None when not known (a stream, or a plan that did not
    tokenize because nothing needed it)."""
    warmup_steps: int = 0
    """Warmup steps of the lr schedule (``warmup_for``): ``optim.warmup_steps``, or
    ``optim.warmup_ratio`` of ``max_steps``."""

    def steps_text(self) -> str:
        """``37 (from trainer.epochs=2: ...)``: the same words in the plan and a rank's log."""
        return f"{self.max_steps} ({self.steps_from})"


def derive(cfg: TrainConfig, world_size: int, data: DataStats | None) -> RunShape:
    """The run's shape; with ``trainer.epochs`` the data's counts are required and
    ``optim.warmup_steps`` is checked against the steps they make."""
    t = cfg.trainer
    # The ranks of one sequence- or tensor-parallel group share a batch: only replicas count.
    dp = data_parallel_size(cfg.strategy, world_size)
    batch = t.global_batch(dp)
    if t.epochs is None:
        warmup = warmup_for(cfg.optim, t.max_steps)
        return RunShape(world_size, batch, t.max_steps, "trainer.max_steps", data, warmup)
    if data is None:
        raise ValueError("trainer.epochs needs the training data's counts")
    steps, per_rank, batches = epoch_steps(
        t.epochs, data.rows, dp, t.micro_batch_size, t.grad_accum, data.packed
    )
    warmup = warmup_for(cfg.optim, steps)
    if warmup >= steps:
        raise ConfigError(
            f"trainer.epochs={t.epochs:g} makes {steps} optimizer steps ({data.rows} "
            f"{data.unit}, {batch} per step), no more than "
            f"{warmup} warmup steps ({_warmup_source(cfg.optim)}); lower the warmup or raise "
            "trainer.epochs"
        )
    reason = (
        f"from trainer.epochs={t.epochs:g}: {data.rows} {data.unit} / {dp} ranks = "
        f"{per_rank} per rank = {batches} micro batches of {t.micro_batch_size}, "
        f"{t.grad_accum} per step"
    )
    return RunShape(world_size, batch, steps, reason, data, warmup)


def warmup_for(optim: OptimConfig, max_steps: int) -> int:
    """Warmup steps for a run of ``max_steps``: ``optim.warmup_steps``, or
    ``ceil(optim.warmup_ratio x max_steps)`` (validation allows only one of them). The plan,
    the rank's ``RunShape`` and the lr schedule all ask here."""
    if optim.warmup_ratio > 0:
        return math.ceil(optim.warmup_ratio * max_steps)
    return optim.warmup_steps


def _warmup_source(optim: OptimConfig) -> str:
    if optim.warmup_ratio > 0:
        return f"optim.warmup_ratio={optim.warmup_ratio:g}"
    return f"optim.warmup_steps={optim.warmup_steps}"


def epoch_steps(
    epochs: float,
    rows: int,
    world_size: int,
    micro_batch_size: int,
    grad_accum: int,
    packed: bool = False,
) -> tuple[int, int, int]:
    """(optimizer steps, rows per rank and epoch, micro batches per rank and epoch) for
    ``epochs`` passes, counted as the sampler and loader take the data: each rank gets
    ``rows // world_size`` rows (the tail is dropped so all ranks take the same count), in
    micro batches of ``micro_batch_size`` (the last one possibly short); a step accumulates
    ``grad_accum`` of them, as Hugging Face's ``num_train_epochs`` counts."""
    per_rank = rows // world_size
    if rows and not per_rank:
        from bigscale.data.pipeline import too_few_rows

        raise too_few_rows("training", rows, world_size, packed)
    batches = -(-per_rank // micro_batch_size)
    return max(1, math.ceil(epochs * batches / grad_accum)), per_rank, batches
