"""build_datasets/build_loader in one process, and the builder/waiter hand-off through the cache's
marker file (the builder and a waiting rank as threads)."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest
import torch

from bigscale.config.schema import CacheScope, DataConfig, DataStyle
from bigscale.data.cache import ReadyMarker, build_once, cache_root, is_builder
from bigscale.data.pipeline import build_datasets, build_loader
from bigscale.data.tasks import write_arithmetic_task
from bigscale.dist.env import DistEnv
from bigscale.errors import DataError


@pytest.fixture(scope="module")
def task_files(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("task")
    write_arithmetic_task(root / "train.jsonl", root / "val.jsonl", None, max_operand=39)
    return root / "train.jsonl", root / "val.jsonl"


def cfg_for(task_files: tuple[Path, Path], **kw) -> DataConfig:
    train, val = task_files
    return DataConfig(
        path=str(train), validation_path=str(val), style=DataStyle.prompt_response, **kw
    )


def test_build_datasets_and_loader(task_files, char_tokenizer, tmp_path: Path) -> None:
    bundle = build_datasets(
        cfg_for(task_files, max_length=16), char_tokenizer, DistEnv(), seed=0, cache_dir=tmp_path
    )
    assert (len(bundle.train), len(bundle.validation)) == (1600 - 1000, 500)
    assert bundle.report.examples_out == len(bundle.train)
    assert bundle.validation_report.examples_in == 500

    loaders = [
        build_loader(bundle.train, bundle.collate, DistEnv(rank=r, world_size=2), 8, 0, 0, True)
        for r in range(2)
    ]
    batches = [next(iter(loader)) for loader, _ in loaders]
    assert batches[0]["input_ids"].shape[0] == 8
    assert not torch.equal(batches[0]["input_ids"], batches[1]["input_ids"])
    assert loaders[0][1].state_dict() == {"epoch": 0, "consumed": 8}
    assert len(loaders[0][0]) == 300 // 8 + 1

    # Same inputs again: the cache files are reused, not rewritten.
    files = sorted(p.name for p in tmp_path.glob("*.arrow"))
    again = build_datasets(
        cfg_for(task_files, max_length=16), char_tokenizer, DistEnv(), seed=0, cache_dir=tmp_path
    )
    assert sorted(p.name for p in tmp_path.glob("*.arrow")) == files
    assert again.train[:] == bundle.train[:]


def test_build_datasets_packed(task_files, char_tokenizer, tmp_path: Path) -> None:
    bundle = build_datasets(
        cfg_for(task_files, max_length=32, packing=True),
        char_tokenizer,
        DistEnv(),
        seed=0,
        cache_dir=tmp_path,
    )
    assert bundle.packed
    assert sum(bundle.train["num_docs"]) == bundle.report.examples_out
    batch = bundle.collate([bundle.train[i] for i in range(4)])
    assert batch["input_ids"].shape == (4, 32) and "position_ids" in batch


def test_builder_failure_reaches_the_waiting_ranks(tmp_path: Path) -> None:
    """The builder's error goes into the marker file; a waiting rank raises it unchanged and
    never builds."""

    def fails(info: dict | None) -> tuple[None, dict]:
        raise DataError("data.text_field='text' is not a column of x.jsonl")

    with pytest.raises(DataError, match="is not a column") as err:
        build_once(DistEnv(0, 0, 2, 2), CacheScope.cluster, tmp_path, fails, run_id="r1")
    built = []
    with pytest.raises(DataError) as other:
        build_once(DistEnv(1, 1, 2, 2), CacheScope.cluster, tmp_path, built.append, run_id="r1")
    assert str(other.value) == str(err.value) and built == []

    def crashes(info: dict | None) -> tuple[None, dict]:
        raise MemoryError("out of memory")

    with pytest.raises(MemoryError):
        build_once(DistEnv(0, 0, 2, 2), CacheScope.cluster, tmp_path, crashes, run_id="r2")
    with pytest.raises(DataError, match="rank 0 failed while preparing data: MemoryError"):
        ReadyMarker(tmp_path, "r2").wait()


def test_waiters_get_the_builders_info_once_it_is_done(tmp_path: Path) -> None:
    """A waiting rank blocks on the file (not a collective) until the builder is done, then
    builds with the builder's info; a marker of another run id is not taken for this run's."""
    ReadyMarker(tmp_path, "old-run").fail("an earlier job failed")
    got: list = []
    waiter = threading.Thread(
        target=lambda: got.append(
            build_once(DistEnv(1, 1, 2, 2), CacheScope.cluster, tmp_path, lambda i: (i, {}), "r")
        )
    )
    waiter.start()
    time.sleep(0.5)
    assert waiter.is_alive()  # still waiting
    result = build_once(
        DistEnv(0, 0, 2, 2), CacheScope.cluster, tmp_path, lambda i: ("built", {"ids": 1}), "r"
    )
    waiter.join(10)
    assert result == "built" and got == [{"ids": 1}]


def test_node_scope_builds_on_each_nodes_first_rank(tmp_path: Path) -> None:
    env = DistEnv(rank=4, local_rank=0, world_size=8, local_world_size=4)
    assert is_builder(env, CacheScope.node) and not is_builder(env, CacheScope.cluster)
    assert cache_root(tmp_path, CacheScope.node).parent == tmp_path
    assert cache_root(tmp_path, CacheScope.cluster) == tmp_path


def test_validation_split_smaller_than_the_ranks_after_packing(
    task_files, char_tokenizer, tmp_path: Path
) -> None:
    """Three short validation examples pack into one row: two ranks cannot share it, and the
    message says which split, that it was counted after packing, and what to change."""
    small = tmp_path / "val.jsonl"
    small.write_text("".join(f'{{"prompt": "{i}+1=", "response": "{i + 1}"}}\n' for i in range(3)))
    cfg = cfg_for((task_files[0], small), max_length=64, packing=True)
    bundle = build_datasets(cfg, char_tokenizer, DistEnv(), seed=0, cache_dir=tmp_path / "c")
    assert len(bundle.validation) == 1 and bundle.packed
    env = DistEnv(rank=0, world_size=2)
    with pytest.raises(DataError) as err:
        build_loader(bundle.validation, bundle.collate, env, 8, 0, 0, False, "validation", True)
    msg = str(err.value)
    assert "the validation split has 1 row(s) after tokenizing and packing" in msg
    assert "fewer than the 2 data-parallel ranks" in msg
    for fix in ("data.max_length", "data.validation_fraction", "data.validation_path"):
        assert fix in msg
