"""A chat template whose markers the model spells in characters (as a text template writes
Gemma's ``<end_of_turn>`` for a model without those tokens), and a tiny Llama that has
memorised two answers through it, so generation tests see real generations that end at a text
marker after different numbers of tokens."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from transformers import AutoTokenizer

from bigscale.config.schema import DataConfig, DataStyle
from bigscale.train import task_eval
from tests.conftest import build_char_tokenizer
from tests.models import tiny_llama

# None of these strings is a token of the char tokenizer.
TEXT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<start_of_turn>{{ m['role'] }}\n{{ m['content'] }}"
    "<end_of_turn>\n{% endfor %}{% if add_generation_prompt %}<start_of_turn>assistant\n"
    "{% endif %}"
)
MARKER = "<end_of_turn>"
ROWS = [("What is the date?", "1999-07-02"), ("Six times seven?", "42")]


def text_marker_tokenizer(directory: Path):
    return AutoTokenizer.from_pretrained(build_char_tokenizer(directory, TEXT_TEMPLATE))


def write_test_set(directory: Path, rows: list[tuple[str, str]] = ROWS) -> list[task_eval.Example]:
    """``rows`` as a chat test file, read back the way the held-out eval reads it."""
    path = Path(directory) / "test.jsonl"
    lines = [
        {"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}
        for q, a in rows
    ]
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    cfg = DataConfig(path=str(path), test_path=str(path), style=DataStyle.chat)
    return task_eval.read_examples(cfg, limit=len(rows))


def memorised_model(tokenizer, examples: list[task_eval.Example]):
    """A tiny Llama trained until it reproduces every conversation, template text included."""
    model = tiny_llama(vocab_size=len(tokenizer), max_position_embeddings=128)
    texts = [
        tokenizer.apply_chat_template(
            [*ex.prompt, {"role": "assistant", "content": ex.answer}], tokenize=False
        )
        for ex in examples
    ]
    ids = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
    width = max(len(i) for i in ids)
    batch = torch.tensor([i + [tokenizer.pad_token_id] * (width - len(i)) for i in ids])
    labels = torch.tensor([i + [-100] * (width - len(i)) for i in ids])
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(300):
        loss = model(input_ids=batch, labels=labels).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if loss.item() < 0.01:
            break
    assert loss.item() < 0.05, loss.item()
    # As training leaves it under gradient checkpointing: evaluation must turn the cache on.
    model.config.use_cache = False
    return model.eval()
