"""Sampling flags shared by ``bigscale chat`` and ``bigscale generate``, and the answer a user
sees: generated text up to the end-of-turn marker, template tokens never shown."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from bigscale.errors import ConfigError
from bigscale.generation import AnswerEnd, strip_partial


def add_flags(parser: argparse.ArgumentParser, max_new_tokens: int) -> None:
    parser.add_argument("target", help="run directory, checkpoint directory or export")
    parser.add_argument(
        "--temperature", type=float, default=0.7, help="0 decodes greedily (default 0.7)"
    )
    parser.add_argument("--top-p", type=float, default=0.9, help="nucleus sampling (default 0.9)")
    parser.add_argument("--max-new-tokens", type=int, default=max_new_tokens)
    parser.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")
    parser.add_argument("--system", default=None, help="a system message opening every chat")
    parser.add_argument(
        "--dtype", default="auto", help="auto (as saved), float32, bfloat16 or float16"
    )


@dataclass(frozen=True)
class Sampling:
    temperature: float
    top_p: float
    max_new_tokens: int
    seed: int

    @classmethod
    def from_args(cls, ns: argparse.Namespace) -> Sampling:
        if ns.temperature < 0:
            raise ConfigError(f"--temperature {ns.temperature}: use 0 (greedy) or more")
        if not 0 < ns.top_p <= 1:
            raise ConfigError(f"--top-p {ns.top_p}: use a value in (0, 1]")
        if ns.max_new_tokens < 1:
            raise ConfigError(f"--max-new-tokens {ns.max_new_tokens}: use 1 or more")
        return cls(ns.temperature, ns.top_p, ns.max_new_tokens, ns.seed)

    def generate_kwargs(self, ends: AnswerEnd, tokenizer: Any, prompt_width: int) -> dict:
        kwargs: dict[str, Any] = {
            "max_new_tokens": self.max_new_tokens,
            "eos_token_id": list(ends.eos_ids) or None,
            "pad_token_id": tokenizer.pad_token_id,
            "stopping_criteria": ends.stopping_criteria(tokenizer, prompt_width),
        }
        if self.temperature == 0:
            kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
        else:
            kwargs.update(do_sample=True, temperature=self.temperature, top_p=self.top_p)
        return kwargs


def visible(tokenizer: Any, ends: AnswerEnd, ids: Sequence[int], final: bool) -> str:
    """What to show of the generated ``ids``: special tokens dropped, cut at the first end (EOS,
    the marker, a new turn); unless ``final``, also without a tail that may be the start of a
    marker still being spelled, so streaming never shows a piece of one."""
    ids = [int(i) for i in ids]
    for i, token in enumerate(ids):
        if token in ends.eos_ids:
            ids, final = ids[:i], True
            break
    # Decoded with special tokens kept, so a text end that is a special token cuts here too.
    text = tokenizer.decode(ids, skip_special_tokens=False)
    cut = False
    for end in ends.texts:
        if end in text:
            text, cut = text.split(end, 1)[0], True
    if not cut:
        for end in ends.texts:
            text = strip_partial(text, end)
    specials = [t for t in tokenizer.all_special_tokens if t]
    for token in specials:
        text = text.replace(token, "")
    if not cut and not final:
        for token in specials:
            text = strip_partial(text, token)
    return text.lstrip()
