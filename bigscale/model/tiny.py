"""A tiny Llama-shaped model and a character-level tokenizer, written to disk like a hub model.

The default job and the tests use it: there is no model hub on CI, and saving it with
``save_pretrained`` means it is then loaded through exactly the path a real model takes."""

from __future__ import annotations

import os
import shutil
import string
import tempfile
from pathlib import Path

import torch
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from bigscale.config.schema import TinyModelSpec
from bigscale.errors import ModelError

SPECIAL_TOKENS = ["<pad>", "<unk>", "<s>", "</s>"]

# A minimal ChatML-style template so chat data works with the tiny model too.
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}</s>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def build_char_tokenizer() -> PreTrainedTokenizerFast:
    """One token per printable ASCII character, plus pad/unk/bos/eos."""
    chars = sorted(set(string.printable) - set("\x0b\x0c\r"))
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS + chars)}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    core.decoder = decoders.Fuse()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core,
        pad_token="<pad>",
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def create_tiny_model(path: Path, spec: TinyModelSpec) -> None:
    """Write model + tokenizer to ``path`` atomically: a concurrent reader sees all or nothing.

    Never over anything: an existing model is kept, and a non-empty folder without
    ``config.json`` is refused rather than replaced."""
    path = Path(path)
    if (path / "config.json").is_file():
        return
    _refuse_occupied(path)
    tokenizer = build_char_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=spec.hidden_size,
        intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_layers,
        num_attention_heads=spec.num_heads,
        num_key_value_heads=spec.num_heads,
        max_position_embeddings=spec.max_position_embeddings,
        attention_dropout=spec.dropout,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=False,
    )
    torch.manual_seed(spec.seed)
    model = LlamaForCausalLM(config)
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{path.name}-", dir=path.parent))
    try:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        # A rename onto a directory succeeds only if that one is empty, so nothing is replaced.
        os.rename(staging, path)
    except OSError:
        shutil.rmtree(staging, ignore_errors=True)
        if (path / "config.json").is_file():
            return  # another process won the race and created it first; theirs is identical
        _refuse_occupied(path)
        raise


def _refuse_occupied(path: Path) -> None:
    if path.is_dir() and not any(path.iterdir()):
        return
    if path.exists():
        raise ModelError(
            f"cannot create the tiny model at {path}: something else is there (no config.json); "
            "delete it, or point model.name_or_path at a new folder"
        )
