"""The held-out task metric: greedy generation, exact match against the reference answer.

Each rank scores an equal-sized shard of the test set (padded with unscored slots), because
under ZeRO-3 every forward is a collective and all ranks must generate the same number of
batches; the counts are then summed across ranks."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from transformers import PreTrainedModel
from transformers.tokenization_utils_base import PreTrainedTokenizerBase

from bigscale.config.schema import DataConfig, EvalConfig
from bigscale.dist.env import DistEnv


@dataclass(frozen=True)
class Example:
    prompt: str
    answer: str


def read_examples(data: DataConfig, limit: int) -> list[Example]:
    assert data.test_path is not None
    out: list[Example] = []
    with Path(data.test_path).open(encoding="utf-8") as f:
        for line in f:
            if not line.strip():
                continue
            row = json.loads(line)
            out.append(Example(str(row[data.prompt_field]), str(row[data.response_field])))
            if len(out) >= limit:
                break
    return out


def _encode_prompt(tokenizer: PreTrainedTokenizerBase, prompt: str) -> list[int]:
    # Same layout as training (BOS + prompt), so the model sees what it was taught.
    ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    return ([tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []) + ids


@torch.no_grad()
def exact_match(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    examples: list[Example],
    cfg: EvalConfig,
    env: DistEnv,
    synced: bool,
) -> float:
    per_rank = -(-len(examples) // env.world_size)
    shard: list[Example | None] = list(examples[env.rank :: env.world_size])
    shard += [None] * (per_rank - len(shard))
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    correct = 0
    for start in range(0, per_rank, cfg.batch_size):
        batch = shard[start : start + cfg.batch_size]
        prompts = [_encode_prompt(tokenizer, ex.prompt if ex else "") for ex in batch]
        width = max(len(p) for p in prompts)
        pad = tokenizer.pad_token_id
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
        texts = tokenizer.batch_decode(generated[:, width:], skip_special_tokens=True)
        correct += sum(
            1 for ex, text in zip(batch, texts, strict=True) if ex and text.strip() == ex.answer
        )
    model.train(was_training)
    total = torch.tensor([correct, sum(1 for ex in shard if ex)], dtype=torch.float64)
    if dist.is_initialized():
        dist.all_reduce(total)
    return float(total[0] / total[1]) if total[1] else 0.0
