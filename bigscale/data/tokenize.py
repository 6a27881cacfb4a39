"""Raw examples -> ``input_ids`` and ``labels`` (-100 where no loss), with overlong handling.

The styles differ only in which tokens carry loss: every token but BOS (text), the response and
EOS (prompt_response), or the assistant turns (chat, and alpaca rendered as a chat). Chat turns
are located by rendering the conversation prefix by prefix (``bigscale.data.chat``), so it works
with whatever markers a chat template uses.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import datasets
import numpy as np

from bigscale.config.schema import DataConfig, DataStyle, Overlong
from bigscale.data.chat import (
    CHAT_STYLES,
    IGNORE_INDEX,
    conversation,
    encode_chat,
    require_chat_template,
)
from bigscale.data.literal import text_ids
from bigscale.errors import DataError

# Bump when the encoding changes, so caches written by an older bigscale are not reused.
# 2: special-token strings in the data are tokenized as text.
_ENCODING_VERSION = 2

# Per-example outcome, kept in a temporary column so the report survives cache hits.
_KEPT, _TRUNCATED, _DROPPED_OVERLONG, _DROPPED_NO_LOSS = 0, 1, 2, 3
_STATUS, _N_TOKENS, _N_LOSS = "_bigscale_status", "_bigscale_tokens", "_bigscale_loss_tokens"
ENCODED_FEATURES = datasets.Features(
    {
        "input_ids": datasets.List(datasets.Value("int32")),
        "labels": datasets.List(datasets.Value("int32")),
        _STATUS: datasets.Value("int8"),
        _N_TOKENS: datasets.Value("int32"),
        _N_LOSS: datasets.Value("int32"),
    }
)
"""Columns of an encoded split before filtering: ids, labels and the per-example outcome."""


def kept_mask(status: np.ndarray) -> np.ndarray:
    """Which examples an encoding kept (whole or truncated), from their status codes."""
    return np.isin(status, [_KEPT, _TRUNCATED])


@dataclass
class TokenizeReport:
    """What tokenization kept and dropped from one split."""

    examples_in: int = 0
    examples_out: int = 0
    truncated: int = 0
    dropped_overlong: int = 0
    dropped_no_loss: int = 0
    tokens: int = 0
    """Tokens in the kept examples."""
    loss_tokens: int = 0
    """Kept tokens whose label is not -100."""

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


def _tokens(tokenizer: Any, text: str) -> list[int]:
    # Special tokens are placed explicitly by each style, never by the tokenizer's
    # post-processor, nor by a "</s>" written in the data (bigscale.data.literal).
    return text_ids(tokenizer, text)


def _field(example: dict, column: str, key: str, index: int | None) -> Any:
    value = example.get(column)
    if value is None:
        at = f"example {index}" if index is not None else "an example"
        raise DataError(f"{at} has no value for {key}={column!r}.")
    return value


def _text(example: dict, column: str, key: str, index: int | None) -> str:
    value = _field(example, column, key, index)
    if not isinstance(value, str):
        at = f"example {index}" if index is not None else "an example"
        raise DataError(f"{at}: {key}={column!r} must be a string, got {type(value).__name__}.")
    return value


def encode_example(
    example: dict, tokenizer: Any, cfg: DataConfig, index: int | None = None
) -> dict[str, list[int]]:
    """Token ids and labels for one raw example, before any length limit.

    Styles: ``text`` is BOS + text + EOS with loss on all but BOS (none for blank text);
    ``prompt_response`` is BOS + prompt + response + EOS with loss on response + EOS; ``chat`` is
    the chat template's rendering with loss on the assistant turns (content and end marker, not
    the header the generation prompt supplies); ``alpaca`` is a user turn (instruction + input)
    and an assistant turn (output), rendered and masked as ``chat``.

    ``index`` only makes error messages point at the offending example.
    """
    style = DataStyle(cfg.style)
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    if style is DataStyle.text:
        text = _text(example, cfg.text_field, "data.text_field", index)
        body = _tokens(tokenizer, text) + eos
        # Blank lines (common in .txt corpora) would only teach "EOS right after BOS": no loss,
        # so they are dropped and counted with the other loss-free examples.
        loss = body if text.strip() else [IGNORE_INDEX] * len(body)
        return {"input_ids": bos + body, "labels": [IGNORE_INDEX] * len(bos) + loss}
    if style is DataStyle.prompt_response:
        prompt = _tokens(tokenizer, _text(example, cfg.prompt_field, "data.prompt_field", index))
        # Tokenized apart from the prompt, as at generation time when the prompt is the input.
        response = (
            _tokens(tokenizer, _text(example, cfg.response_field, "data.response_field", index))
            + eos
        )
        masked = bos + prompt
        return {
            "input_ids": masked + response,
            "labels": [IGNORE_INDEX] * len(masked) + response,
        }
    # chat and alpaca: both become messages rendered through the chat template (bigscale.data.chat)
    require_chat_template(tokenizer, cfg)
    ids, labels = encode_chat(conversation(example, cfg, index), tokenizer, index)
    return {"input_ids": ids, "labels": labels}


def _encode_batch(
    batch: dict[str, list], indices: list[int], tokenizer: Any, cfg: DataConfig
) -> dict[str, list]:
    out: dict[str, list] = {k: [] for k in ("input_ids", "labels", _STATUS, _N_TOKENS, _N_LOSS)}
    columns = list(batch)
    for row, index in enumerate(indices):
        example = {c: batch[c][row] for c in columns}
        enc = encode_example(example, tokenizer, cfg, index)
        ids, labels = enc["input_ids"], enc["labels"]
        status = _KEPT
        if len(ids) > cfg.max_length:
            if Overlong(cfg.overlong) is Overlong.drop:
                status = _DROPPED_OVERLONG
            else:
                ids, labels = ids[: cfg.max_length], labels[: cfg.max_length]
                status = _TRUNCATED
        n_loss = sum(1 for t in labels if t != IGNORE_INDEX)
        if status != _DROPPED_OVERLONG and n_loss == 0:
            status = _DROPPED_NO_LOSS
        if status in (_DROPPED_OVERLONG, _DROPPED_NO_LOSS):
            ids, labels = [], []  # not kept: don't spend cache space on them
        out["input_ids"].append(ids)
        out["labels"].append(labels)
        out[_STATUS].append(status)
        out[_N_TOKENS].append(len(ids))
        out[_N_LOSS].append(n_loss if ids else 0)
    return out


def _hash(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """Identity of a tokenizer's behaviour: name, vocabulary, special tokens and chat template."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    parts = {
        "class": type(tokenizer).__name__,
        "name_or_path": getattr(tokenizer, "name_or_path", ""),
        "vocab_size": len(tokenizer),
        "vocab": _hash(sorted(tokenizer.get_vocab().items())),
        # Normalizer, pre-tokenizer and merges matter as much as the vocabulary.
        "backend": hashlib.sha256(backend.to_str().encode()).hexdigest() if backend else None,
        "special": [tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id],
        "chat_template": getattr(tokenizer, "chat_template", None),
    }
    return _hash(parts)


def cache_key(
    ds: datasets.Dataset,
    tokenizer: Any,
    cfg: DataConfig,
    extra: str = "",
    data_id: str | None = None,
) -> str:
    """Stable name for the tokenized form of ``ds``: same data, tokenizer and settings -> same key.

    Every rank computes the same key from its own objects, which is how they find rank 0's files.
    ``data_id`` names the data by content (``bigscale.data.mixture.files_fingerprint``) instead
    of ``datasets``' fingerprint, which for local files follows their path and mtime.
    """
    settings = {
        "version": _ENCODING_VERSION,
        "style": DataStyle(cfg.style).value,
        "fields": [
            *(cfg.text_field, cfg.prompt_field, cfg.response_field, cfg.messages_field),
            *(cfg.instruction_field, cfg.input_field, cfg.output_field),
        ],
        "max_length": cfg.max_length,
        "overlong": Overlong(cfg.overlong).value,
        "extra": extra,
    }
    parts = [data_id or ds._fingerprint, tokenizer_fingerprint(tokenizer), _hash(settings)]
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:32]


def report_outcomes(
    mapped: datasets.Dataset,
    columns: tuple[str, str, str] = (_STATUS, _N_TOKENS, _N_LOSS),
) -> TokenizeReport:
    """The report of an encoded split from its outcome ``columns`` (status, tokens, loss
    tokens), with the status codes of ``_encode_batch``; only kept rows count tokens.

    Preference pairs keep their own column names (their caches on disk hold them), so they pass
    them here."""
    status_column, tokens_column, loss_column = columns
    table = mapped.with_format("arrow")  # whole columns at once; numpy format reads row by row

    def column(name: str) -> np.ndarray:
        return table[name].to_numpy().astype(np.int64)

    status = column(status_column)
    kept = kept_mask(status)
    return TokenizeReport(
        examples_in=len(status),
        examples_out=int(kept.sum()),
        truncated=int((status == _TRUNCATED).sum()),
        dropped_overlong=int((status == _DROPPED_OVERLONG).sum()),
        dropped_no_loss=int((status == _DROPPED_NO_LOSS).sum()),
        tokens=int(column(tokens_column)[kept].sum()),
        loss_tokens=int(column(loss_column)[kept].sum()),
    )


def _sentence(text: str) -> str:
    return text[:1].upper() + text[1:] + "."


def _empty_error(report: TokenizeReport, cfg: DataConfig) -> DataError:
    hints = []
    if report.dropped_overlong:
        hints.append("raise data.max_length or use data.overlong=truncate")
    if report.dropped_no_loss:
        hints.append(
            "check that the loss-bearing field (response / assistant turns) is not empty and "
            "fits within data.max_length"
        )
    return DataError(
        f"dataset is empty after filtering: {report.examples_in} in, "
        f"{report.dropped_overlong} dropped as longer than data.max_length={cfg.max_length}, "
        f"{report.dropped_no_loss} dropped with no loss-bearing tokens. "
        + _sentence("; ".join(hints) or "check the data")
    )


def _sibling(cache_file: str | None, tag: str) -> str | None:
    if cache_file is None:
        return None
    stem, ext = os.path.splitext(cache_file)
    return f"{stem}.{tag}{ext or '.arrow'}"


def map_encoded(
    ds: datasets.Dataset,
    encode_batch: Callable[..., dict[str, list]],
    tokenizer: Any,
    cfg: DataConfig,
    cache_file: str | None,
    key: str,
    features: datasets.Features,
    desc: str,
) -> datasets.Dataset:
    """``encode_batch(batch, indices, tokenizer, cfg)`` over every row of ``ds``, replacing its
    columns with ``features``; written to ``cache_file`` and fingerprinted ``key``, so a later
    call with the same name and key reads the file instead of encoding again."""
    return ds.map(
        encode_batch,
        batched=True,
        with_indices=True,
        fn_kwargs={"tokenizer": tokenizer, "cfg": cfg},
        remove_columns=ds.column_names,
        num_proc=cfg.num_proc if cfg.num_proc > 1 else None,
        cache_file_name=cache_file,
        load_from_cache_file=True,
        new_fingerprint=key,
        features=features,
        desc=desc,
    )


def tokenize_split(
    ds: datasets.Dataset,
    tokenizer: Any,
    cfg: DataConfig,
    cache_file: str | None,
    key: str | None = None,
) -> tuple[datasets.Dataset, TokenizeReport]:
    """Tokenize one split, apply ``data.overlong``, drop loss-free examples, and report counts.

    With ``cache_file`` the result is written there (and a ``.kept`` indices file beside it) and
    reused by any later call with the same name. ``key`` (default ``cache_key(...)``) becomes the
    result's fingerprint, so no rank has to hash the tokenizer through ``datasets``.
    """
    if DataStyle(cfg.style) in CHAT_STYLES:
        require_chat_template(tokenizer, cfg)
    key = key or cache_key(ds, tokenizer, cfg)
    mapped = map_encoded(
        ds, _encode_batch, tokenizer, cfg, cache_file, key, ENCODED_FEATURES, "Tokenizing"
    )
    report = report_outcomes(mapped)
    if report.examples_out == 0:
        raise _empty_error(report, cfg)
    kept = mapped.filter(
        kept_mask,
        input_columns=[_STATUS],
        batched=True,
        batch_size=10_000,
        cache_file_name=_sibling(cache_file, "kept"),
        load_from_cache_file=True,
        new_fingerprint=f"{key}-kept",
        desc="Filtering",
    )
    return kept.remove_columns([_STATUS, _N_TOKENS, _N_LOSS]), report
