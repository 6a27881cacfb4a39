"""Mixtures: realized proportions (map-style and streaming), per-source fields and pre-flight,
the cache named by the data's content, and trainer.epochs."""

from __future__ import annotations

import json
import shutil
from collections import Counter
from dataclasses import replace
from pathlib import Path

import pytest

from bigscale.config.schema import DataConfig, DataStyle, MixtureSource
from bigscale.data.pipeline import build_datasets
from bigscale.data.sources import preflight
from bigscale.dist.env import DistEnv
from bigscale.errors import DataError
from bigscale.train.state import TrainState


def write_rows(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture
def sources(tmp_path: Path) -> tuple[Path, Path]:
    # Source A: plain text in "text"; source B: prompt/response pairs under other names.
    a = write_rows(tmp_path / "a.jsonl", [{"text": f"A{i}"} for i in range(300)])
    b = write_rows(tmp_path / "b.jsonl", [{"q": f"B{i}", "ans": "y"} for i in range(300)])
    return a, b


def mixture_cfg(a: Path, b: Path, **kw) -> DataConfig:
    return DataConfig(
        path="mixture",
        mixture=[
            MixtureSource(path=str(a), weight=3.0),
            MixtureSource(
                path=str(b),
                weight=1.0,
                style=DataStyle.prompt_response,
                prompt_field="q",
                response_field="ans",
            ),
        ],
        max_length=16,
        **kw,
    )


def origin(tokenizer, ids: list[int]) -> str:
    return tokenizer.decode(ids, skip_special_tokens=True)[0]


def test_map_style_proportions_follow_the_weights(sources, char_tokenizer, tmp_path) -> None:
    cfg = mixture_cfg(*sources, validation_fraction=0.1)
    bundle = build_datasets(cfg, char_tokenizer, DistEnv(), 0, tmp_path / "cache")
    counts = Counter(origin(char_tokenizer, ids) for ids in bundle.train["input_ids"])
    share = counts["A"] / (counts["A"] + counts["B"])
    assert abs(share - 0.75) < 0.03, counts
    # Until every source is used up: the lighter B appears whole, the heavier A repeats.
    assert counts["B"] >= 270 and counts["A"] > 270
    # Both sources' held-out parts form the validation set; each source kept its own fields.
    val = Counter(origin(char_tokenizer, ids) for ids in bundle.validation["input_ids"])
    assert val == {"A": 30, "B": 30}
    assert bundle.report.examples_in == 540


def test_streaming_proportions_follow_the_weights(sources, char_tokenizer, tmp_path) -> None:
    cfg = mixture_cfg(*sources, streaming=True, validation_examples=5)
    bundle = build_datasets(cfg, char_tokenizer, DistEnv(), 0, tmp_path)
    it = bundle.stream.batches(TrainState(), 10)
    rows = [ids for _ in range(80) for ids in next(it)["input_ids"].tolist()]
    counts = Counter(origin(char_tokenizer, [t for t in r if t]) for r in rows)
    assert abs(counts["A"] / len(rows) - 0.75) < 0.04, counts
    assert Counter(origin(char_tokenizer, r) for r in bundle.validation["input_ids"]) == {
        "A": 5,
        "B": 5,
    }


def test_preflight_checks_every_source_with_its_fields(sources, tmp_path) -> None:
    a, b = sources
    preflight(mixture_cfg(a, b))
    cfg = mixture_cfg(a, b)
    cfg.mixture[1].prompt_field = "question"
    with pytest.raises(DataError, match=r"data\.prompt_field='question' is not a column of .*b"):
        preflight(cfg)
    cfg.mixture[1].path = str(tmp_path / "missing*.jsonl")
    with pytest.raises(DataError, match=r"no file matches data\.mixture\[1\]\.path"):
        preflight(cfg)


def test_cache_is_named_by_content_not_path(sources, char_tokenizer, tmp_path) -> None:
    a, _ = sources
    cache = tmp_path / "cache"

    def tokenized_files() -> set[str]:
        return {p.name for p in cache.glob("*.arrow")}

    build_datasets(DataConfig(path=str(a)), char_tokenizer, DistEnv(), 0, cache)
    first = tokenized_files()
    copy = shutil.copy(a, tmp_path / "copy.jsonl")
    build_datasets(DataConfig(path=str(copy)), char_tokenizer, DistEnv(), 0, cache)
    assert tokenized_files() == first  # same content elsewhere: the same cache
    with open(copy, "a") as fh:
        fh.write(json.dumps({"text": "one more"}) + "\n")
    build_datasets(DataConfig(path=str(copy)), char_tokenizer, DistEnv(), 0, cache)
    assert tokenized_files() > first  # changed content: a new one


def test_streamed_mixture_resumes_exactly(sources, char_tokenizer, tmp_path) -> None:
    """The interleaving's random state is part of the checkpointed position."""
    cfg = mixture_cfg(
        *sources, streaming=True, stream_buffer=32, packing=True, validation_examples=5
    )
    env = DistEnv(0, 0, 2, 2)

    def batches(state: TrainState, n: int) -> list:
        it = build_datasets(cfg, char_tokenizer, env, 0, tmp_path).stream.batches(state, 4)
        return [next(it)["input_ids"].tolist() for _ in range(n)]

    expected = batches(TrainState(), 40)
    state = TrainState()
    first = batches(state, 13)
    saved = TrainState()
    saved.load_state_dict(state.state_dict())
    assert first + batches(saved, 27) == expected


@pytest.mark.parametrize("streaming", [False, True], ids=["map-style", "streamed"])
def test_a_shared_validation_file_replaces_the_held_out_parts(
    sources, char_tokenizer, tmp_path, streaming: bool
) -> None:
    """``data.validation_path`` beside a mixture: validation is that file alone, and every
    example of the sources is trained on."""
    val = write_rows(tmp_path / "val.jsonl", [{"text": f"V{i}"} for i in range(20)])
    cfg = mixture_cfg(*sources, validation_path=str(val), streaming=streaming)
    if streaming:
        cfg = replace(cfg, validation_examples=8)
    bundle = build_datasets(cfg, char_tokenizer, DistEnv(), 0, tmp_path / "cache")
    held_out = {origin(char_tokenizer, ids) for ids in bundle.validation["input_ids"]}
    assert held_out == {"V"}
    assert len(bundle.validation) == (8 if streaming else 20)
    if not streaming:
        assert bundle.report.examples_out == 600  # nothing of A or B held out
