"""The dates task as preference pairs (``data=dates_pairs``, ``experiment=dpo_demo``): a subtly
wrong answer rejected against the right one, the split of the dates task kept, the held-out chats
scored as chat, and the preset validated and prepared as a run prepares it."""

from __future__ import annotations

import datetime
import json
import random
from pathlib import Path

import pytest

from bigscale.config.compose import compose_config
from bigscale.config.schema import DataConfig, DataStyle
from bigscale.config.validate import Hardware, validate
from bigscale.data.preference import encode_pair, pair_of
from bigscale.data.preference_task import (
    DATES_PAIRS_TRAIN_SIZE,
    DATES_PAIRS_VALIDATION_SIZE,
    dates_preference_rows,
    write_dates_preference_task,
    wrong_date,
)
from bigscale.data.sources import preflight
from bigscale.data.tasks import DATES_HELD_OUT_SIZE, date_rows
from bigscale.train.task_eval import read_examples


def _read(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _question_date(question: str) -> str:
    return question.rsplit(": ", 1)[-1]


def test_wrong_date_is_never_the_answer_and_covers_every_kind() -> None:
    rng = random.Random(0)
    seen: set[str] = set()
    for offset in range(0, 73_000, 97):
        day = datetime.date(1900, 1, 1) + datetime.timedelta(days=offset)
        question = (
            f"Write this date in ISO 8601 format (YYYY-MM-DD): {day:%B} {day.day}, {day.year}"
        )
        wrong = wrong_date(day, question, rng)
        assert wrong != day.isoformat()
        if "ISO 8601" in wrong:
            seen.add("prose")  # words before the date, or instead of it
        elif wrong.startswith(day.isoformat()):
            seen.add("more")  # the right date with more after it, never ended
        elif wrong == f"{day.year:04d}-{day.day:02d}-{day.month:02d}":
            seen.add("swap")
        elif wrong == day.isoformat().replace("-", wrong[4]) and wrong[4] != "-":
            seen.add("separator")
        elif wrong[4:] == day.isoformat()[4:]:
            seen.add("year")
        elif abs(datetime.date.fromisoformat(wrong) - day).days == 1 if wrong[4] == "-" else False:
            seen.add("day")
        else:
            assert str(day.year) in wrong and "-" not in wrong  # the date as words
            seen.add("echo")
    assert seen == {"more", "prose", "swap", "separator", "year", "day", "echo"}


def test_rows_are_valid_pairs_of_the_dates_task(char_tokenizer) -> None:
    rows, plain = dates_preference_rows(0), date_rows(0)
    cfg = DataConfig(path="x", style=DataStyle.preference)
    for i, (row, chat) in enumerate(zip(rows[:300], plain[:300], strict=True)):
        question, answer = (m["content"] for m in chat["messages"])
        assert row["prompt"] == question and row["chosen"][0]["content"] == answer
        pair = pair_of(row, cfg, i)  # the checks a file of the user's gets
        assert pair.chat and pair.chosen[:-1] == [{"role": "user", "content": question}]
    enc = encode_pair(rows[0], char_tokenizer, cfg)
    completion = [t for t, y in zip(enc["input_ids"], enc["labels"], strict=True) if y != -100]
    assert char_tokenizer.decode(completion).startswith(rows[0]["chosen"][0]["content"])


def test_split_keeps_the_dates_task_split_and_held_out_chats(tmp_path: Path) -> None:
    paths = [tmp_path / n for n in ("train.jsonl", "validation.jsonl", "test.jsonl")]
    write_dates_preference_task(*paths)
    train, validation, test = (_read(p) for p in paths)
    assert (len(train), len(validation)) == (DATES_PAIRS_TRAIN_SIZE, DATES_PAIRS_VALIDATION_SIZE)
    held = DATES_HELD_OUT_SIZE
    assert test == date_rows(0)[:held]  # the SFT demo's own test set: exact match compares
    train_dates = {_question_date(r["prompt"]) for r in train}
    val_dates = {_question_date(r["prompt"]) for r in validation}
    test_dates = {_question_date(r["messages"][0]["content"]) for r in test}
    assert not (train_dates & val_dates or train_dates & test_dates or val_dates & test_dates)
    before = [p.read_bytes() for p in paths]
    write_dates_preference_task(*paths)  # existing files are kept as they are
    assert [p.read_bytes() for p in paths] == before


@pytest.fixture
def demo_cfg(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("BIGSCALE_HOME", str(tmp_path))
    return compose_config(["experiment=dpo_demo", "model=tiny"])


def test_demo_preset_prepares_and_preflights_its_data(demo_cfg) -> None:
    """The files a run writes before its ranks start pass the launcher's checks, and the test
    file (chats, while the data style is preference) is read as chat for exact match."""
    from bigscale.train.assets import prepare_assets

    cfg = demo_cfg
    assert cfg.objective.name.value == "dpo" and cfg.data.style is DataStyle.preference
    validate(cfg, 2, Hardware())  # the 2-rank run the demo is
    prepare_assets(cfg)
    preflight(cfg.data)
    examples = read_examples(cfg.data, 5)
    assert len(examples) == 5
    first = date_rows(0)[0]["messages"]
    assert examples[0].prompt == (first[0],) and examples[0].answer == first[1]["content"]
