"""Where a generated answer ends: at EOS, or at the chat template's end-of-turn marker, whether
the model has that marker as one special token or spells it as text in several tokens.

A template may write its marker as a token of the model (ChatML's ``<|im_end|>`` in SmolLM2) or
as plain text the model learned to spell (a built-in template on a model that lacks its tokens,
or a template whose markers the tokenizer does not know). Token markers join the EOS ids; text
markers are watched on the decoded text by a stopping criterion. An answer the token budget cut
inside the marker loses the partial marker, so a right answer is not scored wrong because the
budget ended mid-marker. The held-out eval uses this; a chat or generate command can too."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from transformers import StoppingCriteria

from bigscale.data.chat import turn_end_marker

# The criterion decodes only the last tokens of each row: enough for the longest stop text
# (each token of it adds at least one character) plus tokens that decode to nothing alone.
_TAIL_SLACK = 4


@dataclass(frozen=True)
class AnswerEnd:
    """What ends an answer for one tokenizer and template."""

    marker: str
    """The template's end-of-turn marker as text; empty without a template."""
    eos_ids: tuple[int, ...]
    """Token ids that end an answer: EOS, and the marker when it is one token of the model."""
    texts: tuple[str, ...]
    """Texts that end an answer wherever they appear in the decoded output."""
    stop_texts: tuple[str, ...]
    """The texts generation must watch for: the marker when the model spells it in tokens."""

    def stopping_criteria(self, tokenizer: Any, prompt_width: int) -> list[StoppingCriteria]:
        """For ``generate(stopping_criteria=...)``: rows stop once a stop text is generated.
        Empty when the end is tokens only (then ``eos_token_id=eos_ids`` suffices)."""
        if not self.stop_texts:
            return []
        return [StopAtText(tokenizer, self.stop_texts, prompt_width)]

    def answer(self, tokenizer: Any, ids: Sequence[int]) -> tuple[str, bool]:
        """The answer in the generated ``ids`` (prompt excluded) and whether it ended by itself;
        False means the budget cut it, and then a partial marker at its end is dropped."""
        ids = [int(i) for i in ids]
        ended = False
        for i, token in enumerate(ids):
            if token in self.eos_ids:
                ids, ended = ids[:i], True
                break
        # Special tokens stay in the text when a template marker is at stake: the marker may be
        # one, and what follows it (a pad, a new turn) is cut below with it.
        text = tokenizer.decode(ids, skip_special_tokens=not self.texts)
        for end in self.texts:
            if end in text:
                text, ended = text.split(end, 1)[0], True
        if not ended:
            text = strip_partial(text, self.marker)
        return text.strip(), ended


def strip_partial(text: str, marker: str) -> str:
    """``text`` without a beginning of ``marker`` at its end (``"1999<end_of"`` -> ``"1999"``)."""
    for k in range(min(len(marker), len(text)), 0, -1):
        if text.endswith(marker[:k]):
            return text[:-k]
    return text


def _single_token(tokenizer: Any, text: str) -> int | None:
    """The id of ``text`` when the model has it as one token (a special or added token)."""
    if not text:
        return None
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return int(ids[0]) if len(ids) == 1 else None


def answer_end(tokenizer: Any, chat: bool) -> AnswerEnd:
    """How answers end for ``tokenizer``: with ``chat``, at its template's end-of-turn marker
    (``bigscale.data.chat.turn_end_marker``) or EOS; otherwise at EOS, as prompt/response
    training taught."""
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    if not chat:
        return AnswerEnd("", tuple(eos), (), ())
    marker = turn_end_marker(tokenizer)
    marker_id = _single_token(tokenizer, marker)
    if marker_id is not None and marker_id not in eos:
        eos.append(marker_id)
    ends = tuple(dict.fromkeys(t for t in (marker, tokenizer.eos_token, tokenizer.pad_token) if t))
    stop = (marker,) if marker and marker_id is None else ()
    return AnswerEnd(marker, tuple(eos), ends, stop)


class StopAtText(StoppingCriteria):
    """Stops each row once its generated text (after ``prompt_width`` tokens) contains one of
    ``texts``. It only marks rows done, as EOS does, so under ZeRO-3's synced generation the
    ranks still agree on when everyone has finished."""

    def __init__(self, tokenizer: Any, texts: Sequence[str], prompt_width: int):
        self.tokenizer, self.texts, self.prompt_width = tokenizer, tuple(texts), prompt_width
        self.tail = max(len(t) for t in self.texts) + _TAIL_SLACK

    def __call__(self, input_ids: torch.LongTensor, scores: Any, **kwargs: Any) -> torch.Tensor:
        start = max(self.prompt_width, input_ids.shape[1] - self.tail)
        tails = self.tokenizer.batch_decode(input_ids[:, start:], skip_special_tokens=False)
        done = [any(t in text for t in self.texts) for text in tails]
        return torch.tensor(done, dtype=torch.bool, device=input_ids.device)
