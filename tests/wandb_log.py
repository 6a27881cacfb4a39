"""Read an offline W&B run log (``run-<id>.wandb``) to check what a run told W&B.

wandb >= 0.2x writes it from its Go core and ships no Python reader, so this reads the format
itself: a 7-byte file header, then LevelDB log records (32 KiB blocks; a record may be split
across blocks as FIRST/MIDDLE/LAST chunks) each holding one ``Record`` protobuf."""

from __future__ import annotations

import struct
from pathlib import Path

from wandb.proto import wandb_internal_pb2 as pb

_FILE_HEADER = 7  # b":W&B", a 2-byte magic, a version byte
_BLOCK, _CHUNK_HEADER = 32768, 7  # crc32 (4), length (2), type (1)
_FULL, _LAST = 1, 4


def records(path: Path) -> list[pb.Record]:
    data = path.read_bytes()
    assert data[:4] == b":W&B", f"{path} is not a W&B run log"
    out, pending, pos = [], b"", _FILE_HEADER
    while pos + _CHUNK_HEADER <= len(data):
        room = _BLOCK - pos % _BLOCK
        if room < _CHUNK_HEADER:  # block trailer: padding
            pos += room
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + _CHUNK_HEADER])
        if kind == 0:  # zero fill: end of what was written
            break
        pending += data[pos + _CHUNK_HEADER : pos + _CHUNK_HEADER + length]
        pos += _CHUNK_HEADER + length
        if kind in (_FULL, _LAST):
            record = pb.Record()
            record.ParseFromString(pending)
            out.append(record)
            pending = b""
    return out


def run_record(path: Path) -> pb.RunRecord:
    """The run's identity as W&B recorded it: ``run_id``, ``display_name``, ``run_group``..."""
    runs = [r.run for r in records(path) if r.WhichOneof("record_type") == "run"]
    assert runs, f"no run record in {path}"
    return runs[0]
