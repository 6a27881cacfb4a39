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
