"""Training data read as a stream (``data.streaming=true``): corpora larger than disk or memory.

Each rank reads its share of every source (``datasets``' ``split_dataset_by_node``: whole files
when their count divides by the ranks, else every n-th example), tokenizes it on the fly with the
map-style path's function (same overlong and no-loss rules), interleaves the sources by weight,
and cuts the result into windows of ``data.stream_buffer`` examples, each shuffled (seeded) and,
with ``data.packing``, packed by ``_pack_batch`` like the map-style data.

Every rank's stream repeats forever, epoch after epoch (``set_epoch`` reshuffles a mixture), so
every rank always has a next micro batch: under ZeRO-3 a forward is a collective, and ranks whose
shares differ in length must still take the same number of steps.

Position, per rank: the epoch, the window, the dataset's ``state_dict()`` at that window's start
and the rows of the window already taken. Resuming re-reads that window, packs it again (the same
rows: packing and shuffling depend only on the window and the seed) and skips what was taken, so
a resumed run sees exactly the rows the uninterrupted one would. The position describes one
rank's share, so a run resumes only on the same number of ranks.

Validation: the first ``data.validation_examples`` examples of ``data.validation_path``, or of
each source when there is none, read into memory. A source's held-out examples are then skipped
by every rank's share of that source: each rank skips the first ``validation_examples`` of its
share, which includes every held-out example it holds (and, with several ranks, a few more).
"""

from __future__ import annotations

import itertools
import json
import random
from collections.abc import Iterator
from typing import Any, Protocol

import datasets
from datasets.distributed import split_dataset_by_node

from bigscale.config.schema import DataConfig
from bigscale.data.collate import _pack_batch, pack_examples
from bigscale.data.jsonfiles import load_json
from bigscale.data.mixture import Source, interleave, mixture_sources, validation_source
from bigscale.data.pipeline import Collate, DataBundle, add_reports, empty_split, make_collate
from bigscale.data.sources import _builder_for, _local_files, check_columns, is_hub, required_fields
from bigscale.data.tokenize import (
    _KEPT,
    _N_LOSS,
    _N_TOKENS,
    _STATUS,
    _TRUNCATED,
    ENCODED_FEATURES,
    TokenizeReport,
    _encode_batch,
    tokenize_split,
)
from bigscale.dist.env import DistEnv
from bigscale.errors import CheckpointError, DataError
from bigscale.logging import get_logger

log = get_logger(__name__)

_HELD_OUT = 100  # a status beside tokenize's: this rank skips the example (validation)


class Position(Protocol):
    """Where the stream's position is kept between checkpoints (``TrainState``)."""

    stream: str | None
    epoch: int


def load_stream(cfg: DataConfig, key: str) -> datasets.IterableDataset:
    if is_hub(cfg):
        try:
            return datasets.load_dataset(cfg.path, cfg.hub_config, split=cfg.split, streaming=True)
        except Exception as e:  # offline, unknown name, bad config: many exception types
            raise DataError(
                f"cannot stream hub dataset {key}={cfg.path!r} (config={cfg.hub_config!r}, "
                f"split={cfg.split!r}): {e}"
            ) from e
    files = _local_files(cfg.path, key)
    builder = _builder_for(files, cfg)
    if builder == "json":
        # Read by bigscale, so text stays text (Arrow's reader turns dates into timestamps).
        return load_json(files, cfg, required_fields(cfg), streaming=True)  # type: ignore[return-value]
    return datasets.load_dataset(
        builder, data_files=[str(f) for f in files], split="train", streaming=True
    )


def _columns(ds: datasets.IterableDataset, cfg: DataConfig, key: str) -> list[str]:
    """The stream's columns (from its features, else its first example), checked."""
    if ds.features is not None:
        columns = list(ds.features)
    else:
        first = next(iter(ds.take(1)), None)
        if first is None:
            raise DataError(f"{key}={cfg.path!r} holds no examples.")
        columns = list(first)
    check_columns(columns, cfg, f"{key}={cfg.path!r}")
    return columns


def _encode(
    batch: dict[str, list], indices: list[int], tokenizer: Any, cfg: DataConfig, skip: int
) -> dict[str, list]:
    out = _encode_batch(batch, indices, tokenizer, cfg)
    out[_STATUS] = [
        _HELD_OUT if i < skip else s for i, s in zip(indices, out[_STATUS], strict=True)
    ]
    return out


def _kept(status: list[int]) -> list[bool]:
    return [s in (_KEPT, _TRUNCATED) for s in status]


def _tokenized_stream(
    source: Source, tokenizer: Any, skip: int
) -> tuple[datasets.IterableDataset, datasets.IterableDataset]:
    """(raw, tokenized) streams of one source; the tokenized one skips ``skip`` examples of
    each rank's share (the map's index counts within the share once it is split)."""
    raw = load_stream(source.cfg, source.key)
    columns = _columns(raw, source.cfg, source.key)
    encoded = raw.map(
        _encode,
        batched=True,
        with_indices=True,
        fn_kwargs={"tokenizer": tokenizer, "cfg": source.cfg, "skip": skip},
        remove_columns=columns,
        # Declared, so that interleaving need not read ahead to learn them.
        features=ENCODED_FEATURES,
    )
    kept = encoded.filter(_kept, batched=True, input_columns=[_STATUS])
    return raw, kept.remove_columns([_STATUS, _N_TOKENS, _N_LOSS])


def _validation(
    cfg: DataConfig, tokenizer: Any, raws: list[tuple[Source, datasets.IterableDataset]]
) -> tuple[datasets.Dataset, TokenizeReport]:
    """The first ``validation_examples`` of the validation file or of each source, tokenized
    (and packed) in memory: small, the same on every rank."""
    n = cfg.validation_examples
    if cfg.validation_path:
        source = validation_source(cfg)
        raws = [(source, load_stream(source.cfg, source.key))]
    parts, reports = [], []
    for source, raw in raws:
        examples = list(raw.take(n)) if n else []
        if not examples:
            continue
        ds = datasets.Dataset.from_list(examples)
        tokenized, report = tokenize_split(ds, tokenizer, source.cfg, cache_file=None)
        parts.append(tokenized)
        reports.append(report)
    if not parts:
        return empty_split(), TokenizeReport()
    validation = datasets.concatenate_datasets(parts)
    if cfg.packing:
        validation = pack_examples(validation, cfg.max_length)
    return validation, add_reports(reports)


def build_stream(cfg: DataConfig, tokenizer: Any, env: DistEnv, seed: int) -> DataBundle:
    """This rank's training stream and the (in-memory) validation set."""
    sources = mixture_sources(cfg)
    raws, streams = [], []
    for source in sources:
        skip = 0 if cfg.validation_path else source.cfg.validation_examples
        raw, tokenized = _tokenized_stream(source, tokenizer, skip)
        raws.append((source, raw))
        streams.append(tokenized)
    mixed = interleave(streams, sources, seed)
    share = split_dataset_by_node(mixed, rank=env.rank, world_size=env.world_size)
    validation, validation_report = _validation(cfg, tokenizer, raws)
    log.info(
        "data: streaming %d source(s) (%d shard(s)), %d validation examples; counts of kept "
        "and dropped examples are not known ahead for a stream",
        len(sources),
        mixed.num_shards,
        validation_report.examples_out,
    )
    collate = make_collate(cfg, tokenizer)
    stream = TrainStream(share, cfg, collate, env, seed)
    return DataBundle(
        None, validation, collate, TokenizeReport(), validation_report, cfg.packing, stream
    )


class TrainStream:
    """This rank's training rows as micro batches, from a resumable position."""

    def __init__(
        self,
        ds: datasets.IterableDataset,
        cfg: DataConfig,
        collate: Collate,
        env: DistEnv,
        seed: int,
    ):
        self.ds, self.cfg, self.collate, self.env, self.seed = ds, cfg, collate, env, seed

    def check_world_size(self, saved_world_size: int) -> None:
        if saved_world_size != self.env.world_size:
            raise CheckpointError(
                f"the checkpoint holds {saved_world_size} ranks' positions in a streamed dataset "
                f"(data.streaming=true), this run has {self.env.world_size}: each rank's "
                "position is within its own share of the stream, which depends on the number "
                f"of ranks. Resume on {saved_world_size} ranks, or start a new run_dir"
            )

    def batches(self, state: Position, micro_batch_size: int) -> Iterator[dict[str, Any]]:
        """Micro batches forever; after each one ``state.stream`` holds the position right
        after it (nothing read ahead counts), ready for a checkpoint."""
        pos = json.loads(state.stream) if state.stream else self._fresh(0)
        rows = self._rows(pos)
        while True:
            batch = [next(rows) for _ in range(micro_batch_size)]
            state.stream = json.dumps(pos)
            state.epoch = pos["epoch"]
            yield self.collate(batch)

    def _fresh(self, epoch: int) -> dict[str, Any]:
        return {"epoch": epoch, "window": 0, "start": None, "taken": 0}

    def _rows(self, pos: dict[str, Any]) -> Iterator[dict[str, Any]]:
        while True:
            self.ds.set_epoch(pos["epoch"])
            if pos["start"] is not None:
                self.ds.load_state_dict(pos["start"])
            examples = iter(self.ds)
            fresh = pos["window"] == 0
            while window := list(itertools.islice(examples, self.cfg.stream_buffer)):
                rows = self._window_rows(window, pos["epoch"], pos["window"])
                for k in range(pos["taken"], len(rows)):
                    pos["taken"] = k + 1
                    yield rows[k]
                # The state after the window's last example: where the next window starts.
                pos.update(window=pos["window"] + 1, start=self.ds.state_dict(), taken=0)
            if fresh and pos["window"] == 0:
                raise DataError(
                    f"rank {self.env.rank}'s share of the streamed data is empty (no example "
                    "kept after tokenization and the held-out data.validation_examples="
                    f"{self.cfg.validation_examples}); add data, lower "
                    "data.validation_examples, check data.max_length and data.overlong, or use "
                    "fewer ranks"
                )
            pos.update(self._fresh(pos["epoch"] + 1))

    def _window_rows(self, window: list[dict], epoch: int, index: int) -> list[dict[str, Any]]:
        if self.cfg.packing:
            packed = _pack_batch(
                {
                    "input_ids": [e["input_ids"] for e in window],
                    "labels": [e["labels"] for e in window],
                },
                self.cfg.max_length,
            )
            rows = [dict(zip(packed, v, strict=True)) for v in zip(*packed.values(), strict=True)]
        else:
            rows = window
        # A string seed is hashed with SHA-512: the same order in every process and run.
        random.Random(f"{self.seed}|{self.env.rank}|{epoch}|{index}").shuffle(rows)
        return rows
