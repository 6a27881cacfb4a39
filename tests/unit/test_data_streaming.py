"""Streaming in one process: the same encoding as the map-style path, disjoint rank shares with
the held-out examples left out, exact resume from a checkpointed position (across windows and
epochs), and the refusals (another number of ranks; a schedule that needs a length)."""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import replace
from pathlib import Path

import pytest

from bigscale.config.schema import DataConfig, Overlong, TrainConfig
from bigscale.config.validate import Hardware, validate
from bigscale.data.pipeline import build_datasets
from bigscale.dist.env import DistEnv
from bigscale.errors import CheckpointError, ConfigError, DataError
from bigscale.train.state import TrainState


def write_corpus(path: Path, n: int, prefix: str = "doc", start: int = 0) -> Path:
    with open(path, "w") as fh:
        for i in range(start, start + n):
            # Lengths vary (3..30 chars) so packing has something to do; some are too long.
            fh.write(json.dumps({"text": f"{prefix}{i}:" + "x" * (i * 7 % 28)}) + "\n")
    return path


@pytest.fixture
def corpus(tmp_path: Path) -> Path:
    # Three files: not a multiple of 2 ranks, so ranks take every other example.
    for k in range(3):
        write_corpus(tmp_path / f"part{k}.jsonl", 40, start=40 * k)
    return tmp_path


def stream_cfg(corpus: Path, **kw) -> DataConfig:
    base = {
        "path": str(corpus / "part*.jsonl"),
        "streaming": True,
        "max_length": 24,
        "validation_examples": 0,
        "stream_buffer": 16,
    }
    return DataConfig(**{**base, **kw})


def take(stream, state: TrainState, n: int, mbs: int = 4) -> list[list[list[int]]]:
    it = stream.batches(state, mbs)
    return [next(it)["input_ids"].tolist() for _ in range(n)]


def test_stream_encodes_like_the_map_style_path(corpus, char_tokenizer, tmp_path) -> None:
    cfg = stream_cfg(corpus, overlong=Overlong.drop, stream_buffer=1000)
    bundle = build_datasets(cfg, char_tokenizer, DistEnv(), 0, tmp_path / "c")
    state = TrainState()
    rows = [r for b in take(bundle.stream, state, 150, mbs=1) for r in b]
    mapped = build_datasets(
        replace(cfg, streaming=False, validation_fraction=0), char_tokenizer, DistEnv(), 0, tmp_path
    )
    expected = mapped.train["input_ids"]
    assert 0 < len(expected) < 120  # some dropped as longer than max_length
    # One epoch of the stream is the map-style data, shuffled; then it repeats.
    first = rows[: len(expected)]
    assert sorted(map(tuple, first)) == sorted(map(tuple, expected))
    assert first != expected  # shuffled within the window
    assert rows[len(expected)] in expected and state.epoch == 1


def test_rank_shares_are_disjoint_and_skip_held_out(corpus, char_tokenizer, tmp_path) -> None:
    cfg = stream_cfg(corpus, validation_examples=10, stream_buffer=1000)
    shares = []
    for rank in range(2):
        bundle = build_datasets(cfg, char_tokenizer, DistEnv(rank, rank, 2, 2), 0, tmp_path)
        shares.append(bundle.stream)
    validation = [char_tokenizer.decode(r[1:-1]) for r in bundle.validation["input_ids"]]
    assert [v.split(":")[0] for v in validation] == [f"doc{i}" for i in range(10)]
    seen: list[Counter] = []
    for stream in shares:
        rows = [r for b in take(stream, TrainState(), 55, mbs=1) for r in b]
        seen.append(Counter(char_tokenizer.decode(r[1:-1]).split(":")[0] for r in rows))
    # Each rank repeats its share; together they hold every training example exactly once.
    assert not set(seen[0]) & set(seen[1])
    union = set(seen[0]) | set(seen[1])
    assert not union & {f"doc{i}" for i in range(10)}
    # Three files on two ranks: each takes every other example of the whole stream, so the
    # index that skips the held-out examples counts the whole stream: exactly those skipped.
    assert union == {f"doc{i}" for i in range(10, 120)}


@pytest.mark.parametrize("packing", [False, True])
def test_resume_continues_exactly(corpus, char_tokenizer, tmp_path, packing: bool) -> None:
    cfg = stream_cfg(corpus, packing=packing, validation_examples=6)
    env = DistEnv(1, 1, 2, 2)
    straight = build_datasets(cfg, char_tokenizer, env, 0, tmp_path).stream
    expected = take(straight, TrainState(), 60)  # several windows and epochs
    for stop in (1, 7, 23):
        state = TrainState()
        first = take(build_datasets(cfg, char_tokenizer, env, 0, tmp_path).stream, state, stop)
        saved = TrainState()
        saved.load_state_dict(state.state_dict())  # through the checkpoint's form
        resumed = build_datasets(cfg, char_tokenizer, env, 0, tmp_path).stream
        assert first + take(resumed, saved, 60 - stop) == expected, stop
    # 23 micro batches of 4 rows are 92 rows: more than one pass over this rank's share (57
    # examples: half of 120, less the 3 of its held out; fewer rows when packed) and less than
    # two, so the checkpointed position is in the second epoch.
    assert state.epoch == 1, state.epoch
    assert json.loads(state.stream)["window"] >= 1


def test_resume_on_another_number_of_ranks_is_refused(corpus, char_tokenizer, tmp_path) -> None:
    bundle = build_datasets(stream_cfg(corpus), char_tokenizer, DistEnv(0, 0, 2, 2), 0, tmp_path)
    bundle.stream.check_world_size(2)
    with pytest.raises(CheckpointError, match="holds 3 ranks' positions.*Resume on 3 ranks"):
        bundle.stream.check_world_size(3)


def test_streaming_with_epochs_asks_for_max_steps(corpus) -> None:
    cfg = TrainConfig(data=stream_cfg(corpus))
    cfg.model.name_or_path = "org/model"
    cfg.trainer.epochs = 2.0
    with pytest.raises(ConfigError, match=r"stream.*set trainer\.max_steps="):
        validate(cfg, 1, Hardware())
    cfg.trainer.epochs = None
    validate(cfg, 1, Hardware())
    cfg.trainer.num_workers = 2
    with pytest.raises(ConfigError, match="num_workers=0"):
        validate(cfg, 1, Hardware())


def test_a_share_with_nothing_left_says_why(corpus, char_tokenizer, tmp_path) -> None:
    cfg = stream_cfg(corpus, validation_examples=500)  # more than the corpus holds
    bundle = build_datasets(cfg, char_tokenizer, DistEnv(), 0, tmp_path)
    with pytest.raises(DataError, match="lower data.validation_examples"):
        next(bundle.stream.batches(TrainState(), 4))
