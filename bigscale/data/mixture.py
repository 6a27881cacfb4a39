"""Weighted mixtures of datasets (``data.mixture``) and the identity of local data by content.

A run without a mixture is a mixture of one source, so the map-style and streaming pipelines
walk ``mixture_sources`` either way. Imported by the launcher's pre-flight: no ``datasets`` at
module level.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any

from bigscale.config.schema import DataConfig, MixtureSource

STREAM_PREFLIGHT_ROWS = 1000
"""Lines of each JSON-lines file the pre-flight reads for a streamed corpus, which may not fit
in memory or may take hours to read in full; a bad line further down fails during training."""

FULL_HASH_BYTES = 64 << 20
"""Files up to this size are identified by a hash of all their bytes; larger ones by size,
modification time and a hash of their first and last MiB, so a terabyte corpus is not read
just to name its cache."""
_EDGE = 1 << 20

# What a mixture entry may set for its own source: every MixtureSource field but these two.
_OVERRIDES = tuple(f.name for f in fields(MixtureSource) if f.name not in ("path", "weight"))


@dataclass(frozen=True)
class Source:
    key: str
    """Config key that names the source's path, for messages (``data.mixture[1].path``)."""
    cfg: DataConfig
    """The data settings this source is read with: ``data.*`` with the source's overrides."""
    weight: float


def mixture_sources(cfg: DataConfig) -> list[Source]:
    """The sources to read: ``data.path`` alone, or each ``data.mixture`` entry.

    A shared ``data.validation_path`` replaces the sources' held-out parts, so they hold out
    nothing then."""
    if not cfg.mixture:
        return [Source("data.path", cfg, 1.0)]
    shared_validation = cfg.validation_path is not None
    out = []
    for i, entry in enumerate(cfg.mixture):
        overrides: dict[str, Any] = {
            k: getattr(entry, k) for k in _OVERRIDES if getattr(entry, k) is not None
        }
        source_cfg = replace(
            cfg,
            path=entry.path,
            mixture=[],
            validation_path=None,
            validation_fraction=0.0 if shared_validation else cfg.validation_fraction,
            validation_examples=0 if shared_validation else cfg.validation_examples,
            **overrides,
        )
        out.append(Source(f"data.mixture[{i}].path", source_cfg, float(entry.weight)))
    return out


def validation_source(cfg: DataConfig) -> Source:
    """``data.validation_path`` read like a source of its own (nothing held out of it)."""
    assert cfg.validation_path is not None
    source_cfg = replace(
        cfg, path=cfg.validation_path, mixture=[], validation_path=None, validation_fraction=0.0
    )
    return Source("data.validation_path", source_cfg, 1.0)


def probabilities(sources: Sequence[Source]) -> list[float]:
    total = sum(s.weight for s in sources)
    return [s.weight / total for s in sources]


def interleave(parts: list[Any], sources: Sequence[Source], seed: int) -> Any:
    """One dataset drawing from ``parts`` (map-style or iterable alike) with the sources'
    weights, seeded; it ends once every part has been used up (``all_exhausted``), so no
    example is left out and a part drawn faster than its size repeats."""
    if len(parts) == 1:
        return parts[0]
    import datasets

    return datasets.interleave_datasets(
        parts,
        probabilities=probabilities(sources),
        seed=seed,
        stopping_strategy="all_exhausted",
    )


def files_fingerprint(files: Sequence[Path]) -> str:
    """Identity of local data files by content (see ``FULL_HASH_BYTES``), not by path: a
    corpus copied elsewhere keeps its cache, and a file edited in place gets a new one.

    ``datasets`` names its own cache by path and modification time, which a copy changes and
    a same-second rewrite may not."""
    digest = hashlib.sha256()
    for f in files:
        size = f.stat().st_size
        digest.update(f"{size}:".encode())
        with open(f, "rb") as fh:
            if size <= FULL_HASH_BYTES:
                for block in iter(lambda: fh.read(1 << 22), b""):
                    digest.update(block)
            else:
                digest.update(str(f.stat().st_mtime_ns).encode())
                digest.update(fh.read(_EDGE))
                fh.seek(size - _EDGE)
                digest.update(fh.read(_EDGE))
        digest.update(b"|")
    return digest.hexdigest()
