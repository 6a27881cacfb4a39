"""The held-out generation metrics: greedy answers, exact match, and ``eval.metric_fn``.

Each rank generates for an equal-sized shard of the test set (padded with unused slots),
because under ZeRO-3 every forward is a collective and all ranks must generate the same number
of batches; the answers are then gathered in the file's order. The ranks of a tensor-parallel
group share one shard and generate it together (each holds a slice of every weight), and their
answers count once. For chat styles the prompt is
the conversation before the last assistant turn, rendered with the chat template and its
generation prompt, and an answer ends at the template's end-of-turn marker, a token or text
(``bigscale.generation``). Unless ``eval.max_new_tokens`` is set, the budget comes from the data:
the longest reference answer with what ends it, in tokens, so no right answer is cut."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from transformers import PreTrainedModel
from transformers.tokenization_utils_base import PreTrainedTokenizerBase

from bigscale.config.schema import DataConfig, DataStyle, EvalConfig, TrainConfig
from bigscale.data.chat import CHAT_STYLES, conversation, render
from bigscale.dist.env import DistEnv
from bigscale.dist.layout import ParallelLayout
from bigscale.dist.watchdog import PROGRESS
from bigscale.errors import BigscaleError
from bigscale.generation import AnswerEnd, answer_end
from bigscale.logging import get_logger
from bigscale.train.metric_fn import MetricFn, call_metric_fn

log = get_logger(__name__)

BUDGET_HITS = "exact_match_budget_hits"
"""Metric: held-out answers that used all ``eval.max_new_tokens`` without ending."""


@dataclass(frozen=True)
class Example:
    prompt: str | tuple[dict, ...]
    """Text after BOS, or (chat styles) the messages before the answer."""
    answer: str


def read_examples(data: DataConfig, limit: int) -> list[Example]:
    assert data.test_path is not None
    chat = DataStyle(data.style) in CHAT_STYLES
    pairs = DataStyle(data.style) is DataStyle.preference
    out: list[Example] = []
    with Path(data.test_path).open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            row = json.loads(line)
            # Preference data held out as chats (data=dates_pairs) is scored as chat is.
            if chat or (pairs and isinstance(row.get(data.messages_field), list)):
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


def _tokens(tokenizer: PreTrainedTokenizerBase, text: str) -> int:
    return len(tokenizer(text, add_special_tokens=False)["input_ids"])


def answer_tokens(tokenizer: PreTrainedTokenizerBase, example: Example, end: AnswerEnd) -> int:
    """Tokens the model must generate to give ``example.answer`` and end it, as training taught:
    for chat styles what the template writes after the generation prompt (answer, end-of-turn
    marker and what follows it), otherwise the response and EOS."""
    if isinstance(example.prompt, tuple):
        reply = {"role": "assistant", "content": example.answer}
        full = render(tokenizer, [*example.prompt, reply], generation_prompt=False)
        prompt = render(tokenizer, example.prompt, generation_prompt=True)
        # Counted in context (tokens can merge across the boundary), and never less than the
        # answer and marker alone.
        in_context = _tokens(tokenizer, full) - _tokens(tokenizer, prompt)
        return max(in_context, _tokens(tokenizer, example.answer + end.marker))
    return _tokens(tokenizer, example.answer) + 1


def budget(
    tokenizer: PreTrainedTokenizerBase, examples: list[Example], cfg: EvalConfig, end: AnswerEnd
) -> int:
    """``eval.max_new_tokens``, or when null the longest answer of ``examples`` with its end."""
    if cfg.max_new_tokens is not None:
        return cfg.max_new_tokens
    return max((answer_tokens(tokenizer, ex, end) for ex in examples), default=1)


def describe_budget(
    tokenizer: PreTrainedTokenizerBase, examples: list[Example], cfg: TrainConfig
) -> str:
    """The log line naming the generation budget and where it came from."""
    end = answer_end(tokenizer, any(isinstance(ex.prompt, tuple) for ex in examples))
    n = budget(tokenizer, examples, cfg.eval, end)
    source = (
        "eval.max_new_tokens"
        if cfg.eval.max_new_tokens is not None
        else "eval.max_new_tokens=null: the longest answer of data.test_path and its end"
    )
    stop = f"the end-of-turn marker {end.marker!r}" if end.marker else "EOS"
    return f"held-out answers: up to {n} new tokens each ({source}), stopping at {stop}"


@dataclass(frozen=True)
class Generations:
    answers: list[str]
    """One per example, in the file's order, the same on every rank."""
    budget_hits: int
    """Answers that used the whole budget without ending (cut, or running on)."""
    max_new_tokens: int


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
    layout: ParallelLayout | None = None,
) -> Generations:
    """Greedy answers for all ``examples``, in order, on every rank, and how many hit the
    budget. Examples are shared out over the data-parallel ``layout`` (a tensor-parallel group
    counts once). With ``synced`` (ZeRO-3) every rank runs forwards until all ranks are done; a row
    that reached its end-of-turn text only stops producing tokens, as at EOS."""
    # The ranks of one tensor-parallel group hold slices of every weight, so they generate the
    # same prompts together; every other rank (data- or sequence-parallel: generation runs
    # whole sequences) answers its own share.
    tp = max(1, layout.tp) if layout is not None else 1
    groups, group = env.world_size // tp, env.rank // tp
    per_rank = -(-len(examples) // groups)
    shard: list[Example | None] = list(examples[group::groups])
    shard += [None] * (per_rank - len(shard))
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    pad = tokenizer.pad_token_id
    end = answer_end(tokenizer, any(isinstance(ex.prompt, tuple) for ex in examples))
    max_new_tokens = budget(tokenizer, examples, cfg, end)
    mine: list[tuple[str, bool]] = []
    for start in range(0, per_rank, cfg.batch_size):
        PROGRESS.mark("generation eval")  # per batch: a long eval is progress, not a stall
        batch = shard[start : start + cfg.batch_size]
        prompts = [_encode_prompt(tokenizer, ex.prompt) if ex else [pad] for ex in batch]
        width = max(len(p) for p in prompts)
        # Left padding keeps every prompt's last token at the end, where generation continues.
        input_ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts], device=device)
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=device)
        generated = model.generate(
            input_ids=input_ids,
            attention_mask=mask,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=pad,
            eos_token_id=list(end.eos_ids) or None,
            stopping_criteria=end.stopping_criteria(tokenizer, width),
            # Training may have turned the cache off (gradient checkpointing); generation
            # without it recomputes the whole prefix for every new token.
            use_cache=True,
            synced_gpus=synced,
        )
        mine += [
            end.answer(tokenizer, ids)
            for ex, ids in zip(batch, generated[:, width:].tolist(), strict=True)
            if ex
        ]
    model.train(was_training)
    shards = [mine]
    if dist.is_initialized() and env.world_size > 1:
        shards = [[] for _ in range(env.world_size)]
        dist.all_gather_object(shards, mine)
        shards = _one_per_group(shards, tp)
    # Group g answered examples g, g + groups, ...: interleave back into the file's order.
    out: list[tuple[str, bool]] = [("", True)] * len(examples)
    for r, answers in enumerate(shards):
        out[r :: len(shards)] = answers
    hits = sum(not ended for _, ended in out)
    # A budget sized from the data fits every reference answer: an answer that used it all
    # is longer than any of them, wrong whatever more tokens would add. Only a budget the
    # user set can cut a right answer.
    if hits and env.is_main and cfg.max_new_tokens is not None:
        log.warning(
            "%d of %d held-out answers used all eval.max_new_tokens=%d without ending; if right "
            "answers were cut, raise it, or set it to null to size it from the test set",
            hits,
            len(out),
            max_new_tokens,
        )
    return Generations([a for a, _ in out], hits, max_new_tokens)


def _one_per_group(shards: list[list[tuple[str, bool]]], tp: int) -> list[list[tuple[str, bool]]]:
    """The answers of each tensor-parallel group once, checked equal across the group: its
    ranks computed the same all-reduced logits, so a difference means they fed different
    inputs and the metric would be meaningless."""
    out = []
    for first in range(0, len(shards), tp):
        group = shards[first : first + tp]
        if any(answers != group[0] for answers in group[1:]):
            raise RuntimeError(
                f"the tensor-parallel ranks {first}..{first + tp - 1} generated different answers "
                "for the same prompts"
            )
        out.append(group[0])
    return out
