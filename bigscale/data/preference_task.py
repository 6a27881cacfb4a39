"""Built-in preference task: two-operand sums, the correct answer preferred over a subtly
wrong one (off by one or by ten), for the DPO demo and the tests; small enough for a tiny model
on a CPU. Held out as the SFT task holds out: the same test rows (prompt/response, for exact
match), validation pairs from the next rows, training pairs from the rest."""

from __future__ import annotations

import os
import random
from pathlib import Path

from bigscale.data.tasks import TEST_SIZE, VALIDATION_SIZE, _write_new, arithmetic_rows


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
    _write_new(Path(train_path), pairs[held_out:])
    if validation_path is not None:
        _write_new(Path(validation_path), pairs[TEST_SIZE:held_out])
    if test_path is not None:
        _write_new(Path(test_path), plain[:TEST_SIZE])
