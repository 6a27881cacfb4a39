"""The pieces of an asynchronous checkpoint: the hash taken while torch.save writes, the host
snapshot that training may not change under the writer, and the ``checkpoint.async`` key."""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch

from bigscale.checkpoint.async_writer import HostPool, save_hashed, snapshot
from bigscale.config.compose import compose_config


def test_hash_while_writing_equals_the_files_sha256(tmp_path: Path) -> None:
    # Large enough that the tensor bytes go through the parallel hashing path.
    state = {"w": torch.randn(1 << 19), "step": 3, "nested": [torch.arange(5)]}
    path = tmp_path / "state.pt"
    entry = save_hashed(state, path)
    data = path.read_bytes()
    assert entry == {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    loaded = torch.load(path, weights_only=True)
    assert torch.equal(loaded["w"], state["w"]) and loaded["step"] == 3


def test_snapshot_is_a_compact_copy_training_cannot_change() -> None:
    flat = torch.arange(12.0)
    state = {"a": flat[:4], "b": flat[4:].view(2, 4), "again": flat[:4], "meta": {"lr": 0.1}}
    pool = HostPool()
    pool.begin()
    copy = snapshot(state, pool)
    flat.add_(100)  # training goes on and changes the live tensors in place
    assert torch.equal(copy["a"], torch.arange(4.0))
    assert torch.equal(copy["b"], torch.arange(4.0, 12.0).view(2, 4))
    assert copy["again"] is copy["a"]  # one tensor met twice is copied once
    # Views are copied compactly, like DeepSpeed's clone before torch.save: no flat buffer.
    assert copy["a"].untyped_storage().nbytes() == 4 * 4
    assert pool.nbytes == flat.untyped_storage().nbytes()
    # The next save reuses the buffers instead of allocating others.
    buffers = pool.nbytes
    pool.begin()
    again = snapshot(state, pool)
    assert pool.nbytes == buffers
    assert torch.equal(again["a"], torch.arange(100.0, 104.0))


def test_checkpoint_async_key(tmp_path: Path) -> None:
    assert compose_config([]).checkpoint.async_ is True
    assert compose_config(["checkpoint.async=false"]).checkpoint.async_ is False
    assert compose_config(["checkpoint.async_=false"]).checkpoint.async_ is False
