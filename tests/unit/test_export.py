"""Export reads checkpoints without executing anything they contain, and writes Hugging Face's
sharded safetensors layout one shard at a time."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from bigscale.checkpoint.export import export_checkpoint, find_checkpoint, parse_size, write_weights
from bigscale.model.tiny import build_char_tokenizer
from tests.malicious import Payload


def _plant(tmp_path: Path) -> tuple[Path, Path]:
    run = tmp_path / "run"
    tag = run / "checkpoints" / "step_1"
    (tag / "hf").mkdir(parents=True)
    (run / "checkpoints" / "latest").write_text("step_1")
    from transformers import LlamaConfig

    LlamaConfig(
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        vocab_size=104,
    ).save_pretrained(tag / "hf")
    build_char_tokenizer().save_pretrained(tag / "hf")
    marker = tmp_path / "pwned"
    with (tag / "mp_rank_00_model_states.pt").open("wb") as f:
        pickle.dump({"module": Payload(marker)}, f)
    return run, marker


def test_planted_pickle_does_not_execute(tmp_path: Path) -> None:
    run, marker = _plant(tmp_path)
    with pytest.raises(pickle.UnpicklingError):
        export_checkpoint(run, tmp_path / "out")
    assert not marker.exists()
    assert not (tmp_path / "out").exists()


def test_find_checkpoint_accepts_run_root_or_tag(tmp_path: Path) -> None:
    run, _ = _plant(tmp_path)
    root = run / "checkpoints"
    assert find_checkpoint(run) == (root, "step_1")
    assert find_checkpoint(root) == (root, "step_1")
    assert find_checkpoint(root / "step_1") == (root, "step_1")
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        find_checkpoint(tmp_path / "elsewhere")


def test_write_weights_shards_by_size_and_writes_tied_weights_once(tmp_path: Path) -> None:
    embed = torch.arange(12, dtype=torch.float32).view(4, 3)
    weights = {
        "embed.weight": embed,
        "a.weight": torch.ones(100),
        "b.weight": torch.full((100,), 2.0),
        "lm_head.weight": embed,  # tied: the same tensor
        "steps": torch.tensor([7]),  # not floating: keeps its dtype
    }
    shards = write_weights(weights, tmp_path, torch.bfloat16, shard_bytes=250)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert shards == 2  # [embed, a]: 224 bytes, [b, steps]: 208 bytes
    assert set(index["weight_map"]) == {"embed.weight", "a.weight", "b.weight", "steps"}
    loaded = {}
    for file in set(index["weight_map"].values()):
        loaded.update(load_file(tmp_path / file))
    assert loaded["embed.weight"].dtype == torch.bfloat16
    assert torch.equal(loaded["embed.weight"].float(), embed)
    assert loaded["steps"].dtype == torch.int64
    assert index["metadata"]["total_size"] == 12 * 2 + 200 * 2 + 8


def test_one_shard_is_a_plain_model_safetensors(tmp_path: Path) -> None:
    assert write_weights({"w": torch.zeros(3)}, tmp_path, None, parse_size("2GB")) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.safetensors"]
    assert parse_size("1MB") == 1_000_000 and parse_size("64KB") == 64_000
