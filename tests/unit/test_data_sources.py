"""Pre-flight checks and raw loading: errors must name the file, line, columns and config key."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from bigscale.config.schema import DataConfig, DataFormat, DataStyle
from bigscale.data.sources import check_local_file, load_raw, preflight, resolve_files
from bigscale.errors import DataError


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_resolve_files_file_glob_directory(tmp_path: Path) -> None:
    a = write_jsonl(tmp_path / "d" / "a.jsonl", [{"text": "x"}])
    b = write_jsonl(tmp_path / "d" / "sub" / "b.jsonl", [{"text": "y"}])
    (tmp_path / "d" / "notes.md").write_text("not data")
    write_jsonl(tmp_path / "d" / ".cache" / "c.jsonl", [{"text": "z"}])

    assert resolve_files(str(a)) == [a]
    assert resolve_files(str(tmp_path / "d" / "*.jsonl")) == [a]
    assert resolve_files(str(tmp_path / "d")) == [a, b]
    assert resolve_files(str(tmp_path / "missing.jsonl")) == []


def test_malformed_json_line_names_file_and_line(tmp_path: Path) -> None:
    path = tmp_path / "train.jsonl"
    path.write_text('{"text": "ok"}\n\n{"text": "fine"}\n{"text" "broken"}\n')
    with pytest.raises(DataError) as err:
        check_local_file(path, DataConfig(path=str(path)))
    msg = str(err.value)
    assert f"{path}:4:" in msg
    assert "malformed JSON" in msg and "Expecting ':' delimiter" in msg


def test_missing_field_lists_columns_found_and_config_key(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "x.jsonl", [{"prompt": "1+1=", "answer": "2"}])
    cfg = DataConfig(path=str(path), style=DataStyle.prompt_response)
    with pytest.raises(DataError) as err:
        check_local_file(path, cfg)
    msg = str(err.value)
    assert "data.response_field='response'" in msg
    assert "['prompt', 'answer']" in msg
    assert "Set data.response_field=" in msg


def test_field_missing_on_one_line_names_the_line(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "x.jsonl", [{"text": "a"}, {"text": "b"}, {"other": "c"}])
    with pytest.raises(DataError, match=r"x\.jsonl:3: data\.text_field='text'"):
        check_local_file(path, DataConfig(path=str(path)))


def test_parquet_and_text_columns(tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq_path = tmp_path / "x.parquet"
    pq.write_table(pa.table({"content": ["a", "b"]}), pq_path)
    with pytest.raises(DataError, match=r"columns found: \['content'\]"):
        check_local_file(pq_path, DataConfig(path=str(pq_path)))
    check_local_file(pq_path, DataConfig(path=str(pq_path), text_field="content"))

    txt = tmp_path / "x.txt"
    txt.write_text("hello\n")
    check_local_file(txt, DataConfig(path=str(txt)))
    with pytest.raises(DataError, match=r"columns found: \['text'\]"):
        check_local_file(txt, DataConfig(path=str(txt), style=DataStyle.chat))


def test_json_array_file(tmp_path: Path) -> None:
    path = tmp_path / "x.json"
    chat = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    path.write_text(json.dumps([{"messages": chat}]))
    check_local_file(path, DataConfig(path=str(path), style=DataStyle.chat))
    with pytest.raises(DataError, match=re.escape("data.text_field")):
        check_local_file(path, DataConfig(path=str(path)))


def test_preflight_missing_local_path_but_hub_name_passes(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=re.escape("no file matches data.path=")):
        preflight(DataConfig(path=str(tmp_path / "nope.jsonl")))
    with pytest.raises(DataError, match=re.escape("no file matches data.path=")):
        preflight(DataConfig(path="./data/train"))
    with pytest.raises(DataError, match=re.escape("no file matches data.path=")):
        preflight(DataConfig(path="train", format=DataFormat.jsonl))
    preflight(DataConfig(path="tatsu-lab/alpaca"))  # hub: nothing to check offline


def test_preflight_checks_validation_and_test_files(tmp_path: Path) -> None:
    train = write_jsonl(tmp_path / "train.jsonl", [{"text": "a"}])
    val = write_jsonl(tmp_path / "val.jsonl", [{"body": "a"}])
    with pytest.raises(DataError, match=re.escape("val.jsonl")):
        preflight(DataConfig(path=str(train), validation_path=str(val)))
    test = write_jsonl(tmp_path / "test.jsonl", [{"prompt": "1+1="}])
    missing = "data.response_field='response' is not a column"
    with pytest.raises(DataError, match=re.escape(missing)):
        preflight(DataConfig(path=str(train), test_path=str(test)))


def test_load_raw_split_is_deterministic_and_disjoint(tmp_path: Path) -> None:
    rows = [{"text": f"row {i}"} for i in range(40)]
    path = write_jsonl(tmp_path / "train.jsonl", rows)
    cfg = DataConfig(path=str(path), validation_fraction=0.25)
    first = load_raw(cfg, seed=3, cache_dir=tmp_path / "hf")
    again = load_raw(cfg, seed=3, cache_dir=tmp_path / "hf")
    other = load_raw(cfg, seed=4, cache_dir=tmp_path / "hf")

    def texts(ds) -> list[str]:
        return list(ds["text"])

    assert (len(first["train"]), len(first["validation"])) == (30, 10)
    assert texts(first["validation"]) == texts(again["validation"])
    assert texts(first["validation"]) != texts(other["validation"])
    assert sorted(texts(first["train"]) + texts(first["validation"])) == sorted(
        r["text"] for r in rows
    )


def test_load_raw_validation_path_and_column_check(tmp_path: Path) -> None:
    train = write_jsonl(tmp_path / "train.jsonl", [{"text": "a"}, {"text": "b"}])
    val = write_jsonl(tmp_path / "val.jsonl", [{"text": "c"}])
    raw = load_raw(
        DataConfig(path=str(train), validation_path=str(val)), seed=0, cache_dir=tmp_path / "hf"
    )
    assert list(raw["train"]["text"]) == ["a", "b"]
    assert list(raw["validation"]["text"]) == ["c"]
    with pytest.raises(DataError, match=re.escape("data.prompt_field='prompt' is not a column")):
        load_raw(
            DataConfig(path=str(train), style=DataStyle.prompt_response),
            seed=0,
            cache_dir=tmp_path / "hf",
        )


def test_load_raw_reports_bad_line_when_preflight_was_skipped(tmp_path: Path) -> None:
    path = tmp_path / "train.jsonl"
    path.write_text('{"text": "a"}\n{"text": \n')
    with pytest.raises(DataError, match=r"train\.jsonl:2: malformed JSON"):
        load_raw(DataConfig(path=str(path)), seed=0, cache_dir=tmp_path / "hf")
