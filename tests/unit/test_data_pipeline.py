"""build_datasets/build_loader in one process, and the rank-0 failure hand-off (simulated)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

import bigscale.data.pipeline as pipeline
from bigscale.config.schema import DataConfig, DataStyle
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


class FakeDist:
    """Stands in for torch.distributed: records broadcasts, and plays rank 0's message."""

    def __init__(self, message_from_rank0: str | None) -> None:
        self.message = message_from_rank0
        self.sent: list[str | None] = []

    def install(self, monkeypatch: pytest.MonkeyPatch) -> None:
        monkeypatch.setattr(torch.distributed, "is_available", lambda: True)
        monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
        monkeypatch.setattr(torch.distributed, "broadcast_object_list", self.broadcast)

    def broadcast(self, box: list, src: int = 0, **_) -> None:
        self.sent.append(box[0])
        if box[0] is None:
            box[0] = self.message


def test_rank0_failure_is_broadcast_then_raised(
    char_tokenizer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake = FakeDist(None)
    fake.install(monkeypatch)
    cfg = DataConfig(path=str(tmp_path / "missing.jsonl"))
    with pytest.raises(DataError, match="no file matches") as err:
        build_datasets(cfg, char_tokenizer, DistEnv(0, 0, 2, 2), seed=0, cache_dir=tmp_path)
    assert fake.sent == [str(err.value)]


def test_other_ranks_raise_rank0_error_without_preparing(
    char_tokenizer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake = FakeDist("data.text_field='text' is not a column of x.jsonl")
    fake.install(monkeypatch)
    prepared = []
    monkeypatch.setattr(pipeline, "_prepare", lambda *a: prepared.append(a))
    cfg = DataConfig(path="x.jsonl")
    with pytest.raises(DataError, match=re.escape("is not a column of x.jsonl")):
        build_datasets(cfg, char_tokenizer, DistEnv(1, 1, 2, 2), seed=0, cache_dir=tmp_path)
    assert prepared == [] and fake.sent == [None]


def test_other_ranks_prepare_after_rank0_succeeds(
    task_files, char_tokenizer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake = FakeDist(None)
    fake.install(monkeypatch)
    bundle = build_datasets(
        cfg_for(task_files), char_tokenizer, DistEnv(1, 1, 2, 2), seed=0, cache_dir=tmp_path
    )
    assert fake.sent == [None] and len(bundle.train) == 600
