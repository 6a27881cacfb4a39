"""Built-in preference tasks, generated offline and deterministically, the correct answer
preferred over a subtly wrong one.

``arithmetic`` (``data=arithmetic_pairs``): two-operand sums against a near miss (off by one or by
ten), small enough for a tiny model on a CPU. ``dates`` (``data=dates_pairs``): the default
job's date task as one-turn chats, the ISO 8601 answer against a wrong answer of the kinds
SmolLM2-135M-Instruct gives before tuning (the date echoed as written, a wrong year, a time of
day appended) or a near miss (month and day swapped, a day off, another separator). Held out as
the SFT tasks hold out: the same test rows (for exact match), validation pairs from the next
rows, training pairs from the rest."""

from __future__ import annotations

import datetime
import os
import random
from typing import Any

from bigscale.data.tasks import (
    DATES_HELD_OUT_SIZE,
    TEST_SIZE,
    VALIDATION_SIZE,
    _spelled,
    arithmetic_rows,
    date_rows,
    write_splits,
)


def wrong_answer(answer: int, rng: random.Random) -> int:
    """A near miss: the kind of slip (a carry dropped, a digit off) a model makes."""
    candidates = [answer + d for d in (-10, -1, 1, 10) if answer + d >= 0]
    return rng.choice(candidates)


def preference_rows(seed: int = 0, max_operand: int = 99) -> list[dict[str, str]]:
    rng = random.Random(seed + 1)
    rows = []
    for row in arithmetic_rows(seed, max_operand):
        answer = int(row["response"])
        rows.append(
            {
                "prompt": row["prompt"],
                "chosen": str(answer),
                "rejected": str(wrong_answer(answer, rng)),
            }
        )
    return rows


def write_preference_task(
    train_path: str | os.PathLike[str],
    validation_path: str | os.PathLike[str] | None,
    test_path: str | os.PathLike[str] | None,
    seed: int = 0,
    max_operand: int = 99,
) -> None:
    """Pairs for training and validation, prompt/response rows for the exact-match test; only
    missing files are written."""
    pairs = preference_rows(seed, max_operand)
    plain = arithmetic_rows(seed, max_operand)
    held_out = TEST_SIZE + VALIDATION_SIZE
    paths = (train_path, validation_path, test_path)
    write_splits(paths, pairs[held_out:], pairs[TEST_SIZE:held_out], plain[:TEST_SIZE])


DATES_PAIRS_TRAIN_SIZE = 256
"""Training pairs of the dates task: what the demo's steps use and no more, because the
reference pass runs the real model over every pair before training (on 2 busy CPU cores, about
a second per five pairs)."""
DATES_PAIRS_VALIDATION_SIZE = 32
_WRONG_DATE_KINDS = ("echo", "year", "more", "more", "prose", "prose", "swap", "day", "separator")
_PROSE = (
    "ISO 8601: {iso}",
    "The date {words} in ISO 8601 format is {iso}.",
    "ISO 8601 is a standard format for representing dates and times.",
    "Here is the date in ISO 8601 format:\n{iso}",
)
_MORE = ("\n\nThis date is in ISO 8601 format.", " (UTC)", " 00:00:00", " ({words})", "T12:00:00")


def wrong_date(day: datetime.date, question: str, rng: random.Random) -> str:
    """An answer that is not ``day.isoformat()``, of one kind drawn at random: what the untuned
    model writes (the date as asked, the current year or another century, the right date with
    more after it, prose around or instead of it) or a near miss."""
    iso = day.isoformat()
    kinds = list(_WRONG_DATE_KINDS)
    if day.day > 12 or day.day == day.month:  # swapping gives no valid or no different date
        kinds.remove("swap")
    while True:
        kind = rng.choice(kinds)
        if kind == "echo":
            words = question.rsplit(": ", 1)[-1]
            wrong = words if rng.random() < 0.5 else _spelled(day, rng.randrange(3))
        elif kind == "year":
            years = (2022, 2023, day.year + 1, day.year - 1, day.year + 100, day.year - 100)
            year = rng.choice([y for y in years if y != day.year and 1000 <= y <= 9999])
            wrong = f"{year:04d}{iso[4:]}"
        elif kind == "more":  # the answer, then no end of turn: an explanation, a time, ...
            words = question.rsplit(": ", 1)[-1]
            wrong = iso + rng.choice(_MORE).format(words=words)
        elif kind == "prose":  # words before the answer, or instead of it
            words = question.rsplit(": ", 1)[-1]
            wrong = rng.choice(_PROSE).format(iso=iso, words=words)
        elif kind == "swap":
            wrong = f"{day.year:04d}-{day.day:02d}-{day.month:02d}"
        elif kind == "day":
            wrong = (day + datetime.timedelta(days=rng.choice((-1, 1)))).isoformat()
        else:
            wrong = iso.replace("-", rng.choice(("/", ".", " ")))
        if wrong != iso:
            return wrong


def dates_preference_rows(seed: int = 0) -> list[dict[str, Any]]:
    """One pair per row of the dates task, in its order: the user's question as the prompt,
    the assistant's reply (a one-message conversation) on each side."""
    rng = random.Random(seed + 1)
    rows = []
    for row in date_rows(seed):
        question, answer = (m["content"] for m in row["messages"])
        day = datetime.date.fromisoformat(answer)
        rows.append(
            {
                "prompt": question,
                "chosen": [{"role": "assistant", "content": answer}],
                "rejected": [{"role": "assistant", "content": wrong_date(day, question, rng)}],
            }
        )
    return rows


def write_dates_preference_task(
    train_path: str | os.PathLike[str],
    validation_path: str | os.PathLike[str] | None,
    test_path: str | os.PathLike[str] | None,
    seed: int = 0,
) -> None:
    """The dates task's split (no date in two splits): its test rows as they are (``messages``
    chats, for exact match), validation and training pairs from its validation and training
    rows, fewer of them; only missing files are written."""
    pairs, plain = dates_preference_rows(seed), date_rows(seed)
    held = DATES_HELD_OUT_SIZE
    write_splits(
        (train_path, validation_path, test_path),
        pairs[2 * held : 2 * held + DATES_PAIRS_TRAIN_SIZE],
        pairs[held : held + DATES_PAIRS_VALIDATION_SIZE],
        plain[:held],
    )


def write_pairs_task(task: str, *paths: str | os.PathLike[str] | None, seed: int = 0) -> None:
    """The preference form of built-in ``task`` (``data.generate`` with data.style=preference)."""
    write = {"arithmetic": write_preference_task, "dates": write_dates_preference_task}
    write[task](*paths, seed=seed)  # type: ignore[arg-type]
