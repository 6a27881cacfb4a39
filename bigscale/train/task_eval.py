"""The held-out generation metrics: greedy answers, exact match, and ``eval.metric_fn``.

Each rank generates for an equal-sized shard of the test set (padded with unused slots),
because under ZeRO-3 every forward is a collective and all ranks must generate the same number
of batches; the answers are then gathered in the file's order. For chat styles the prompt is
the conversation before the last assistant turn, rendered with the chat template and its
generation prompt, and an answer ends at the template's end-of-turn marker."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from transformers import PreTrainedModel
from transformers.tokenization_utils_base import PreTrainedTokenizerBase

from bigscale.config.schema import DataConfig, DataStyle, EvalConfig
from bigscale.data.chat import CHAT_STYLES, conversation, render, turn_end_marker
from bigscale.dist.env import DistEnv
from bigscale.errors import BigscaleError
from bigscale.train.metric_fn import MetricFn, call_metric_fn


@dataclass(frozen=True)
class Example:
    prompt: str | tuple[dict, ...]
    """Text after BOS, or (chat styles) the messages before the answer."""
    answer: str


def read_examples(data: DataConfig, limit: int) -> list[Example]:
    assert data.test_path is not None
    chat = DataStyle(data.style) in CHAT_STYLES
    out: list[Example] = []
    with Path(data.test_path).open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            row = json.loads(line)
            if chat:
                messages = conversation(row, data, f"{data.test_path}:{lineno}")
                out.append(Example(tuple(messages[:-1]), str(messages[-1].get("content", ""))))
            else:
                out.append(Example(str(row[data.prompt_field]), str(row[data.response_field])))
            if len(out) >= limit:
                break
    return out


def _encode_prompt(tokenizer: PreTrainedTokenizerBase, prompt: str | tuple[dict, ...]) -> list[int]:
    # Same layout as training, so the model sees what it was taught: the chat template's
    # rendering (it places any BOS itself) or BOS + prompt.
    if isinstance(prompt, tuple):
        text = render(tokenizer, prompt, generation_prompt=True)
        return list(tokenizer(text, add_special_tokens=False)["input_ids"])
    ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    return ([tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []) + ids


def _decoder(tokenizer: PreTrainedTokenizerBase, chat: bool):
    """Generated ids -> answer text: up to the chat template's end-of-turn marker (which need
    not be a special token, e.g. a user template on a model that lacks its tokens)."""
    marker = turn_end_marker(tokenizer) if chat else ""

    def decode(ids: torch.Tensor) -> str:
        if not marker:
            return tokenizer.decode(ids, skip_special_tokens=True).strip()
        text = tokenizer.decode(ids, skip_special_tokens=False)
        for end in (marker, tokenizer.eos_token, tokenizer.pad_token):
            if end:
                text = text.split(end, 1)[0]
        return text.strip()

    return decode


def score(
    predictions: list[str],
    examples: list[Example],
    cfg: EvalConfig,
    env: DistEnv,
    metric_fn: MetricFn | None = None,
) -> dict[str, float]:
    """``exact_match`` and the keys of ``eval.metric_fn``, the same on every rank; the metric
    function runs on rank 0 only and its result is broadcast (it may be slow or random)."""
    references = [ex.answer for ex in examples]
    hits = sum(p == r.strip() for p, r in zip(predictions, references, strict=True))
    out = {"exact_match": hits / len(examples) if examples else 0.0}
    if metric_fn is not None:
        assert cfg.metric_fn is not None
        box: list[object] = [None]
        if env.is_main:
            try:
                box[0] = call_metric_fn(metric_fn, cfg.metric_fn, predictions, references)
            except BigscaleError as e:
                box[0] = e  # every rank raises it, instead of the others waiting forever
        if dist.is_initialized() and env.world_size > 1:
            dist.broadcast_object_list(box, src=0)
        if isinstance(box[0], BigscaleError):
            raise box[0]
        out.update(box[0])  # type: ignore[arg-type]
    return out


@torch.no_grad()
def generate(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    examples: list[Example],
    cfg: EvalConfig,
    env: DistEnv,
    synced: bool,
) -> list[str]:
    """Greedy answers for all ``examples``, in order, on every rank."""
    per_rank = -(-len(examples) // env.world_size)
    shard: list[Example | None] = list(examples[env.rank :: env.world_size])
    shard += [None] * (per_rank - len(shard))
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    pad = tokenizer.pad_token_id
    decode = _decoder(tokenizer, any(isinstance(ex.prompt, tuple) for ex in examples))
    mine: list[str] = []
    for start in range(0, per_rank, cfg.batch_size):
        batch = shard[start : start + cfg.batch_size]
        prompts = [_encode_prompt(tokenizer, ex.prompt) if ex else [pad] for ex in batch]
        width = max(len(p) for p in prompts)
        # Left padding keeps every prompt's last token at the end, where generation continues.
        input_ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts], device=device)
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=device)
        generated = model.generate(
            input_ids=input_ids,
            attention_mask=mask,
            max_new_tokens=cfg.max_new_tokens,
            do_sample=False,
            pad_token_id=pad,
            eos_token_id=tokenizer.eos_token_id,
            synced_gpus=synced,
        )
        mine += [decode(ids) for ex, ids in zip(batch, generated[:, width:], strict=True) if ex]
    model.train(was_training)
    shards = [mine]
    if dist.is_initialized() and env.world_size > 1:
        shards = [[] for _ in range(env.world_size)]
        dist.all_gather_object(shards, mine)
    # Rank r answered examples r, r + world_size, ...: interleave back into the file's order.
    out = [""] * len(examples)
    for r, answers in enumerate(shards):
        out[r :: len(shards)] = answers
    return out
