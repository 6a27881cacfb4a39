"""Text fields are text: bytes that are not UTF-8 are named by file:line:byte offset, a number
where text belongs is found by the pre-flight at its line, and strings that look like dates stay
the strings that were written, map-style and streamed."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from bigscale.config.schema import DataConfig, DataStyle
from bigscale.data.sources import check_local_file, load_raw, preflight
from bigscale.errors import DataError

DATES = [{"prompt": f"when is day {i}?", "response": f"2036-10-{10 + i:02d}"} for i in range(6)]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def sft(path: Path, **kw) -> DataConfig:
    return DataConfig(path=str(path), style=DataStyle.prompt_response, **kw)


def test_non_utf8_byte_is_named_by_file_line_and_offset(tmp_path: Path) -> None:
    path = tmp_path / "latin1.jsonl"
    good = b'{"text": "plain"}\n'
    bad = '{"text": "caf\u00e9"}\n'.encode("latin-1")  # 0xe9 alone is not UTF-8
    path.write_bytes(good + good + bad)
    offset = 2 * len(good) + bad.index(b"\xe9")
    cfg = DataConfig(path=str(path))
    with pytest.raises(DataError) as err:
        preflight(cfg)
    msg = str(err.value)
    assert f"{path}:3: byte offset {offset} " in msg
    assert "0xe9 is not UTF-8" in msg and "iconv" in msg
    with pytest.raises(DataError, match=f"byte offset {offset} "):  # the ranks' load, too
        load_raw(cfg, seed=0, cache_dir=tmp_path / "hf")


def test_non_utf8_text_file_is_named(tmp_path: Path) -> None:
    path = tmp_path / "corpus.txt"
    path.write_bytes(b"one line\n\xff\xfe second\n")
    with pytest.raises(DataError, match=f"{path}:2: byte offset 9 "):
        check_local_file(path, DataConfig(path=str(path)))


@pytest.mark.parametrize(
    ("style", "row", "fragment"),
    [
        ("text", {"text": 12}, "data.text_field='text' must be a string, got int 12"),
        (
            "prompt_response",
            {"prompt": "1+1=", "response": 2},
            "data.response_field='response' must be a string, got int 2",
        ),
        (
            "alpaca",
            {"instruction": "add", "input": 3, "output": "4"},
            "data.input_field='input' must be a string, got int 3",
        ),
        (
            "alpaca",
            {"instruction": ["a", "b"], "output": "4"},
            "data.instruction_field='instruction' must be a string, got list",
        ),
        (
            "chat",
            {"messages": [{"role": "user", "content": 7}, {"role": "assistant", "content": "x"}]},
            "message 0 of data.messages_field='messages' has content of type int",
        ),
    ],
)
def test_non_string_value_is_found_by_preflight_at_its_line(
    tmp_path: Path, style: str, row: dict, fragment: str
) -> None:
    fine = {
        "text": {"text": "ok"},
        "prompt_response": {"prompt": "a", "response": "b"},
        "alpaca": {"instruction": "a", "output": "b"},
        "chat": {
            "messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]
        },
    }[style]
    path = write_jsonl(tmp_path / "train.jsonl", [fine, fine, row])
    with pytest.raises(DataError) as err:
        preflight(DataConfig(path=str(path), style=DataStyle(style)))
    assert f"{path}:3: " in str(err.value)
    assert fragment in str(err.value)


def test_parquet_column_that_is_not_text_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "train.parquet"
    pq.write_table(pa.table({"prompt": ["a", "b"], "response": [1, 2]}), path)
    with pytest.raises(DataError, match=r"data.response_field='response' holds int64 values"):
        check_local_file(path, sft(path))


def test_date_strings_stay_strings_map_style(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "dates.jsonl", DATES)
    preflight(sft(path))
    raw = load_raw(sft(path, validation_fraction=0.0), seed=0, cache_dir=tmp_path / "hf")
    assert list(raw["train"]["response"]) == [r["response"] for r in DATES]


def test_date_strings_stay_strings_streamed(tmp_path: Path) -> None:
    from bigscale.data.streaming import load_stream

    path = write_jsonl(tmp_path / "dates.jsonl", DATES)
    rows = list(load_stream(sft(path, streaming=True), "data.path"))
    assert [r["response"] for r in rows] == [r["response"] for r in DATES]


def test_changed_file_is_read_again_not_from_the_raw_cache(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "dates.jsonl", DATES)
    cfg = sft(path, validation_fraction=0.0)
    assert len(load_raw(cfg, seed=0, cache_dir=tmp_path / "hf")["train"]) == 6
    write_jsonl(path, DATES[:2])
    assert list(load_raw(cfg, seed=0, cache_dir=tmp_path / "hf")["train"]["response"]) == [
        "2036-10-10",
        "2036-10-11",
    ]
