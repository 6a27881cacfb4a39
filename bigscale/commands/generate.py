"""``bigscale generate TARGET --prompts FILE --out FILE``: answers for a jsonl of prompts
(``{"prompt": ...}``) or conversations (``{"messages": [...]}``), in batches, each input row
written back with its ``answer`` (and ``ended``: false where the token budget cut it)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from bigscale.commands.sampling import Sampling, add_flags, visible
from bigscale.errors import DataError


def main(args: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="bigscale generate")
    add_flags(parser, max_new_tokens=256)
    parser.add_argument("--prompts", type=Path, required=True, help="input jsonl")
    parser.add_argument("--out", type=Path, required=True, help="output jsonl")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument(
        "--no-template",
        action="store_true",
        help="give {'prompt': ...} rows to the model as raw text, not as a user turn of the "
        "chat template",
    )
    ns = parser.parse_args(args)
    sampling = Sampling.from_args(ns)
    rows = read_rows(ns.prompts)
    from bigscale.target import check_dtype, load_model, load_tokenizer, resolve

    with resolve(Path(ns.target)) as target:
        tokenizer = load_tokenizer(target)
        model = load_model(target, tokenizer, check_dtype(ns.dtype))
        templated = bool(getattr(tokenizer, "chat_template", None)) and not ns.no_template
        texts = [prompt_text(tokenizer, row, templated, ns.system, i) for i, row in rows]
        answers = generate(model, tokenizer, texts, sampling, templated, ns.batch_size)
    ns.out.parent.mkdir(parents=True, exist_ok=True)
    with ns.out.open("w", encoding="utf-8") as out:
        for (_, row), (answer, ended) in zip(rows, answers, strict=True):
            out.write(json.dumps({**row, "answer": answer, "ended": ended}) + "\n")
    print(f"wrote {len(rows)} answers to {ns.out}", file=sys.stderr)
    return 0


def read_rows(path: Path) -> list[tuple[str, dict]]:
    if not path.is_file():
        raise DataError(f"--prompts {path}: no such file")
    rows = []
    for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(f"{path}:{lineno}: not JSON ({exc.msg})") from None
        if not isinstance(row, dict) or not ("prompt" in row or "messages" in row):
            raise DataError(
                f'{path}:{lineno}: expected {{"prompt": "..."}} or {{"messages": [...]}}'
            )
        rows.append((f"{path}:{lineno}", row))
    if not rows:
        raise DataError(f"--prompts {path}: the file holds no rows")
    return rows


def prompt_text(tokenizer: Any, row: dict, templated: bool, system: str | None, where: str) -> str:
    """The text the model continues: the conversation through the chat template with the
    assistant's turn opened, or a raw prompt."""
    if "messages" in row:
        if not getattr(tokenizer, "chat_template", None):
            raise DataError(f"{where}: a conversation needs a chat template; the model has none")
        messages = conversation_to_answer(row["messages"], where)
    elif templated:
        messages = [{"role": "user", "content": str(row["prompt"])}]
    else:
        return str(row["prompt"])
    if system and messages[0]["role"] != "system":
        messages = [{"role": "system", "content": system}, *messages]
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def generate(
    model: Any,
    tokenizer: Any,
    texts: list[str],
    sampling: Sampling,
    chat: bool,
    batch_size: int,
) -> list[tuple[str, bool]]:
    """(answer, whether it ended by itself) per text, generated ``batch_size`` at a time."""
    import torch
    from transformers import set_seed

    from bigscale.generation import answer_end

    ends = answer_end(tokenizer, chat)
    set_seed(sampling.seed)
    tokenizer.padding_side = "left"  # generation continues every row from its last token
    results: list[tuple[str, bool]] = []
    for start in range(0, len(texts), batch_size):
        # The template already wrote BOS where it wants one.
        batch = tokenizer(
            texts[start : start + batch_size],
            return_tensors="pt",
            padding=True,
            add_special_tokens=not chat,
        ).to(model.device)
        width = batch["input_ids"].shape[1]
        with torch.no_grad():
            out = model.generate(**batch, **sampling.generate_kwargs(ends, tokenizer, width))
        for row in out[:, width:]:
            answer = visible(tokenizer, ends, row, final=True)
            _, ended = ends.answer(tokenizer, row)
            results.append((answer.strip(), ended))
    return results


def conversation_to_answer(raw: Any, where: str) -> list[dict]:
    """The turns before the answer to generate: the whole conversation, or all but a final
    assistant turn (whose answer is generated again, e.g. to build preference pairs)."""
    from bigscale.data.chat import check_conversation

    if (
        isinstance(raw, list)
        and raw
        and not (isinstance(raw[-1], dict) and raw[-1].get("role") == "assistant")
    ):
        raw = [*raw, {"role": "assistant", "content": ""}]  # the turn to generate
    messages = check_conversation(raw, "messages", where)[:-1]
    if not messages:
        raise DataError(f"{where}: the conversation has no turn before the assistant's")
    return messages
