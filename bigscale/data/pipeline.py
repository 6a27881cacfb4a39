"""Datasets and loaders for a training run, prepared once per job and shared through a cache.

Global rank 0 loads, tokenizes (and packs) into cache files named by ``cache_key``; the other
ranks wait, then make the same calls, which find those files instead of redoing the work. Ranks
on nodes that do not share ``cache_dir`` redo it themselves, with identical results.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import datasets
import torch
from torch.utils.data import DataLoader

from bigscale.config.schema import DataConfig
from bigscale.data.collate import pack_collate, pack_examples, pad_collate
from bigscale.data.sampler import ResumableDistributedSampler
from bigscale.data.sources import load_raw
from bigscale.data.tokenize import TokenizeReport, cache_key, tokenize_split
from bigscale.dist.env import DistEnv
from bigscale.errors import DataError


@dataclass
class DataBundle:
    train: datasets.Dataset
    validation: datasets.Dataset
    """May be empty (``data.validation_fraction=0`` and no ``validation_path``)."""
    collate: Callable[[list[dict[str, Any]]], dict[str, torch.Tensor]]
    report: TokenizeReport
    """What tokenization kept of the training split."""
    validation_report: TokenizeReport = field(default_factory=TokenizeReport)
    packed: bool = False
    """Rows hold several documents (and carry ``position_ids``)."""


def pad_token_id(tokenizer: Any) -> int:
    """Id used for padding; its value never matters (masked, label -100), so fall back freely."""
    for pad in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if pad is not None:
            return int(pad)
    return 0


def _prepare(cfg: DataConfig, tokenizer: Any, seed: int, cache_dir: Path) -> DataBundle:
    cache_dir.mkdir(parents=True, exist_ok=True)
    raw = load_raw(cfg, seed, cache_dir=cache_dir / "raw")

    def tokenized(split: str) -> tuple[datasets.Dataset, TokenizeReport]:
        ds = raw[split]
        if len(ds) == 0:  # no held-out data: an empty split with the tokenized columns
            return datasets.Dataset.from_dict({"input_ids": [], "labels": []}), TokenizeReport()
        key = cache_key(ds, tokenizer, cfg)
        out, report = tokenize_split(ds, tokenizer, cfg, str(cache_dir / f"{key}.arrow"), key=key)
        if cfg.packing:
            out = pack_examples(
                out, cfg.max_length, cache_file=str(cache_dir / f"{key}.packed.arrow")
            )
        return out, report

    train, report = tokenized("train")
    validation, validation_report = tokenized("validation")
    pad_id = pad_token_id(tokenizer)
    collate: Callable[[list[dict[str, Any]]], dict[str, torch.Tensor]]
    if cfg.packing:
        collate = functools.partial(pack_collate, pad_id=pad_id, max_length=cfg.max_length)
    else:
        collate = functools.partial(pad_collate, pad_id=pad_id)
    return DataBundle(train, validation, collate, report, validation_report, cfg.packing)


def _broadcast_outcome(error: str | None) -> str | None:
    """Rank 0's error message (or None) on every rank; also the point where the others wait."""
    box = [error]
    torch.distributed.broadcast_object_list(box, src=0)
    return box[0]


def build_datasets(
    cfg: DataConfig, tokenizer: Any, env: DistEnv, seed: int, cache_dir: Path
) -> DataBundle:
    """Train/validation datasets and collate function, tokenized once for the whole job.

    If rank 0 fails, every rank raises (a DataError with rank 0's message) instead of waiting.
    The wait is bounded by the process group's timeout, so a very large dataset needs a generous
    ``init_process_group(timeout=...)`` or tokenizing ahead of time.
    """
    distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
    if not distributed:
        return _prepare(cfg, tokenizer, seed, Path(cache_dir))

    if env.is_main:
        try:
            bundle = _prepare(cfg, tokenizer, seed, Path(cache_dir))
        except DataError as e:
            _broadcast_outcome(str(e))
            raise
        except BaseException as e:
            _broadcast_outcome(f"rank 0 failed while preparing data: {type(e).__name__}: {e}")
            raise
        _broadcast_outcome(None)
        return bundle

    error = _broadcast_outcome(None)
    if error is not None:
        raise DataError(error)
    return _prepare(cfg, tokenizer, seed, Path(cache_dir))


def build_loader(
    ds: datasets.Dataset,
    collate: Callable[[list[dict[str, Any]]], dict[str, torch.Tensor]],
    env: DistEnv,
    micro_batch_size: int,
    seed: int,
    num_workers: int,
    shuffle: bool,
) -> tuple[DataLoader, ResumableDistributedSampler]:
    """A loader over this rank's share of ``ds``, and its sampler (for epochs and resuming)."""
    sampler = ResumableDistributedSampler(
        len(ds), rank=env.rank, world_size=env.world_size, seed=seed, shuffle=shuffle
    )
    if len(ds) > 0 and len(sampler) == 0:
        raise DataError(
            f"the dataset has {len(ds)} rows, fewer than the {env.world_size} data-parallel "
            "ranks; add data or use fewer ranks."
        )
    loader = DataLoader(
        ds,
        batch_size=micro_batch_size,
        sampler=sampler,
        collate_fn=collate,
        num_workers=num_workers,
        drop_last=False,
        persistent_workers=num_workers > 0,
        # Every new loader iterator draws a seed for its workers; from its own generator, not
        # the global one, so evaluation or a restart never shifts the dropout masks of training.
        generator=torch.Generator().manual_seed(seed + env.rank),
    )
    return loader, sampler
