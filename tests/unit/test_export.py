"""Export reads checkpoints without executing anything they contain."""

from __future__ import annotations

import pickle
from pathlib import Path

import pytest

from bigscale.checkpoint.export import export_run, find_checkpoint
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
        export_run(run, tmp_path / "out")
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
