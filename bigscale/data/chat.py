"""Chat SFT: templates, conversation checks, and the loss mask on the assistant's turns.

Assistant turns are located by rendering the conversation prefix by prefix with the tokenizer's
own chat template, so the mask is right whatever markers a template uses (no special
``{% generation %}`` tags needed). A model without a template gets one from
``data.chat_template``: a built-in name or a ``.jinja`` file, set on the tokenizer before any
tokenization, so the cache key (which hashes the tokenizer's template), the generation eval and
the exported tokenizer all see it.

This module imports nothing heavy: the launcher's pre-flight and config validation use it.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bigscale.config.schema import DataConfig, DataStyle
from bigscale.data.literal import encode_with_literal_spans, holds_special, special_strings
from bigscale.errors import ConfigError, DataError

IGNORE_INDEX = -100
ROLES = ("system", "user", "assistant", "tool")
CHAT_STYLES = (DataStyle.chat, DataStyle.alpaca)
"""Styles rendered through a chat template."""

# Written for this project after the published formats; each ends an assistant turn with a
# marker the model learns to emit (loss covers it), so generation knows where to stop.
BUILTIN_TEMPLATES: dict[str, str] = {
    "chatml": (
        "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] "
        "+ '<|im_end|>\\n' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
    ),
    "llama3": (
        "{{ bos_token }}{% for m in messages %}{{ '<|start_header_id|>' + m['role'] "
        "+ '<|end_header_id|>\\n\\n' + m['content'] | trim + '<|eot_id|>' }}{% endfor %}"
        "{% if add_generation_prompt %}"
        "{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"
    ),
    "zephyr": (
        "{% for m in messages %}{{ '<|' + m['role'] + '|>\\n' + m['content'] + eos_token "
        "+ '\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}"
    ),
    "alpaca": (
        "{% for m in messages %}"
        "{% if m['role'] == 'system' %}{{ m['content'] + '\\n\\n' }}"
        "{% elif m['role'] == 'user' %}{{ '### Instruction:\\n' + m['content'] + '\\n\\n' }}"
        "{% elif m['role'] == 'assistant' %}{{ '### Response:\\n' + m['content'] + eos_token "
        "+ '\\n\\n' }}"
        "{% else %}{{ raise_exception('the alpaca template has no ' + m['role'] + ' role') }}"
        "{% endif %}{% endfor %}{% if add_generation_prompt %}{{ '### Response:\\n' }}{% endif %}"
    ),
}


def _where(index: int | str | None) -> str:
    if isinstance(index, str):
        return index  # already a location, e.g. "file.jsonl:3"
    return f"example {index}" if index is not None else "an example"


def template_source(cfg: DataConfig) -> str | None:
    """The jinja text ``data.chat_template`` names, or None to keep the tokenizer's own.

    Raises ConfigError for an unknown built-in name, a missing file or a template that does not
    parse, so a typo fails in the launcher before any rank starts."""
    value = cfg.chat_template
    if not value:
        return None
    if value in BUILTIN_TEMPLATES:
        return BUILTIN_TEMPLATES[value]
    path = Path(value).expanduser()
    if not path.is_file():
        kind = "file" if path.suffix or "/" in value else "built-in template"
        raise ConfigError(
            f"data.chat_template={value!r}: no such {kind}. Use a built-in name (one of "
            f"{', '.join(BUILTIN_TEMPLATES)}) or the path to a .jinja file."
        )
    text = path.read_text(encoding="utf-8")
    import jinja2

    try:
        jinja2.Environment().parse(text)
    except jinja2.TemplateSyntaxError as e:
        raise ConfigError(
            f"data.chat_template={value!r}: line {e.lineno}: {e.message}; fix the template."
        ) from None
    return text


def set_chat_template(tokenizer: Any, cfg: DataConfig) -> None:
    """Put ``data.chat_template`` on the tokenizer (before tokenizing, so caches key on it)."""
    source = template_source(cfg)
    if source is not None:
        tokenizer.chat_template = source


def require_chat_template(tokenizer: Any, cfg: DataConfig | None = None) -> None:
    if not getattr(tokenizer, "chat_template", None):
        style = DataStyle(cfg.style).value if cfg is not None else "chat"
        raise DataError(
            f"data.style={style} needs a chat template, but tokenizer "
            f"{getattr(tokenizer, 'name_or_path', '')!r} has none. Set "
            f"data.chat_template=<{'|'.join(BUILTIN_TEMPLATES)}> or a path to a .jinja file, "
            "or use data.style=prompt_response."
        )


def check_conversation(raw: Any, key: str, index: int | str | None) -> list[dict[str, Any]]:
    """The messages of one conversation, with the problems a template cannot fix named.

    A conversation must end with the assistant: a trailing user turn would be trained on as
    context that nothing answers, which usually means the data was cut or mis-exported."""
    at = _where(index)
    if not isinstance(raw, list) or not raw:
        raise DataError(f"{at}: {key} must be a non-empty list of {{role, content}} messages.")
    messages = []
    for i, m in enumerate(raw):
        if not isinstance(m, dict) or "role" not in m:
            raise DataError(
                f"{at}: message {i} needs a 'role' and a 'content', got {m!r}. Fix that message."
            )
        if m["role"] not in ROLES:
            raise DataError(
                f"{at}: unknown role {m['role']!r} in message {i}; roles must be one of "
                f"{list(ROLES)}. Rename it (e.g. 'human' -> 'user', 'gpt' -> 'assistant')."
            )
        # Arrow gives every message the union of keys seen in the column, absent ones as None.
        messages.append({k: v for k, v in m.items() if v is not None})
    if messages[-1]["role"] != "assistant":
        raise DataError(
            f"{at}: the conversation ends with a {messages[-1]['role']!r} message, not the "
            "assistant's; drop the trailing turns or the example."
        )
    return messages


def alpaca_messages(example: dict, cfg: DataConfig, index: int | str | None) -> list[dict]:
    """instruction (+ input) as the user turn, output as the assistant turn."""
    at = _where(index)
    parts = []
    for key, column, required in (
        ("data.instruction_field", cfg.instruction_field, True),
        ("data.input_field", cfg.input_field, False),
        ("data.output_field", cfg.output_field, True),
    ):
        value = example.get(column)
        if value is None and not required:
            value = ""
        if not isinstance(value, str) or (required and not value.strip()):
            raise DataError(f"{at}: {key}={column!r} must be a non-empty string, got {value!r}.")
        parts.append(value)
    instruction, extra, output = parts
    user = f"{instruction}\n\n{extra}" if extra.strip() else instruction
    return [{"role": "user", "content": user}, {"role": "assistant", "content": output}]


def conversation(example: dict, cfg: DataConfig, index: int | str | None) -> list[dict]:
    """The checked messages of a chat or alpaca example."""
    if DataStyle(cfg.style) is DataStyle.alpaca:
        return alpaca_messages(example, cfg, index)
    raw = example.get(cfg.messages_field)
    return check_conversation(raw, f"data.messages_field={cfg.messages_field!r}", index)


def render(
    tokenizer: Any, messages: Sequence[dict], generation_prompt: bool, index: int | None = None
) -> str:
    try:
        return tokenizer.apply_chat_template(
            list(messages), tokenize=False, add_generation_prompt=generation_prompt
        )
    except Exception as e:  # jinja's TemplateError, or whatever the template raises
        raise DataError(
            f"{_where(index)}: the chat template failed on this conversation ({e}). Fix or drop "
            "the example, or choose another template with data.chat_template=<"
            f"{'|'.join(BUILTIN_TEMPLATES)}> or a .jinja file."
        ) from e


def _common_prefix(a: str, b: str) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


def _tokens(tokenizer: Any, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def encode_chat(
    messages: list[dict], tokenizer: Any, index: int | None, last_turn_only: bool = False
) -> tuple[list[int], list[int]]:
    """Token ids of the rendered conversation and labels carrying only the assistant turns
    (with ``last_turn_only``, only the last one: a preference pair's completion)."""
    full = render(tokenizer, messages, False, index)
    # Character span of each assistant turn within the full rendering. The start is after the
    # generation prompt (the "assistant:" header the model is given at inference); the end is
    # what rendering that message added. The common prefix with the full text keeps this right
    # for templates that render earlier turns differently once later ones exist.
    spans = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        start = _common_prefix(render(tokenizer, messages[:i], True, index), full) if i else 0
        end = _common_prefix(render(tokenizer, messages[: i + 1], False, index), full)
        if end > start:
            spans.append((start, end))
    if last_turn_only:
        spans = spans[-1:]

    literal = _literal_spans(tokenizer, messages, full, index)
    if not getattr(tokenizer, "is_fast", False):
        if literal:
            raise DataError(
                f"{_where(index)}: a message holds a special-token string of the tokenizer "
                f"({', '.join(special_strings(tokenizer))}), which bigscale tokenizes as text only "
                "with a fast tokenizer; use the model's fast tokenizer or remove the string."
            )
        # Python tokenizers have no character offsets: use token counts of the rendered prefixes.
        ids = _tokens(tokenizer, full)
        labels = [IGNORE_INDEX] * len(ids)
        for s, e in spans:
            lo, hi = len(_tokens(tokenizer, full[:s])), len(_tokens(tokenizer, full[:e]))
            labels[lo:hi] = ids[lo:hi]
        return ids, labels
    # A token carries loss when it starts inside an assistant span.
    ids, offsets = encode_with_literal_spans(tokenizer, full, literal)
    labels = [
        tok if any(s <= start < e for s, e in spans) else IGNORE_INDEX
        for tok, (start, _) in zip(ids, offsets, strict=True)
    ]
    return ids, labels


def _literal_spans(
    tokenizer: Any, messages: list[dict], full: str, index: int | str | None
) -> list[tuple[int, int]]:
    """Where, in the rendered ``full`` text, the messages that hold a special-token string have
    their content; those characters are tokenized as text (``bigscale.data.literal``).

    Found by rendering: the conversation up to the message starts its block; the message with
    empty content renders the same up to where the content goes (the last place at or before
    the two renderings part where the content is found). Templates that trim the content are
    matched on the trimmed text."""
    found = []
    for i, m in enumerate(messages):
        content = m.get("content")
        if not isinstance(content, str) or not holds_special(tokenizer, content):
            continue
        block = _common_prefix(render(tokenizer, messages[:i], False, index), full) if i else 0
        empty = [*messages[:i], {**m, "content": ""}]
        parted = _common_prefix(render(tokenizer, empty, False, index), full)
        end = _common_prefix(render(tokenizer, messages[: i + 1], False, index), full)
        for text in dict.fromkeys((content, content.strip())):
            start = full.rfind(text, block, parted + len(text))
            if start < 0:
                start = full.find(text, block, max(end, block))
            if start >= 0:
                found.append((start, start + len(text)))
                break
        else:
            raise DataError(
                f"{_where(index)}: message {i} holds a special-token string of the tokenizer, "
                "and the chat template changes the message's text, so bigscale cannot keep "
                "that string as text; remove it from the message."
            )
    return found


def turn_end_marker(tokenizer: Any) -> str:
    """What the template writes after an assistant message (``<|im_end|>``, ``</s>``...), found
    by rendering a probe; generated answers are cut there. Empty when nothing follows."""
    probe = "\x00bigscale-probe\x00"
    text = render(
        tokenizer,
        [{"role": "user", "content": "q"}, {"role": "assistant", "content": probe}],
        False,
    )
    return text.split(probe, 1)[-1].strip()


def preflight_rows(rows: Sequence[tuple[int, dict]], cfg: DataConfig, where: str) -> None:
    """Check each row's conversation in the launcher, naming ``file:line``."""
    for lineno, row in rows:
        conversation(row, cfg, f"{where}:{lineno}")
