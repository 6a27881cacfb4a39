"""Where the raw examples come from: local files or a hub dataset, checked before training starts.

``preflight`` runs in the launcher, before any rank exists, so a malformed line or a misnamed column
fails in a second with the file, line and config key named, instead of after the process group and
the model are up. ``load_raw`` is what the ranks call to get the train/validation splits.
"""

from __future__ import annotations

import glob
import os
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING

from bigscale.config.schema import DataConfig, DataFormat, DataStyle
from bigscale.data.chat import CHAT_STYLES, preflight_rows
from bigscale.data.jsonfiles import (
    MESSAGES_KEY,
    TEXT_OR_MESSAGES_KEYS,
    check_values,
    iter_rows,
    load_json,
    optional_fields,
    read_lines,
)
from bigscale.errors import DataError

if TYPE_CHECKING:  # datasets is imported lazily: pre-flight runs in the launcher and needs none
    import datasets

# Extension -> the `datasets` packaged builder that reads it.
_BUILDERS = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".txt": "text"}
_FORMAT_BUILDERS = {
    DataFormat.json: "json",
    DataFormat.jsonl: "json",
    DataFormat.parquet: "parquet",
    DataFormat.text: "text",
}
_GLOB_CHARS = "*?["


def resolve_files(path: str) -> list[Path]:
    """Local files named by ``path``: a file, a glob, or a directory (its data files, recursively).

    Returns ``[]`` when nothing local matches, which callers read as "maybe a hub dataset".
    Hidden files and directories (``.cache`` and the like) are skipped inside directories.
    """
    p = Path(path).expanduser()
    if any(c in path for c in _GLOB_CHARS):
        matches = (Path(m) for m in glob.glob(str(p), recursive=True))
        return sorted(m for m in matches if m.is_file())
    if p.is_file():
        return [p]
    if p.is_dir():
        return sorted(
            f
            for f in p.rglob("*")
            if f.is_file()
            and f.suffix.lower() in _BUILDERS
            and not any(part.startswith(".") for part in f.relative_to(p).parts)
        )
    return []


def required_fields(cfg: DataConfig) -> list[tuple[str, str]]:
    """``(config key, column)`` pairs the configured style reads."""
    style = DataStyle(cfg.style)
    if style is DataStyle.text:
        return [("data.text_field", cfg.text_field)]
    if style is DataStyle.prompt_response:
        return [
            ("data.prompt_field", cfg.prompt_field),
            ("data.response_field", cfg.response_field),
        ]
    if style is DataStyle.preference:  # the prompt may live in the conversations instead
        from bigscale.data.preference import required_fields as pair_fields

        return pair_fields(cfg)
    if style is DataStyle.alpaca:  # data.input_field is optional
        return [
            ("data.instruction_field", cfg.instruction_field),
            ("data.output_field", cfg.output_field),
        ]
    return [("data.messages_field", cfg.messages_field)]


def check_columns(
    columns: Iterable[str], cfg: DataConfig, where: str, fields: list[tuple[str, str]] | None = None
) -> None:
    """Raise a DataError naming the config key when a needed column is missing from ``where``."""
    found = list(columns)
    for key, column in fields if fields is not None else required_fields(cfg):
        if column not in found:
            raise DataError(
                f"{key}={column!r} is not a column of {where}; columns found: {found}. "
                f"Set {key}=<one of them>."
            )


def _builder_for(files: list[Path], cfg: DataConfig) -> str:
    fmt = DataFormat(cfg.format)
    if fmt in _FORMAT_BUILDERS:
        return _FORMAT_BUILDERS[fmt]
    kinds = {_BUILDERS.get(f.suffix.lower()) for f in files}
    if None in kinds:
        unknown = sorted({f.suffix or f.name for f in files if f.suffix.lower() not in _BUILDERS})
        raise DataError(
            f"cannot tell the format of {unknown} from the extension; "
            f"set data.format to one of json, jsonl, parquet, text."
        )
    if len(kinds) > 1:
        raise DataError(
            f"data files mix formats ({sorted(k for k in kinds if k)}); point data.path at "
            "files of one format (a glob such as 'data/*.jsonl')."
        )
    return kinds.pop()  # type: ignore[return-value]


def _check_json(
    path: Path, cfg: DataConfig, fields: list[tuple[str, str]], max_rows: int | None = None
) -> None:
    """JSON lines or a JSON array: parseable, UTF-8, the fields present and of the right type
    on every row, each problem named by file:line."""
    columns: dict[str, None] = {}  # ordered set: report columns in file order
    rows = list(iter_rows(path, max_rows))
    for _, row in rows:
        columns.update(dict.fromkeys(row))
    if not rows:
        raise DataError(f"{path} holds no examples.")
    check_columns(columns, cfg, str(path), fields)
    # The column exists somewhere; a row that lacks it, or holds a number or a list where text
    # belongs, would otherwise fail in the ranks, after the model is loaded.
    optional = optional_fields(cfg, fields)
    for place, row in rows:
        check_values(f"{path}:{place}", row, fields, optional)
    if DataStyle(cfg.style) in CHAT_STYLES:  # roles, last turn: cheap, and named by file:line
        preflight_rows(rows, cfg, str(path))  # type: ignore[arg-type]  # place: line or label
    if DataStyle(cfg.style) is DataStyle.preference and fields == required_fields(cfg):
        from bigscale.data import preference

        preference.preflight_rows(rows, cfg, str(path))


def _check_parquet(path: Path, cfg: DataConfig, fields: list[tuple[str, str]]) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        schema = pq.read_schema(path)
    except Exception as e:  # pyarrow raises several types for a bad file
        raise DataError(f"{path}: not a readable parquet file ({e}).") from None
    check_columns(schema.names, cfg, str(path), fields)
    for key, column in [*fields, *optional_fields(cfg, fields)]:
        if column not in schema.names:
            continue
        kind = schema.field(column).type
        listed = pa.types.is_list(kind) or pa.types.is_large_list(kind)
        pairs = DataStyle(cfg.style) is DataStyle.preference
        if pairs and listed and key in (*TEXT_OR_MESSAGES_KEYS, "data.prompt_field"):
            continue  # conversations: each row's pair is checked where it is read
        if key == MESSAGES_KEY:
            ok = pa.types.is_list(kind) or pa.types.is_large_list(kind)
            item = kind.value_type if ok else None
            if ok and pa.types.is_struct(item) and item.get_field_index("content") >= 0:
                kind = item.field("content").type
            else:
                raise DataError(
                    f"{path}: {key}={column!r} is a column of {kind}, not a list of "
                    "{role, content} messages. Write the messages as a list of structs."
                )
        if not (pa.types.is_string(kind) or pa.types.is_large_string(kind)):
            raise DataError(
                f"{path}: {key}={column!r} holds {kind} values, not text; bigscale trains on "
                "strings only. Write that column as strings (e.g. df[col].astype(str))."
            )


def _check_text_file(path: Path, max_rows: int | None) -> None:
    for lineno, _ in read_lines(path):
        if max_rows is not None and lineno >= max_rows:
            return


def check_local_file(
    path: Path,
    cfg: DataConfig,
    fields: list[tuple[str, str]] | None = None,
    max_rows: int | None = None,
) -> None:
    """Cheap structural check of one local data file; raises DataError with file:line and the fix.

    ``fields`` overrides the ``(config key, column)`` pairs to require (default: the style's);
    ``max_rows`` checks only the head of a JSON-lines file (a streamed corpus may not fit RAM).
    """
    fields = required_fields(cfg) if fields is None else fields
    builder = _builder_for([path], cfg)
    if builder == "json":
        _check_json(path, cfg, fields, max_rows)  # a .json file may be one array or JSON lines
    elif builder == "parquet":
        _check_parquet(path, cfg, fields)
    else:
        check_columns(["text"], cfg, str(path), fields)
        _check_text_file(path, max_rows)


def _looks_local(path: str) -> bool:
    # Hub ids are "name" or "owner/name", so one separator alone does not make a path local.
    return (
        path.startswith((os.sep, ".", "~"))
        or path.count(os.sep) > 1
        or (os.altsep is not None and os.altsep in path)
        or Path(path).suffix.lower() in _BUILDERS
        or any(c in path for c in _GLOB_CHARS)
    )


def is_hub(cfg: DataConfig) -> bool:
    """Whether ``data.path`` names a hub dataset rather than local files."""
    fmt = DataFormat(cfg.format)
    if fmt is DataFormat.hub:
        return True
    if fmt is not DataFormat.auto:
        return False  # an explicit file format means the path must be local
    return not resolve_files(cfg.path) and not _looks_local(cfg.path)


def _local_files(path: str, key: str) -> list[Path]:
    files = resolve_files(path)
    if not files:
        raise DataError(f"no file matches {key}={path!r} (relative to {os.getcwd()}).")
    return files


def preflight(cfg: DataConfig) -> None:
    """Check every local data file the config names; a hub name is accepted unchecked (offline).

    Generated files (``data.generate``) must be written before this runs. Each
    source of a mixture is checked with its own fields; a streamed corpus only by its head.
    """
    from bigscale.data.mixture import STREAM_PREFLIGHT_ROWS, mixture_sources

    head = STREAM_PREFLIGHT_ROWS if cfg.streaming else None
    for source in mixture_sources(cfg):
        if not is_hub(source.cfg):
            for f in _local_files(source.cfg.path, source.key):
                check_local_file(f, source.cfg, max_rows=head)
    if cfg.validation_path:
        for f in _local_files(cfg.validation_path, "data.validation_path"):
            check_local_file(f, cfg)
    if cfg.test_path:
        # The generation eval reads conversations for chat styles, else prompt/answer pairs.
        pairs = [
            ("data.prompt_field", cfg.prompt_field),
            ("data.response_field", cfg.response_field),
        ]
        if DataStyle(cfg.style) in CHAT_STYLES:
            pairs = required_fields(cfg)
        for f in _local_files(cfg.test_path, "data.test_path"):
            if DataStyle(cfg.style) is DataStyle.preference and _holds_messages(f, cfg):
                pairs = [(MESSAGES_KEY, cfg.messages_field)]  # held out as chats (dates_pairs)
            check_local_file(f, cfg, fields=pairs)


def _holds_messages(path: Path, cfg: DataConfig) -> bool:
    """Whether a JSON test file's first row holds a conversation in ``data.messages_field``."""
    if path.suffix.lower() not in (".json", ".jsonl"):
        return False
    first = next(iter_rows(path, 1), None)
    return first is not None and isinstance(first[1].get(cfg.messages_field), list)


def _load_local(files: list[Path], cfg: DataConfig, cache_dir: Path | None) -> datasets.Dataset:
    import datasets

    builder = _builder_for(files, cfg)
    if builder == "json":
        # Read by bigscale, so text stays text (Arrow's reader turns dates into timestamps).
        try:
            return load_json(files, cfg, required_fields(cfg), cache_dir)  # type: ignore[return-value]
        except DataError:
            # A row without the field: the structural check names the columns that exist.
            for f in files:
                check_local_file(f, cfg)
            raise
    try:
        return datasets.load_dataset(
            builder,
            data_files=[str(f) for f in files],
            split="train",  # data_files given as a list always land in "train"
            cache_dir=str(cache_dir) if cache_dir is not None else None,
        )
    except Exception as e:  # DatasetGenerationError wraps the reader's error
        # The structural check names file:line, which the Arrow reader's message does not.
        for f in files:
            check_local_file(f, cfg)
        raise DataError(f"cannot read {[str(f) for f in files]} as {builder}: {e}") from e


def load_raw(cfg: DataConfig, seed: int, cache_dir: Path | None = None) -> datasets.DatasetDict:
    """Load the raw ``train`` and ``validation`` splits, with the style's columns checked.

    ``cache_dir`` is where ``datasets`` keeps the Arrow copy of local files (default: its own
    cache). Hub datasets always use the user's Hugging Face cache so downloads are shared.
    The held-out split is a seeded ``train_test_split``, so every rank gets the same one.
    """
    import datasets

    if is_hub(cfg):
        try:
            train = datasets.load_dataset(cfg.path, cfg.hub_config, split=cfg.split)
        except Exception as e:  # offline, unknown name, bad config: many exception types
            raise DataError(
                f"cannot load hub dataset data.path={cfg.path!r} (config={cfg.hub_config!r}, "
                f"split={cfg.split!r}): {e}. If you meant local files, no file matches that path."
            ) from e
        where = f"hub dataset {cfg.path!r}"
    else:
        files = _local_files(cfg.path, "data.path")
        train = _load_local(files, cfg, cache_dir)
        where = str(files[0]) if len(files) == 1 else f"{cfg.path!r} ({len(files)} files)"
    if not isinstance(train, datasets.Dataset):
        raise DataError(f"{where} did not load as a single split; set data.split.")
    check_columns(train.column_names, cfg, where)

    if cfg.validation_path:
        files = _local_files(cfg.validation_path, "data.validation_path")
        validation = _load_local(files, cfg, cache_dir)
        check_columns(validation.column_names, cfg, str(cfg.validation_path))
    elif cfg.validation_fraction <= 0:
        validation = train.select([])
    else:
        n_test = int(-(-cfg.validation_fraction * len(train) // 1))  # ceil, as datasets does
        if not 0 < cfg.validation_fraction < 1 or len(train) - n_test < 1:
            raise DataError(
                f"data.validation_fraction={cfg.validation_fraction} leaves no training examples "
                f"out of {len(train)}; use a value in (0, 1) or set data.validation_path."
            )
        split = train.train_test_split(test_size=cfg.validation_fraction, seed=seed)
        train, validation = split["train"], split["test"]
    return datasets.DatasetDict({"train": train, "validation": validation})
