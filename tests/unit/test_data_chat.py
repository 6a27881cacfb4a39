"""Chat SFT: built-in and user templates, the alpaca style, and bad conversations, checked token
by token on the character tokenizer (one id per character, special tokens one id each)."""

from __future__ import annotations

import json
from pathlib import Path

import datasets
import pytest

from bigscale.config.schema import DataConfig, DataStyle
from bigscale.data.chat import BUILTIN_TEMPLATES, set_chat_template, turn_end_marker
from bigscale.data.sources import preflight
from bigscale.data.tokenize import encode_example, tokenize_split, tokenizer_fingerprint
from bigscale.errors import ConfigError, DataError
from bigscale.generation import answer_end
from bigscale.train import task_eval
from tests.unit.test_data_tokenize import CONVERSATION, IGN, expected

ALPACA = {"instruction": "Add.", "input": "1+2", "output": "3"}


def alpaca_cfg(**kw) -> DataConfig:
    return DataConfig(**{"path": "x", "style": DataStyle.alpaca, **kw})


def test_alpaca_through_the_alpaca_template(char_tokenizer) -> None:
    cfg = alpaca_cfg(chat_template="alpaca")
    set_chat_template(char_tokenizer, cfg)
    out = encode_example(ALPACA, char_tokenizer, cfg)
    ids, labels = expected(
        char_tokenizer,
        [
            ("### Instruction:\nAdd.\n\n1+2\n\n### Response:\n", False),
            ("3", True), ("</s>", True), ("\n\n", True),
        ],
    )  # fmt: skip
    assert out == {"input_ids": ids, "labels": labels}


def test_alpaca_through_chatml_without_input(char_tokenizer) -> None:
    cfg = alpaca_cfg(chat_template="chatml")
    set_chat_template(char_tokenizer, cfg)
    out = encode_example({"instruction": "hi", "input": "", "output": "yo"}, char_tokenizer, cfg)
    ids, labels = expected(
        char_tokenizer,
        [
            ("<|im_start|>", False), ("user\nhi", False), ("<|im_end|>", False), ("\n", False),
            ("<|im_start|>", False), ("assistant\n", False),
            ("yo", True), ("<|im_end|>", True), ("\n", True),
        ],
    )  # fmt: skip
    assert out == {"input_ids": ids, "labels": labels}


def test_llama3_builtin_multi_turn(char_tokenizer) -> None:
    cfg = DataConfig(path="x", style=DataStyle.chat, chat_template="llama3")
    set_chat_template(char_tokenizer, cfg)
    out = encode_example({"messages": CONVERSATION}, char_tokenizer, cfg)
    head = "<|start_header_id|>{}<|end_header_id|>\n\n"
    ids, labels = expected(
        char_tokenizer,
        [
            ("<s>", False),
            (head.format("system") + "Be brief.<|eot_id|>", False),
            (head.format("user") + "hi<|eot_id|>", False),
            (head.format("assistant"), False), ("yo<|eot_id|>", True),
            (head.format("user") + "again<|eot_id|>", False),
            (head.format("assistant"), False), ("ok!<|eot_id|>", True),
        ],
    )  # fmt: skip
    assert out == {"input_ids": ids, "labels": labels}


@pytest.mark.parametrize("name", sorted(BUILTIN_TEMPLATES))
def test_every_builtin_trains_on_the_answers_and_their_end_marker_only(
    char_tokenizer, name: str
) -> None:
    cfg = DataConfig(path="x", style=DataStyle.chat, chat_template=name)
    set_chat_template(char_tokenizer, cfg)
    conversation = [m for m in CONVERSATION if name != "alpaca" or m["role"] != "system"]
    out = encode_example({"messages": conversation}, char_tokenizer, cfg)
    trained = char_tokenizer.decode([t for t in out["labels"] if t != IGN])
    marker = turn_end_marker(char_tokenizer)
    assert marker and trained.replace("\n", "") == f"yo{marker}ok!{marker}"


def test_template_from_a_jinja_file_changes_the_cache_fingerprint(
    char_tokenizer, tmp_path: Path
) -> None:
    path = tmp_path / "mine.jinja"
    path.write_text(
        "{% for m in messages %}[{{ m['role'] }}]{{ m['content'] }}{% endfor %}"
        "{% if add_generation_prompt %}[assistant]{% endif %}"
    )
    before = tokenizer_fingerprint(char_tokenizer)
    cfg = DataConfig(path="x", style=DataStyle.chat, chat_template=str(path))
    set_chat_template(char_tokenizer, cfg)
    assert tokenizer_fingerprint(char_tokenizer) != before
    msgs = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]
    out = encode_example({"messages": msgs}, char_tokenizer, cfg)
    assert out == dict(zip(("input_ids", "labels"), expected(
        char_tokenizer, [("[user]q[assistant]", False), ("a", True)]
    ), strict=True))  # fmt: skip


@pytest.mark.parametrize(
    ("value", "fragment"),
    [
        ("chatmel", "no such built-in template. Use a built-in name (one of chatml, llama3"),
        ("templates/missing.jinja", "no such file"),
    ],
)
def test_unknown_template_names_the_choices(value: str, fragment: str) -> None:
    with pytest.raises(ConfigError, match="data.chat_template") as err:
        set_chat_template(object(), DataConfig(path="x", chat_template=value))
    assert fragment in str(err.value)


def test_template_with_a_syntax_error_names_the_line(tmp_path: Path) -> None:
    path = tmp_path / "bad.jinja"
    path.write_text("{% for m in messages %}\n{{ m['content'] }\n")
    with pytest.raises(ConfigError, match=r"line 2: .*fix the template"):
        set_chat_template(object(), DataConfig(path="x", chat_template=str(path)))


def chat_rows(bad_index: int, bad: list[dict]) -> datasets.Dataset:
    good = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]
    return datasets.Dataset.from_list(
        [{"messages": bad if i == bad_index else good} for i in range(bad_index + 2)]
    )


def test_conversation_not_ending_with_the_assistant(char_tokenizer) -> None:
    rows = chat_rows(2, [{"role": "user", "content": "q"}])
    cfg = DataConfig(path="x", style=DataStyle.chat)
    with pytest.raises(DataError, match=r"example 2: the conversation ends with a 'user' message"):
        tokenize_split(rows, char_tokenizer, cfg, cache_file=None)


def test_template_that_raises_names_the_example_and_the_fix(char_tokenizer) -> None:
    # The built-in alpaca template has no tool role, and says so through raise_exception.
    bad = [{"role": "tool", "content": "42"}, {"role": "assistant", "content": "a"}]
    cfg = DataConfig(path="x", style=DataStyle.chat, chat_template="alpaca")
    set_chat_template(char_tokenizer, cfg)
    with pytest.raises(DataError) as err:
        tokenize_split(chat_rows(1, bad), char_tokenizer, cfg, cache_file=None)
    msg = str(err.value)
    assert msg.startswith("example 1: the chat template failed on this conversation")
    assert "no tool role" in msg and "data.chat_template=<chatml|" in msg


def test_no_template_points_at_data_chat_template(char_tokenizer) -> None:
    char_tokenizer.chat_template = None
    with pytest.raises(DataError, match=r"data.style=alpaca needs a chat template.*chatml"):
        encode_example(ALPACA, char_tokenizer, alpaca_cfg())


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_preflight_names_file_and_line_of_a_bad_conversation(tmp_path: Path) -> None:
    good = {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}
    bad = {"messages": [{"role": "human", "content": "q"}, {"role": "gpt", "content": "a"}]}
    path = write_jsonl(tmp_path / "chat.jsonl", [good, good, bad])
    with pytest.raises(DataError, match=r"chat.jsonl:3: unknown role 'human'.*'human' -> 'user'"):
        preflight(DataConfig(path=str(path), style=DataStyle.chat))


def test_preflight_alpaca_needs_instruction_and_output_not_input(tmp_path: Path) -> None:
    ok = write_jsonl(tmp_path / "ok.jsonl", [{"instruction": "a", "output": "b"}])
    preflight(alpaca_cfg(path=str(ok)))
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"instruction": "a", "answer": "b"}])
    with pytest.raises(DataError, match=r"data.output_field='output' is not a column"):
        preflight(alpaca_cfg(path=str(bad)))


def test_generation_prompt_and_answer_for_chat_styles(char_tokenizer, tmp_path: Path) -> None:
    test = write_jsonl(tmp_path / "test.jsonl", [ALPACA])
    cfg = alpaca_cfg(test_path=str(test), chat_template="chatml")
    set_chat_template(char_tokenizer, cfg)
    (example,) = task_eval.read_examples(cfg, limit=10)
    assert example.answer == "3"
    prompt = char_tokenizer.decode(task_eval._encode_prompt(char_tokenizer, example.prompt))
    assert prompt == "<|im_start|>user\nAdd.\n\n1+2<|im_end|>\n<|im_start|>assistant\n"
    # An answer ends at the template's end-of-turn marker, whatever follows it.
    generated = char_tokenizer("3<|im_end|>\n<|im_start|>user", add_special_tokens=False)
    end = answer_end(char_tokenizer, chat=True)
    assert end.answer(char_tokenizer, generated["input_ids"]) == ("3", True)
