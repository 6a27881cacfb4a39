"""Answers to a few general questions (``eval.sample_prompts``) before and after training.

Exact match on the task shows the model learned it; these answers show what it kept. Each
question is a user turn of the chat template (its default system prompt included), answered
greedily by the same generation as the task metric."""

from __future__ import annotations

from dataclasses import replace

from transformers import PreTrainedModel
from transformers.tokenization_utils_base import PreTrainedTokenizerBase

from bigscale.config.schema import EvalConfig
from bigscale.dist.env import DistEnv
from bigscale.logging import get_logger
from bigscale.train import task_eval

log = get_logger(__name__)


def sample_examples(cfg: EvalConfig, tokenizer: PreTrainedTokenizerBase) -> list[task_eval.Example]:
    if getattr(tokenizer, "chat_template", None):
        prompts = [({"role": "user", "content": q},) for q in cfg.sample_prompts]
    else:
        prompts = list(cfg.sample_prompts)  # no template: the question as plain text
    return [task_eval.Example(p, "") for p in prompts]


def answer_samples(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    cfg: EvalConfig,
    env: DistEnv,
    synced: bool,
    when: str,
) -> dict[str, str]:
    """Generate on every rank (a ZeRO-3 forward is a collective), log on rank 0; returns
    {question: answer}."""
    if not cfg.sample_prompts:
        return {}
    examples = sample_examples(cfg, tokenizer)
    budget = replace(cfg, max_new_tokens=cfg.sample_max_new_tokens)
    answers = task_eval.generate(model, tokenizer, examples, budget, env, synced).answers
    lines = [f"  {q} -> {a!r}" for q, a in zip(cfg.sample_prompts, answers, strict=True)]
    log.info("answers %s training:\n%s", when, "\n".join(lines))
    return dict(zip(cfg.sample_prompts, answers, strict=True))
