"""JSON and JSON-lines files read by bigscale itself, as text: every row with its file:line, each
configured text field a string exactly as written.

``datasets``' own JSON reader infers column types with Arrow, which turns a column of ISO dates
("2036-10-28") into timestamps that no cast gives back verbatim, and stops on a bad byte without
naming the line. Reading the rows here keeps the text as written, names file:line:byte offset for
bytes that are not UTF-8, and checks each value's type where it is, for the launcher's pre-flight
and for the ranks alike."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bigscale.config.schema import DataConfig, DataStyle
from bigscale.errors import DataError

if TYPE_CHECKING:
    import datasets

MESSAGES_KEY = "data.messages_field"
TEXT_OR_MESSAGES_KEYS = ("data.chosen_field", "data.rejected_field")
"""A preference pair's sides: strings, or conversations (``bigscale.data.preference``)."""


def _decode(raw: bytes, path: Path, lineno: int, offset: int) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(
            f"{path}:{lineno}: byte offset {offset + e.start} (column {e.start + 1} of the line): "
            f"byte 0x{raw[e.start]:02x} is not UTF-8, and bigscale reads data files as UTF-8. "
            "Re-encode the file (e.g. `iconv -f latin1 -t utf-8`) or remove that line."
        ) from None


def read_lines(path: Path) -> Iterator[tuple[int, str]]:
    """(line number, text) of each line, decoded as UTF-8 with the failing place named."""
    offset = 0
    with open(path, "rb") as fh:
        for lineno, raw in enumerate(fh, start=1):
            text = _decode(raw, path, lineno, offset)
            if lineno == 1:
                text = text.removeprefix("\ufeff")  # a byte-order mark is not data
            yield lineno, text
            offset += len(raw)


def starts_with_array(path: Path) -> bool:
    for _, line in read_lines(path):
        stripped = line.lstrip()
        if stripped:
            return stripped[0] == "["
    return False


def iter_rows(path: Path, max_rows: int | None = None) -> Iterator[tuple[str, dict[str, Any]]]:
    """(place, row) for each example of a JSON-lines file or a JSON array; ``place`` is the
    line number (``example i`` inside an array), so ``f"{path}:{place}"`` names the row."""
    if path.suffix.lower() == ".json" and starts_with_array(path):
        yield from _array_rows(path, max_rows)
        return
    count = 0
    for lineno, line in read_lines(path):
        if max_rows is not None and count >= max_rows:
            return
        if not line.strip():
            continue  # blank lines separate nothing; skipped, as every JSON-lines reader does
        try:
            # Without its newline, so that e.colno is a column of this line.
            row = json.loads(line.rstrip("\r\n"))
        except json.JSONDecodeError as e:
            raise DataError(
                f"{path}:{lineno}: malformed JSON ({e.msg}: column {e.colno}). "
                "Fix or remove that line."
            ) from None
        if not isinstance(row, dict):
            raise DataError(
                f"{path}:{lineno}: expected a JSON object per line, got {type(row).__name__}."
            )
        count += 1
        yield str(lineno), row


def _array_rows(path: Path, max_rows: int | None) -> Iterator[tuple[str, dict[str, Any]]]:
    text = "".join(line for _, line in read_lines(path))
    try:
        rows = json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(
            f"{path}:{e.lineno}: malformed JSON ({e.msg}: column {e.colno}). Fix that line."
        ) from None
    if not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows):
        raise DataError(f"{path}: expected a JSON array of objects or one JSON object per line.")
    for i, row in enumerate(rows[:max_rows] if max_rows is not None else rows):
        yield f"example {i}", row


def optional_fields(cfg: DataConfig, fields: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """Fields the style reads when present (alpaca's input): text when given, else absent."""
    if DataStyle(cfg.style) is DataStyle.alpaca and cfg.input_field not in (c for _, c in fields):
        return [("data.input_field", cfg.input_field)]
    if DataStyle(cfg.style) is DataStyle.preference and cfg.prompt_field not in (
        c for _, c in fields
    ):
        return [("data.prompt_field", cfg.prompt_field)]
    return []


def check_values(
    where: str,
    row: dict[str, Any],
    fields: list[tuple[str, str]],
    optional: list[tuple[str, str]] = (),  # type: ignore[assignment]
) -> None:
    """Each required field present and text; messages a list of {role, content} with text
    content; optional fields text or absent. Raises DataError naming ``where`` (file:line),
    the key and the type found."""
    for key, column in fields:
        value = row.get(column)
        if value is None:
            raise DataError(
                f"{where}: {key}={column!r} is missing or null on this line. "
                "Fix or remove that line."
            )
        if key == MESSAGES_KEY or (key in TEXT_OR_MESSAGES_KEYS and isinstance(value, list)):
            _check_messages(where, key, column, value)
        else:
            _check_text(where, key, column, value)
    for key, column in optional:
        value = row.get(column)
        if value is not None and not (key == "data.prompt_field" and isinstance(value, list)):
            _check_text(where, key, column, value)


def _check_text(where: str, key: str, column: str, value: Any) -> None:
    if not isinstance(value, str):
        raise DataError(
            f"{where}: {key}={column!r} must be a string, got {type(value).__name__} "
            f"{json.dumps(value)[:40]}. Quote it in the file or fix that line."
        )


def _check_messages(where: str, key: str, column: str, value: Any) -> None:
    if not isinstance(value, list):
        raise DataError(
            f"{where}: {key}={column!r} must be a list of {{role, content}} messages, got "
            f"{type(value).__name__}. Fix that line."
        )
    for i, m in enumerate(value):
        if isinstance(m, dict) and "content" in m and not isinstance(m["content"], str):
            raise DataError(
                f"{where}: message {i} of {key}={column!r} has content of type "
                f"{type(m['content']).__name__} ({json.dumps(m['content'])[:40]}); content "
                "must be a string. Fix that message."
            )


def _rows(
    files: list[str],
    stamps: list[str],
    fields: tuple[tuple[str, str], ...],
    optional: tuple[tuple[str, str], ...],
) -> Iterator[dict[str, Any]]:
    """The configured columns of every row; ``stamps`` (size and mtime) only key the cache."""
    del stamps
    columns = [c for _, c in (*fields, *optional)]
    for f in files:
        for place, row in iter_rows(Path(f)):
            check_values(f"{f}:{place}", row, list(fields), list(optional))
            yield {c: row.get(c) for c in columns}


def load_json(
    files: list[Path],
    cfg: DataConfig,
    fields: list[tuple[str, str]],
    cache_dir: Path | None = None,
    streaming: bool = False,
) -> datasets.Dataset | datasets.IterableDataset:
    """The files' configured columns as a Dataset (an IterableDataset when ``streaming``, one
    shard per file). Text fields are declared strings; messages keep the types of their
    values (strings stay strings: types are taken from the Python values, not re-guessed)."""
    import datasets

    optional = optional_fields(cfg, fields)
    features = None
    if all(key != MESSAGES_KEY and key not in TEXT_OR_MESSAGES_KEYS for key, _ in fields):
        string = datasets.Value("string")
        features = datasets.Features({c: string for _, c in (*fields, *optional)})
    # Lists in gen_kwargs are what datasets shards a stream by: only the files (and their
    # stamps, in step) are lists.
    kwargs = {
        "files": [str(f) for f in files],
        "stamps": [f"{f.stat().st_size}:{f.stat().st_mtime_ns}" for f in files],
        "fields": tuple(fields),
        "optional": tuple(optional),
    }
    if streaming:
        return datasets.IterableDataset.from_generator(_rows, features=features, gen_kwargs=kwargs)
    try:
        return datasets.Dataset.from_generator(
            _rows,
            features=features,
            gen_kwargs=kwargs,
            cache_dir=str(cache_dir) if cache_dir is not None else None,
        )
    except datasets.exceptions.DatasetGenerationError as e:
        if isinstance(e.__cause__, DataError):
            raise e.__cause__ from None
        raise
