"""Preference pairs: prompt / chosen / rejected rows -> token ids and labels for both sides.

A row holds its completions as strings (with a string prompt: BOS + prompt + completion + EOS,
loss on completion + EOS, as ``prompt_response`` SFT) or as {role, content} conversations that
share their prompt turns and end with the assistant's completion (as in
``HuggingFaceH4/ultrafeedback_binarized``): rendered through the chat template and masked with
the SFT rule of ``bigscale.data.chat``, restricted to the last assistant turn, the completion.

Pre-flight (``preflight_rows``, in the launcher, with file:line) and the ranks' encoding share
``pair_of``, so a bad pair is refused the same way from a local file or a hub dataset. This
module imports nothing heavy at import time: config validation uses ``check_objective``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from bigscale.config.schema import DataConfig, DataStyle, ObjectiveName, Overlong, TrainConfig
from bigscale.data.chat import (
    IGNORE_INDEX,
    check_conversation,
    encode_chat,
    require_chat_template,
)
from bigscale.errors import ConfigError, DataError

PREFERENCE_OBJECTIVES = (
    ObjectiveName.dpo,
    ObjectiveName.ipo,
    ObjectiveName.simpo,
    ObjectiveName.orpo,
    ObjectiveName.reward,
)
REFERENCE_OBJECTIVES = (ObjectiveName.dpo, ObjectiveName.ipo)
"""Objectives that compare the policy with the initial model (its log-probs precomputed)."""
REFERENCE_TABLE_COLUMNS = 2
"""A reference table's row: the initial model's summed log-probs of the chosen and the rejected
completion (float64), as ``bigscale.train.reference`` stores it and the plan sizes it."""

CHOSEN_KEY, REJECTED_KEY, PROMPT_KEY = (
    "data.chosen_field",
    "data.rejected_field",
    "data.prompt_field",
)
PAIR_COLUMNS = ("input_ids", "labels", "rejected_input_ids", "rejected_labels", "pair_index")
"""A tokenized pair: the chosen side keeps SFT's column names (so length statistics and the
plan read it as any split), the rejected side beside it, and the row's own index, which keys
its precomputed reference log-probs."""


def reference_pairs(cfg: TrainConfig) -> int:
    """Pairs per forward of the reference pass: ``objective.reference_batch_size``, or the
    training micro batch (the launcher's plan and the ranks read it here)."""
    return cfg.objective.reference_batch_size or cfg.trainer.micro_batch_size


def is_preference(cfg: TrainConfig) -> bool:
    return ObjectiveName(cfg.objective.name) in PREFERENCE_OBJECTIVES


def check_objective(cfg: TrainConfig) -> None:
    """Cross-field rules of ``objective.*`` with the data; raises ConfigError with the fix."""
    o, d = cfg.objective, cfg.data
    name = ObjectiveName(o.name)
    pairs = DataStyle(d.style) is DataStyle.preference
    if name in PREFERENCE_OBJECTIVES and not pairs:
        raise ConfigError(
            f"objective={name.value} trains on preference pairs, but data.style="
            f"{DataStyle(d.style).value}: give rows with data.prompt_field={d.prompt_field!r}, "
            f"data.chosen_field={d.chosen_field!r} and data.rejected_field={d.rejected_field!r} "
            "and set data.style=preference (data=preference_files data.path=<file>)"
        )
    if pairs and name not in PREFERENCE_OBJECTIVES:
        raise ConfigError(
            f"data.style=preference holds pairs for a preference objective, not "
            f"objective={name.value}; use objective=dpo|ipo|simpo|orpo|reward "
            "(or data.style=chat for SFT)"
        )
    if not pairs:
        return
    if o.beta <= 0:
        raise ConfigError(f"objective.beta={o.beta:g} must be positive (DPO typically 0.1)")
    if not 0.0 <= o.label_smoothing < 0.5:
        raise ConfigError(f"objective.label_smoothing={o.label_smoothing:g} must be in [0, 0.5)")
    if o.label_smoothing and name is not ObjectiveName.dpo:
        raise ConfigError(
            f"objective.label_smoothing={o.label_smoothing:g} is conservative DPO's; "
            f"objective={name.value} does not use it, set it to 0"
        )
    if o.gamma < 0:
        raise ConfigError(f"objective.gamma={o.gamma:g} must be 0 or positive")
    if o.lambda_ < 0:
        raise ConfigError(f"objective.lambda_={o.lambda_:g} must be 0 or positive")
    if o.reference_batch_size is not None and o.reference_batch_size < 1:
        raise ConfigError(
            f"objective.reference_batch_size={o.reference_batch_size} must be at least 1"
        )
    if name is ObjectiveName.reward and cfg.model.loss_chunk_tokens:
        raise ConfigError(
            f"model.loss_chunk_tokens={cfg.model.loss_chunk_tokens} chunks the LM head, which a "
            "reward model (objective=reward) replaces with a one-score head; set it to 0"
        )
    if name is ObjectiveName.reward and d.packing:
        # The classifier scores each row's last non-pad token (transformers' pooling), which a
        # packed row of several sequences does not have.
        raise ConfigError(
            "data.packing=true is not supported with objective=reward (its head scores each "
            "row's last token, one per sequence); unset data.packing"
        )
    for key, on in (
        ("data.streaming", d.streaming),
        ("data.mixture", bool(d.mixture)),
    ):
        if on:
            raise ConfigError(
                f"{key} is not supported with objective={name.value} (pairs are padded side by "
                f"side and their reference log-probs keyed by row); unset {key}"
            )


@dataclass
class Pair:
    """One checked pair: the completions and, for conversations, the shared prompt turns."""

    prompt: str | list[dict[str, Any]]
    chosen: str | list[dict[str, Any]]
    """A string, or the whole conversation (prompt turns + the assistant's completion)."""
    rejected: str | list[dict[str, Any]]

    @property
    def chat(self) -> bool:
        return isinstance(self.chosen, list)


def _where(index: int | str | None) -> str:
    if isinstance(index, str):
        return index
    return f"example {index}" if index is not None else "an example"


def _side(example: dict, column: str, key: str, at: str) -> Any:
    value = example.get(column)
    if value is None:
        raise DataError(
            f"{at}: {key}={column!r} is missing; a preference row needs "
            f"data.prompt_field, data.chosen_field and data.rejected_field. Fix that row."
        )
    if not isinstance(value, str | list):
        raise DataError(
            f"{at}: {key}={column!r} must be a string or a list of {{role, content}} messages, "
            f"got {type(value).__name__}. Fix that row."
        )
    return value


def _conversation(prompt: Any, side: list, key: str, at: str) -> list[dict[str, Any]]:
    messages = check_conversation(side, key, at)
    if len(messages) == 1:  # the completion alone: the prompt field holds the prompt
        if isinstance(prompt, str):
            return [{"role": "user", "content": prompt}, *messages]
        if isinstance(prompt, list):
            return [*check_conversation_prompt(prompt, at), *messages]
        raise DataError(
            f"{at}: {key} holds only the assistant's reply and data.prompt_field is missing; "
            "give the prompt turns in the conversation or in the prompt field."
        )
    return messages


def check_conversation_prompt(prompt: list, at: str) -> list[dict[str, Any]]:
    if not all(isinstance(m, dict) and "role" in m for m in prompt):
        raise DataError(f"{at}: data.prompt_field must hold {{role, content}} messages.")
    return [{k: v for k, v in m.items() if v is not None} for m in prompt]


def _text(message_or_text: str | list[dict[str, Any]]) -> str:
    if isinstance(message_or_text, str):
        return message_or_text
    return str(message_or_text[-1].get("content") or "")


def pair_of(example: dict, cfg: DataConfig, index: int | str | None) -> Pair:
    """The checked pair of one row: both sides present and of one kind, completions non-empty
    and different, conversations sharing their prompt turns."""
    at = _where(index)
    chosen = _side(example, cfg.chosen_field, CHOSEN_KEY, at)
    rejected = _side(example, cfg.rejected_field, REJECTED_KEY, at)
    prompt = example.get(cfg.prompt_field)
    if isinstance(chosen, str) != isinstance(rejected, str):
        raise DataError(
            f"{at}: {CHOSEN_KEY}={cfg.chosen_field!r} and {REJECTED_KEY}={cfg.rejected_field!r} "
            "must both be strings or both conversations. Fix that row."
        )
    if isinstance(chosen, str):
        if not isinstance(prompt, str):
            raise DataError(
                f"{at}: {PROMPT_KEY}={cfg.prompt_field!r} must be a string when the completions "
                f"are strings, got {type(prompt).__name__}. Fix that row."
            )
    else:
        chosen = _conversation(prompt, chosen, f"{CHOSEN_KEY}={cfg.chosen_field!r}", at)
        rejected = _conversation(prompt, rejected, f"{REJECTED_KEY}={cfg.rejected_field!r}", at)
        if chosen[:-1] != rejected[:-1]:
            raise DataError(
                f"{at}: the chosen and rejected conversations have different prompt turns; a "
                "pair compares two completions of one prompt. Fix that row."
            )
    for key, side in ((CHOSEN_KEY, chosen), (REJECTED_KEY, rejected)):
        if not _text(side).strip():
            raise DataError(f"{at}: {key} has an empty completion; fix or drop that row.")
    if _text(chosen) == _text(rejected):
        raise DataError(
            f"{at}: chosen and rejected completions are identical, so the pair prefers nothing; "
            "drop that row."
        )
    return Pair(prompt if isinstance(prompt, str) else "", chosen, rejected)


def required_fields(cfg: DataConfig) -> list[tuple[str, str]]:
    return [(CHOSEN_KEY, cfg.chosen_field), (REJECTED_KEY, cfg.rejected_field)]


def preflight_rows(rows: Sequence[tuple[Any, dict]], cfg: DataConfig, where: str) -> None:
    """Check each row's pair in the launcher, naming ``file:line``."""
    for place, row in rows:
        pair_of(row, cfg, f"{where}:{place}")


def _side_ids(
    tokenizer: Any, pair: Pair, completion: str | list[dict[str, Any]], index: int | None
) -> tuple[list[int], list[int]]:
    if isinstance(completion, list):
        return encode_chat(completion, tokenizer, index, last_turn_only=True)
    from bigscale.data.literal import text_ids

    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    masked = bos + text_ids(tokenizer, str(pair.prompt))
    body = text_ids(tokenizer, completion) + eos
    return masked + body, [IGNORE_INDEX] * len(masked) + body


def encode_pair(
    example: dict, tokenizer: Any, cfg: DataConfig, index: int | None = None
) -> dict[str, list[int]]:
    """Ids and labels of both sides, before any length limit."""
    pair = pair_of(example, cfg, index)
    if pair.chat:
        require_chat_template(tokenizer, cfg)
    ids, labels = _side_ids(tokenizer, pair, pair.chosen, index)
    r_ids, r_labels = _side_ids(tokenizer, pair, pair.rejected, index)
    return {
        "input_ids": ids,
        "labels": labels,
        "rejected_input_ids": r_ids,
        "rejected_labels": r_labels,
    }


def _fit(ids: list[int], labels: list[int], max_length: int) -> tuple[list[int], list[int]]:
    return ids[:max_length], labels[:max_length]


def _has_loss(labels: list[int]) -> bool:
    return any(t != IGNORE_INDEX for t in labels)


# The per-pair outcome columns, with bigscale.data.tokenize's status codes (0 kept, 1 truncated,
# 2 dropped overlong, 3 dropped without loss). Not SFT's names: pair caches on disk hold these.
_OUTCOME = ("status", "tokens", "loss_tokens")


def _encode_batch(
    batch: dict[str, list], indices: list[int], tokenizer: Any, cfg: DataConfig
) -> dict[str, list]:
    out: dict[str, list] = {k: [] for k in ("input_ids", "labels", "rejected_input_ids")}
    out.update(rejected_labels=[], status=[], tokens=[], loss_tokens=[])
    columns = list(batch)
    for row, index in enumerate(indices):
        enc = encode_pair({c: batch[c][row] for c in columns}, tokenizer, cfg, index)
        sides = [(enc["input_ids"], enc["labels"])]
        sides.append((enc["rejected_input_ids"], enc["rejected_labels"]))
        status = 0  # kept
        if any(len(ids) > cfg.max_length for ids, _ in sides):
            if Overlong(cfg.overlong) is Overlong.drop:
                status = 2
            else:
                sides = [_fit(ids, labels, cfg.max_length) for ids, labels in sides]
                status = 1
        if status != 2 and not all(_has_loss(labels) for _, labels in sides):
            status = 3  # a completion fell entirely past max_length
        if status >= 2:
            sides = [([], []), ([], [])]
        (ids, labels), (r_ids, r_labels) = sides
        out["input_ids"].append(ids)
        out["labels"].append(labels)
        out["rejected_input_ids"].append(r_ids)
        out["rejected_labels"].append(r_labels)
        out["status"].append(status)
        out["tokens"].append(len(ids) + len(r_ids))
        out["loss_tokens"].append(
            sum(t != IGNORE_INDEX for t in labels) + sum(t != IGNORE_INDEX for t in r_labels)
        )
    return out


def tokenize_pairs(
    ds: Any, tokenizer: Any, cfg: DataConfig, cache_file: str | None, key: str
) -> tuple[Any, Any]:
    """Tokenize one split of pairs into ``PAIR_COLUMNS`` (cached in ``cache_file``), applying
    ``data.overlong`` to each side (a pair is dropped whole), with the same report as SFT's."""
    import datasets
    import numpy as np

    from bigscale.data.tokenize import _empty_error, kept_mask, map_encoded, report_outcomes

    ids = datasets.List(datasets.Value("int32"))
    count = datasets.Value("int32")
    features = datasets.Features(
        {
            "input_ids": ids,
            "labels": ids,
            "rejected_input_ids": ids,
            "rejected_labels": ids,
            _OUTCOME[0]: datasets.Value("int8"),
            _OUTCOME[1]: count,
            _OUTCOME[2]: count,
        }
    )
    mapped = map_encoded(
        ds, _encode_batch, tokenizer, cfg, cache_file, key, features, "Tokenizing pairs"
    )
    report = report_outcomes(mapped, _OUTCOME)
    if report.examples_out == 0:
        raise _empty_error(report, cfg)
    kept = kept_mask(mapped.with_format("arrow")[_OUTCOME[0]].to_numpy())
    out = mapped.select(np.flatnonzero(kept).tolist()).flatten_indices(
        cache_file_name=f"{cache_file}.kept" if cache_file else None,
        new_fingerprint=f"{key}-kept",
    )
    out = out.remove_columns(list(_OUTCOME))
    return out.add_column(
        "pair_index", list(range(len(out))), new_fingerprint=f"{key}-indexed"
    ), report


def pair_collate(examples: list[dict[str, Any]], pad_id: int) -> dict[str, Any]:
    """One padded batch of the chosen rows followed by the rejected rows (one forward for
    both), with ``pair_index`` (which rows of the split these pairs are) and ``num_tokens``."""
    import torch

    from bigscale.data.collate import pad_collate

    rows = [{"input_ids": e["input_ids"], "labels": e["labels"]} for e in examples]
    rows += [
        {"input_ids": e["rejected_input_ids"], "labels": e["rejected_labels"]} for e in examples
    ]
    batch = pad_collate(rows, pad_id)
    batch["pair_index"] = torch.tensor([int(e["pair_index"]) for e in examples], dtype=torch.long)
    return batch
