"""Datasets and loaders for a training run, prepared once per job and shared through a cache.

One rank tokenizes (and packs) into cache files named by ``cache_key`` (``bigscale.data.cache``
says which rank, and how the others wait without a collective); the others then make the same
calls, which find those files instead of redoing the work. A run with ``data.streaming=true``
skips all that: each rank reads its share of the stream (``bigscale.data.streaming``).

Cache keys name the data by content (``files_fingerprint``), the tokenizer and the processing
settings, so a copied corpus reuses its cache and an edited one gets a new one.
"""

from __future__ import annotations

import functools
import hashlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import datasets
import torch
from torch.utils.data import DataLoader

from bigscale.config.schema import DataConfig, DataStyle
from bigscale.data.cache import build_once, cache_root
from bigscale.data.collate import pack_collate, pack_examples, pad_collate
from bigscale.data.mixture import (
    Source,
    files_fingerprint,
    interleave,
    mixture_sources,
    validation_source,
)
from bigscale.data.pair_packing import pack_pair_collate
from bigscale.data.preference import pair_collate, tokenize_pairs
from bigscale.data.sampler import ResumableDistributedSampler
from bigscale.data.sources import is_hub, load_raw, resolve_files
from bigscale.data.tokenize import TokenizeReport, cache_key, tokenize_split
from bigscale.dist.env import DistEnv
from bigscale.errors import DataError
from bigscale.logging import get_logger

if TYPE_CHECKING:
    from bigscale.data.streaming import TrainStream

log = get_logger(__name__)

Collate = Callable[[list[dict[str, Any]]], dict[str, torch.Tensor]]


@dataclass
class DataBundle:
    train: datasets.Dataset | None
    """None when streaming: ``stream`` yields the training batches instead."""
    validation: datasets.Dataset
    """May be empty (``data.validation_fraction=0`` and no ``validation_path``)."""
    collate: Collate
    report: TokenizeReport
    """What tokenization kept of the training split (all zero when streaming: not known)."""
    validation_report: TokenizeReport = field(default_factory=TokenizeReport)
    packed: bool = False
    """Rows hold several documents (and carry ``position_ids``)."""
    stream: TrainStream | None = None
    data_ids: dict[str, str] = field(default_factory=dict)
    """Content key of each source's data by config key (``data.path``, ``data.mixture[0].path``),
    as the cache names it; a resume compares them (see ``checkpoint.compat``)."""


def pad_token_id(tokenizer: Any) -> int:
    """Id used for padding; its value never matters (masked, label -100), so fall back freely."""
    for pad in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if pad is not None:
            return int(pad)
    return 0


def make_collate(cfg: DataConfig, tokenizer: Any) -> Collate:
    pad_id = pad_token_id(tokenizer)
    if DataStyle(cfg.style) is DataStyle.preference:
        if cfg.packing:  # packed per micro batch, so a step sees the same pairs as unpacked
            return functools.partial(pack_pair_collate, pad_id=pad_id, max_length=cfg.max_length)
        return functools.partial(pair_collate, pad_id=pad_id)
    if cfg.packing:
        return functools.partial(pack_collate, pad_id=pad_id, max_length=cfg.max_length)
    return functools.partial(pad_collate, pad_id=pad_id)


def empty_split() -> datasets.Dataset:
    """A split with no examples and the tokenized columns (no held-out data, say)."""
    return datasets.Dataset.from_dict({"input_ids": [], "labels": []})


def add_reports(reports: list[TokenizeReport]) -> TokenizeReport:
    total = TokenizeReport()
    for r in reports:
        for k, v in r.as_dict().items():
            setattr(total, k, getattr(total, k) + v)
    return total


def _data_id(cfg: DataConfig, raw: datasets.Dataset) -> str:
    # Hub datasets: datasets' fingerprint follows the dataset's revision, which is its content.
    return raw._fingerprint if is_hub(cfg) else files_fingerprint(resolve_files(cfg.path))


class _Preparer:
    """Tokenizes every source's splits into the cache; ``info`` carries the data ids the
    builder computed, so the other ranks need not hash the files again."""

    def __init__(self, cfg: DataConfig, tokenizer: Any, seed: int, cache: Path, info: dict | None):
        self.cfg, self.tokenizer, self.seed, self.cache = cfg, tokenizer, seed, cache
        self.waiting = info is not None
        self.ids: dict[str, str] = dict((info or {}).get("ids", {}))

    def _tokenized(
        self, ds: datasets.Dataset, cfg: DataConfig, data_id: str, extra: str
    ) -> tuple[datasets.Dataset, TokenizeReport, str]:
        if len(ds) == 0:  # no held-out data: an empty split with the tokenized columns
            return empty_split(), TokenizeReport(), ""
        pairs = DataStyle(cfg.style) is DataStyle.preference
        if pairs:  # the pair fields are not among the SFT fields the key already names
            extra += f"|pairs:{cfg.prompt_field},{cfg.chosen_field},{cfg.rejected_field}"
        key = cache_key(ds, self.tokenizer, cfg, extra=extra, data_id=data_id)
        path = self.cache / f"{key}.arrow"
        if path.is_file():
            log.info("tokenized cache hit: %s", path)
        elif self.waiting:
            log.warning(
                "no tokenized cache at %s although the builder rank finished; tokenizing here. "
                "Is data.cache_dir on a filesystem every node mounts? If not, set "
                "data.cache_scope=node",
                path,
            )
        else:
            log.info("Tokenizing %d examples into %s", len(ds), path)
        tokenize = tokenize_pairs if pairs else tokenize_split
        out, report = tokenize(ds, self.tokenizer, cfg, str(path), key=key)
        return out, report, key

    def _id(self, key: str, compute: Callable[[], str]) -> str:
        """The data id under ``key``: the builder's, when it sent them, else computed once."""
        if key not in self.ids:
            self.ids[key] = compute()
        return self.ids[key]

    def source(self, source: Source) -> dict[str, tuple[datasets.Dataset, TokenizeReport, str]]:
        cfg = source.cfg
        raw = load_raw(cfg, self.seed, cache_dir=self.cache / "raw")
        data_id = self._id(source.key, lambda: _data_id(cfg, raw["train"]))
        held_out = not cfg.validation_path and cfg.validation_fraction > 0
        split = f"{cfg.validation_fraction}@{self.seed}" if held_out else "all"
        out = {"train": self._tokenized(raw["train"], cfg, data_id, f"train|{split}")}
        if cfg.validation_path:
            path = cfg.validation_path
            val_id = self._id(
                "data.validation_path", lambda: files_fingerprint(resolve_files(path))
            )
            out["validation"] = self._tokenized(raw["validation"], cfg, val_id, "validation")
        else:
            out["validation"] = self._tokenized(
                raw["validation"], cfg, data_id, f"validation|{split}"
            )
        return out

    def shared_validation(self) -> tuple[datasets.Dataset, TokenizeReport, str]:
        """A mixture's ``data.validation_path``: read like a source of its own."""
        cfg = validation_source(self.cfg).cfg
        raw = load_raw(cfg, self.seed, cache_dir=self.cache / "raw")["train"]
        val_id = self._id("data.validation_path", lambda: _data_id(cfg, raw))
        return self._tokenized(raw, cfg, val_id, "validation")

    def bundle(self) -> DataBundle:
        self.cache.mkdir(parents=True, exist_ok=True)
        sources = mixture_sources(self.cfg)
        parts = [self.source(s) for s in sources]
        trains = [p["train"] for p in parts]
        vals = [p["validation"] for p in parts]
        if self.cfg.mixture and self.cfg.validation_path:
            vals = [self.shared_validation()]
        train_key = _joint_key([t[2] for t in trains], [s.weight for s in sources], self.seed)
        train = interleave([t[0] for t in trains], sources, self.seed)
        vals = [v for v in vals if len(v[0])]
        val_key = _joint_key([v[2] for v in vals], [], 0)
        validation = datasets.concatenate_datasets([v[0] for v in vals]) if vals else empty_split()
        # Pairs are packed by their collate, per micro batch; the split stays one row per pair.
        packed = self.cfg.packing and DataStyle(self.cfg.style) is not DataStyle.preference
        if packed:
            train = self._pack(train, train_key)
            validation = self._pack(validation, val_key)
        return DataBundle(
            train,
            validation,
            make_collate(self.cfg, self.tokenizer),
            add_reports([t[1] for t in trains]),
            add_reports([v[1] for v in vals]),
            packed,
        )

    def _pack(self, ds: datasets.Dataset, key: str) -> datasets.Dataset:
        if len(ds) == 0:
            return ds
        return pack_examples(ds, self.cfg.max_length, str(self.cache / f"{key}.packed.arrow"))


def _joint_key(keys: list[str], weights: list[float], seed: int) -> str:
    """One source's own key, or a key for the mixture of several (weights and seed matter)."""
    if len(keys) == 1:
        return keys[0]
    text = "|".join([*keys, *map(str, weights), str(seed), "all_exhausted"])
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def _prepare(
    cfg: DataConfig, tokenizer: Any, seed: int, cache: Path, info: dict | None
) -> tuple[DataBundle, dict]:
    prep = _Preparer(cfg, tokenizer, seed, cache, info)
    bundle = prep.bundle()
    bundle.data_ids = dict(prep.ids)
    return bundle, {"ids": prep.ids}


def build_datasets(
    cfg: DataConfig, tokenizer: Any, env: DistEnv, seed: int, cache_dir: Path
) -> DataBundle:
    """Train/validation datasets and collate function, tokenized once for the whole job.

    One rank tokenizes while the others wait on a marker file rather than a collective, so a
    dataset that takes hours to tokenize cannot trip ``dist.timeout_minutes``; if that rank
    fails, every rank raises a DataError with its message. ``data.streaming=true``: nothing is
    tokenized ahead; ``bundle.stream`` reads this rank's share.
    """
    if cfg.streaming:
        from bigscale.data.streaming import build_stream

        return build_stream(cfg, tokenizer, env, seed)
    cache = cache_root(Path(cache_dir), cfg.cache_scope)
    distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
    if not distributed:
        return _prepare(cfg, tokenizer, seed, cache, None)[0]
    return build_once(
        env, cfg.cache_scope, cache, lambda info: _prepare(cfg, tokenizer, seed, cache, info)
    )


def too_few_rows(split: str, rows: int, ranks: int, packed: bool) -> DataError:
    """Every rank needs at least one row of each split; say which split fell short, when it was
    counted, and what makes it larger."""
    after = (
        "tokenizing and packing" if packed else "tokenizing (and dropping what data.overlong drops)"
    )
    fixes = ["more data"]
    if packed:
        fixes.insert(0, "a smaller data.max_length (packing puts fewer tokens in each row)")
    if split == "validation":
        fixes = [
            *fixes[:-1],
            "a larger data.validation_fraction",
            "a larger data.validation_path file (or data.validation_examples when streaming)",
            "more data",
        ]
    return DataError(
        f"the {split} split has {rows} row(s) after {after}, fewer than the {ranks} "
        f"data-parallel ranks, and each rank needs at least one. Give it more rows: "
        f"{', '.join(fixes)}; or run on fewer ranks."
    )


def build_loader(
    ds: datasets.Dataset,
    collate: Collate,
    env: DistEnv,
    micro_batch_size: int,
    seed: int,
    num_workers: int,
    shuffle: bool,
    split: str = "training",
    packed: bool = False,
    shard: tuple[int, int] | None = None,
) -> tuple[DataLoader, ResumableDistributedSampler]:
    """A loader over this rank's share of ``ds``, and its sampler (for epochs and resuming).
    ``split`` and ``packed`` only word the error for a split smaller than the ranks. ``shard``
    (data-parallel rank, size; default: this rank of the world) names the share: the ranks of
    one sequence- or tensor-parallel group read the same one."""
    rank, ranks = shard or (env.rank, env.world_size)
    sampler = ResumableDistributedSampler(
        len(ds), rank=rank, world_size=ranks, seed=seed, shuffle=shuffle
    )
    if len(ds) > 0 and len(sampler) == 0:
        raise too_few_rows(split, len(ds), ranks, packed)
    loader = DataLoader(
        ds,
        batch_size=micro_batch_size,
        sampler=sampler,
        collate_fn=collate,
        num_workers=num_workers,
        drop_last=False,
        persistent_workers=num_workers > 0,
        # Page-locked batches let the forward's non_blocking copy to the GPU overlap compute.
        pin_memory=torch.cuda.is_available(),
        # Every new loader iterator draws a seed for its workers; from its own generator, not
        # the global one, so evaluation or a restart never shifts the dropout masks of training.
        generator=torch.Generator().manual_seed(seed + rank),
    )
    return loader, sampler
