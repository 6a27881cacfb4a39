"""Built-in synthetic tasks with a checkable answer, generated deterministically.

``arithmetic``: two-operand addition as prompt/response pairs, small enough for a tiny model to
learn in minutes on a CPU. ``dates``: chat conversations asking for a date written in words as
ISO 8601 (``March 5, 1999`` -> ``1999-03-05``), which a pretrained instruct model does not answer
in exactly that form before fine-tuning and learns in a few dozen steps. Exact match on the
held-out split shows whether training worked at all.
"""

from __future__ import annotations

import datetime
import json
import os
import random
import tempfile
from pathlib import Path
from typing import Any

TEST_SIZE = 500
VALIDATION_SIZE = 500


def _write_new(path: Path, rows: list[dict[str, Any]]) -> None:
    """Write ``path`` whole, only if it does not exist: an existing file is never replaced."""
    # Temp file in the same directory, then a hard link to the final name: the link appears
    # whole or not at all, and fails (instead of replacing) when the name is already taken.
    if path.exists():
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            for row in rows:
                fh.write(json.dumps(row) + "\n")
        try:
            os.link(tmp, path)
        except FileExistsError:
            pass  # written meanwhile by another process (the same rows), or the user's: kept
        except OSError:
            # A filesystem without hard links: rename, which a racing writer of the same rows
            # may also do; checked just before, so only such a writer is ever replaced.
            if not path.exists():
                os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)


def write_splits(
    paths: tuple[
        str | os.PathLike[str], str | os.PathLike[str] | None, str | os.PathLike[str] | None
    ],
    train: list[dict[str, Any]],
    validation: list[dict[str, Any]],
    test: list[dict[str, Any]],
) -> None:
    """Write each split's rows to its path of (train, validation, test), skipping a ``None``
    path; only missing files are written (``_write_new``)."""
    for path, rows in zip(paths, (train, validation, test), strict=True):
        if path is not None:
            _write_new(Path(path), rows)


def arithmetic_rows(seed: int = 0, max_operand: int = 99) -> list[dict[str, str]]:
    """Every ``a+b`` with ``0 <= a, b <= max_operand``, in a seeded shuffled order."""
    pairs = [(a, b) for a in range(max_operand + 1) for b in range(max_operand + 1)]
    random.Random(seed).shuffle(pairs)
    return [{"prompt": f"{a}+{b}=", "response": str(a + b)} for a, b in pairs]


def write_arithmetic_task(
    train_path: str | os.PathLike[str],
    validation_path: str | os.PathLike[str] | None,
    test_path: str | os.PathLike[str] | None,
    seed: int = 0,
    max_operand: int = 99,
) -> None:
    """Write the addition task as JSON lines: 500 test rows, 500 validation rows, train the rest.
    Only missing files are written; an existing file is left as it is.

    The split is the same whether or not the validation/test files are written (``None`` skips
    one), so train never contains a held-out sum.
    """
    rows = arithmetic_rows(seed, max_operand)
    held_out = TEST_SIZE + VALIDATION_SIZE
    if len(rows) <= held_out:
        raise ValueError(
            f"max_operand={max_operand} gives {len(rows)} sums; need more than {held_out} "
            "to hold out test and validation rows."
        )
    paths = (train_path, validation_path, test_path)
    write_splits(paths, rows[held_out:], rows[TEST_SIZE:held_out], rows[:TEST_SIZE])


DATES_TRAIN_SIZE = 2000
DATES_HELD_OUT_SIZE = 200  # validation and test, each
DATES_INSTRUCTION = "Write this date in ISO 8601 format (YYYY-MM-DD): "
_MONTHS = [datetime.date(2000, m, 1).strftime("%B") for m in range(1, 13)]


def _spelled(day: datetime.date, style: int) -> str:
    month = _MONTHS[day.month - 1]
    return [
        f"{month} {day.day}, {day.year}",
        f"{day.day} {month} {day.year}",
        f"{month[:3]} {day.day}, {day.year}",
    ][style]


def date_rows(seed: int = 0) -> list[dict[str, Any]]:
    """Distinct dates between 1900 and 2099 in three spellings, as one-turn chats."""
    rng = random.Random(seed)
    first, span = (
        datetime.date(1900, 1, 1),
        (datetime.date(2099, 12, 31) - datetime.date(1900, 1, 1)).days,
    )
    total = DATES_TRAIN_SIZE + 2 * DATES_HELD_OUT_SIZE
    days = sorted(rng.sample(range(span + 1), total))
    rng.shuffle(days)
    rows = []
    for offset in days:
        day = first + datetime.timedelta(days=offset)
        question = DATES_INSTRUCTION + _spelled(day, rng.randrange(3))
        rows.append(
            {
                "messages": [
                    {"role": "user", "content": question},
                    {"role": "assistant", "content": day.isoformat()},
                ]
            }
        )
    return rows


def write_dates_task(
    train_path: str | os.PathLike[str],
    validation_path: str | os.PathLike[str] | None,
    test_path: str | os.PathLike[str] | None,
    seed: int = 0,
) -> None:
    """Write the dates task as JSON lines (a ``messages`` list per row): 200 test rows, 200
    validation rows, 2,000 training rows, no date in two splits. Only missing files are written."""
    rows = date_rows(seed)
    held = DATES_HELD_OUT_SIZE
    paths = (train_path, validation_path, test_path)
    write_splits(paths, rows[2 * held :], rows[held : 2 * held], rows[:held])
