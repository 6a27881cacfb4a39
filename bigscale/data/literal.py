"""Text from the data is text: a control-token string inside it (``</s>``, ``<|im_end|>``) is
tokenized as its characters, never as the special token.

Otherwise a row could end a turn or the document wherever it likes, and a poisoned dataset would
teach the model false turn boundaries (with loss on them, inside an assistant message). Only the
special tokens a chat template writes itself stay special.

Hugging Face tokenizers first cut the text at special tokens and tokenize each piece between
them on its own; so cutting at the template's special tokens only and tokenizing each piece with
``split_special_tokens=True`` gives the ids the data's text would have had, had it held no such
string. (A SentencePiece tokenizer that adds its word-start marker only at the start of the text
may differ in that one marker on a re-tokenized piece.)"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from typing import Any

Span = tuple[int, int]


def special_strings(tokenizer: Any) -> list[str]:
    """The strings the tokenizer turns into special tokens."""
    decoder = getattr(tokenizer, "added_tokens_decoder", {}) or {}
    return [t.content for t in decoder.values() if getattr(t, "special", False) and t.content]


def special_ids(tokenizer: Any) -> set[int]:
    decoder = getattr(tokenizer, "added_tokens_decoder", {}) or {}
    return {i for i, t in decoder.items() if getattr(t, "special", False)}


def holds_special(tokenizer: Any, text: str) -> bool:
    return any(s in text for s in special_strings(tokenizer))


def text_ids(tokenizer: Any, text: str) -> list[int]:
    """Ids of data text: special-token strings become ordinary tokens; no BOS/EOS is added."""
    return list(tokenizer(text, add_special_tokens=False, split_special_tokens=True)["input_ids"])


def encode_with_literal_spans(
    tokenizer: Any, text: str, literal: Sequence[Span]
) -> tuple[list[int], list[Span]]:
    """Ids and character offsets of ``text``, where special tokens inside the ``literal`` spans
    (the data's content in a rendered template) count as text. Needs a fast tokenizer."""
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids, offsets = list(enc["input_ids"]), [tuple(o) for o in enc["offset_mapping"]]
    specials = special_ids(tokenizer)

    def injected(k: int) -> bool:
        start, end = offsets[k]
        return any(lo <= start and end <= hi for lo, hi in literal)

    kept = [k for k, tok in enumerate(ids) if tok in specials and not injected(k)]
    if not any(tok in specials and injected(k) for k, tok in enumerate(ids)):
        return ids, offsets
    out_ids: list[int] = []
    out_offsets: list[Span] = []
    # Pieces between the template's own special tokens: a piece holding an injected one is
    # tokenized again with special tokens split; the others keep their ids.
    bounds = [-1, *kept, len(ids)]
    for left, right in itertools.pairwise(bounds):
        piece = range(left + 1, right)
        if any(ids[k] in specials for k in piece):
            lo = offsets[left][1] if left >= 0 else 0
            hi = offsets[right][0] if right < len(ids) else len(text)
            sub = tokenizer(
                text[lo:hi],
                add_special_tokens=False,
                return_offsets_mapping=True,
                split_special_tokens=True,
            )
            out_ids += list(sub["input_ids"])
            out_offsets += [(lo + s, lo + e) for s, e in sub["offset_mapping"]]
        else:
            out_ids += [ids[k] for k in piece]
            out_offsets += [offsets[k] for k in piece]
        if right < len(ids):
            out_ids.append(ids[right])
            out_offsets.append(offsets[right])
    return out_ids, out_offsets
