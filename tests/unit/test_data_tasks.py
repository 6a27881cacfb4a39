"""The built-in arithmetic task: deterministic, disjoint splits of the right sizes."""

from __future__ import annotations

import json
from pathlib import Path

from bigscale.data.tasks import write_arithmetic_task


def read(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_split_sizes_content_and_determinism(tmp_path: Path) -> None:
    a, b, c = (tmp_path / "x" / n for n in ("train.jsonl", "val.jsonl", "test.jsonl"))
    write_arithmetic_task(a, b, c, seed=0, max_operand=99)
    train, val, test = read(a), read(b), read(c)
    assert (len(train), len(val), len(test)) == (9000, 500, 500)
    prompts = [r["prompt"] for r in train + val + test]
    assert len(set(prompts)) == 10_000  # every pair exactly once, so splits are disjoint
    for row in test[:50]:
        x, y = row["prompt"].rstrip("=").split("+")
        assert row["response"] == str(int(x) + int(y))

    first = [p.read_bytes() for p in (a, b, c)]
    again = [tmp_path / "y" / p.name for p in (a, b, c)]
    write_arithmetic_task(*again, seed=0, max_operand=99)
    assert [p.read_bytes() for p in again] == first
    other = tmp_path / "z" / "test.jsonl"
    write_arithmetic_task(tmp_path / "z" / "train.jsonl", None, other, seed=1, max_operand=99)
    assert other.read_bytes() != first[2]
    assert not [p for p in a.parent.iterdir() if p.name.endswith(".tmp")]  # no temp files left


def test_existing_files_are_never_overwritten(tmp_path: Path) -> None:
    """Only missing files are written: a file already there, of any content, stays as it is."""
    a, b, c = (tmp_path / n for n in ("train.jsonl", "val.jsonl", "test.jsonl"))
    a.write_text('{"text": "mine"}\n')
    write_arithmetic_task(a, b, c, seed=0, max_operand=99)
    assert a.read_text() == '{"text": "mine"}\n'
    assert len(read(b)) == 500 and len(read(c)) == 500
    before = c.read_bytes()
    write_arithmetic_task(a, b, c, seed=1, max_operand=99)
    assert c.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["test.jsonl", "train.jsonl", "val.jsonl"]


def test_dates_task_is_deterministic_disjoint_and_checkable(tmp_path: Path) -> None:
    import datetime

    from bigscale.data.tasks import DATES_INSTRUCTION, write_dates_task

    a, b, c = (tmp_path / "a" / f"{n}.jsonl" for n in ("train", "validation", "test"))
    write_dates_task(a, b, c, seed=0)
    again = [tmp_path / "b" / f"{n}.jsonl" for n in ("train", "validation", "test")]
    write_dates_task(*again, seed=0)
    splits = [[json.loads(x) for x in p.read_text().splitlines()] for p in (a, b, c)]
    assert [p.read_bytes() for p in (a, b, c)] == [p.read_bytes() for p in again]
    assert [len(s) for s in splits] == [2000, 200, 200]
    answers = [{r["messages"][1]["content"] for r in s} for s in splits]
    assert not (answers[0] & answers[1] or answers[0] & answers[2] or answers[1] & answers[2])
    for row in splits[2]:
        user, assistant = row["messages"]
        assert (user["role"], assistant["role"]) == ("user", "assistant")
        assert user["content"].startswith(DATES_INSTRUCTION)
        day = datetime.date.fromisoformat(assistant["content"])
        spelled = user["content"].removeprefix(DATES_INSTRUCTION)
        assert str(day.year) in spelled and day.strftime("%B")[:3] in spelled
