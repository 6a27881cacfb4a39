"""The trainer's data: the training and validation loaders built from the config, and the
training batches, which continue from the position a checkpoint saved."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from transformers.tokenization_utils_base import PreTrainedTokenizerBase

from bigscale.config.derived import DataStats
from bigscale.config.schema import TrainConfig
from bigscale.data.pipeline import build_datasets, build_loader
from bigscale.data.shard import shard_batch
from bigscale.dist.env import DistEnv
from bigscale.dist.layout import layout_of
from bigscale.logging import get_logger
from bigscale.train.state import TrainState

log = get_logger(__name__)


class DataFeed:
    def __init__(
        self,
        cfg: TrainConfig,
        env: DistEnv,
        tokenizer: PreTrainedTokenizerBase,
        run_dir: Path,
    ):
        self.cfg, self.env = cfg, env
        self.layout = layout_of(cfg.strategy, env.world_size)
        shard = (self.layout.dp_rank(env.rank), self.layout.dp)
        t = cfg.trainer
        self.data = build_datasets(cfg.data, tokenizer, env, t.seed, cache_dir(cfg, run_dir))
        self.stream = self.data.stream
        """With ``data.streaming``, the stream that yields the training batches; else None."""
        self._log_report()
        if self.data.train is not None:
            self.train_loader, self.sampler = build_loader(
                self.data.train,
                self.data.collate,
                env,
                t.micro_batch_size,
                t.seed,
                t.num_workers,
                shuffle=True,
                packed=self.data.packed,
                shard=shard,
            )
        self.validation = build_loader(
            self.data.validation,
            self.data.collate,
            env,
            t.micro_batch_size,
            t.seed,
            t.num_workers,
            shuffle=False,
            split="validation",
            packed=self.data.packed,
            shard=shard,
        )[0]  # whole sequences: evaluation does not split them (sequence_parallel.py)

    @property
    def stats(self) -> DataStats | None:
        """The training split's counts (None for a stream), which the run's shape is derived
        from exactly as the launcher's plan derived it."""
        if self.data.train is None:
            return None
        return DataStats.of(self.data.train, self.data.packed)

    def batches(self, position: TrainState) -> Iterator[dict[str, torch.Tensor]]:
        """Micro batches forever, from ``position``, which they keep up to date."""
        if self.stream is not None:
            return self._sliced(self.stream.batches(position, self.cfg.trainer.micro_batch_size))
        return self._sliced(self._sampled_batches(position))

    def _sliced(self, batches: Any) -> Any:
        """Under sequence parallelism, each rank's slice of the batches; else the batches."""
        if self.layout.sp == 1:
            return batches
        return SequenceSlices(batches, self.layout.sp_rank(self.env.rank), self.layout.sp)

    def _sampled_batches(self, pos: TrainState) -> Iterator[dict[str, torch.Tensor]]:
        """Epoch after epoch, starting where the state says: a resumed run continues mid-epoch
        right after the last sample all ranks had taken, on any number of ranks, skipping
        nothing and repeating nothing."""
        mbs, ranks = self.cfg.trainer.micro_batch_size, self.layout.dp
        while True:
            start = pos.samples_in_epoch
            self.sampler.load_state_dict({"epoch": pos.epoch, "start": start, "consumed": 0})
            share = len(self.sampler)  # what each rank takes of the rest of the epoch
            if start and not share:
                pos.epoch, pos.samples_in_epoch = pos.epoch + 1, 0
                continue
            taken = 0
            for batch in self.train_loader:
                # Every rank takes the same count (the sampler sees to it), the last batch of
                # an epoch possibly short.
                taken = min(taken + mbs, share)
                pos.samples_in_epoch = start + taken * ranks
                yield batch
            pos.epoch, pos.samples_in_epoch = pos.epoch + 1, 0

    def _log_report(self) -> None:
        if self.stream is not None:
            return  # a stream's counts are not known ahead; build_stream logs what is
        r = self.data.report
        log.info(
            "data: %d of %d training examples kept (%d truncated to data.max_length=%d, %d "
            "dropped as too long, %d dropped with no loss tokens); %s tokens, %s with loss; "
            "%d validation examples",
            r.examples_out,
            r.examples_in,
            r.truncated,
            self.cfg.data.max_length,
            r.dropped_overlong,
            r.dropped_no_loss,
            f"{r.tokens:,}",
            f"{r.loss_tokens:,}",
            len(self.data.validation),
        )


class SequenceSlices:
    """This rank's slice of every training batch of ``batches``."""

    def __init__(self, batches: Any, sp_rank: int, sp: int):
        self.batches, self.sp_rank, self.sp = batches, sp_rank, sp

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        return self

    def __next__(self) -> dict[str, torch.Tensor]:
        return shard_batch(next(self.batches), self.sp_rank, self.sp)


def cache_dir(cfg: TrainConfig, run_dir: Path) -> Path:
    """The tokenization cache; the launcher's plan fills the same one the ranks read."""
    if cfg.data.cache_dir:
        return Path(cfg.data.cache_dir)
    # Next to the run directories of the experiment, so later runs reuse the tokenization.
    return run_dir.parent / ".tokenized"
