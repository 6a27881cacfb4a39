"""Which checkpoint a run continues from, and whether a checkpoint is intact: the rule the
trainer, ``bigscale plan`` and ``bigscale export`` share. Plain files only (no torch, no process
group), so the launcher can ask before any rank starts."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from bigscale.errors import CheckpointError

MANIFEST = "manifest.json"
META = "meta.json"
LATEST = "latest"
PARTIAL = ".partial-"


def tag_for(step: int) -> str:
    return f"step_{step:08d}"


def step_of(tag: str) -> int:
    return int(tag.rsplit("_", 1)[1])


@dataclass(frozen=True)
class Problem:
    tag: str
    message: str


@dataclass(frozen=True)
class ResumeChoice:
    point: Path | None
    """The checkpoint directory to use; None: start fresh (no complete checkpoint)."""
    skipped: list[Problem]
    """Newer complete checkpoints passed over as damaged, newest first."""


def complete_tags(root: Path) -> list[str]:
    """Tags with a manifest (written last), oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    tags = [
        p.name
        for p in root.iterdir()
        if p.is_dir() and p.name.startswith("step_") and (p / MANIFEST).is_file()
    ]
    return sorted(tags, key=step_of)


def check_files(directory: Path, sha256: bool, share: tuple[int, int] = (0, 1)) -> str | None:
    """The first problem with the checkpoint in ``directory``: no readable manifest, or a file
    of it (of this ``(rank, ranks)`` share of them) missing, of another size or, with
    ``sha256``, of other contents. None when intact."""
    directory = Path(directory)
    try:
        files = json.loads((directory / MANIFEST).read_text())["files"]
    except FileNotFoundError:
        return (
            f"{directory} has no {MANIFEST}: its save did not complete, or it is not a bigscale "
            "checkpoint"
        )
    except (OSError, ValueError, KeyError, TypeError) as exc:
        return f"unreadable {directory / MANIFEST} ({exc})"
    rank, ranks = share
    for name in sorted(files)[rank::ranks]:
        path, expected = directory / name, files[name]
        if not path.is_file():
            return f"{path} is missing"
        if path.stat().st_size != expected["size"]:
            return (
                f"{path} is truncated or changed ({path.stat().st_size} bytes, manifest says "
                f"{expected['size']})"
            )
        if sha256 and _sha256(path) != expected["sha256"]:
            return f"{path} does not match its checksum"
    return None


def select_resume_point(
    root: Path,
    resume: str,
    verify: bool,
    check: Callable[[Path], Problem | None] | None = None,
) -> ResumeChoice:
    """The one rule for which checkpoint a run continues from (the trainer, ``bigscale plan``
    and ``bigscale export`` all ask it): per ``resume`` (``auto``, ``never`` or a checkpoint
    path), the newest complete checkpoint under ``root`` whose files match its manifest (sizes;
    contents too with ``verify``), passing over damaged ones. ``latest`` is not consulted: a
    checkpoint is complete when its manifest exists, and ``latest`` may lag or dangle.

    Needs no process group; ``check`` (default: every file here) lets the ranks split the
    reading. Raises CheckpointError for ``never`` with checkpoints present and for a named
    checkpoint that is not intact."""
    root = Path(root)

    def default_check(directory: Path) -> Problem | None:
        problem = check_files(directory, verify)
        return Problem(directory.name, problem) if problem else None

    check = check or default_check
    tags = complete_tags(root)
    if resume == "never":
        if tags:
            raise CheckpointError(
                f"resume=never but {root} already holds checkpoints ({', '.join(tags)}); use a "
                "new run_dir or resume=auto"
            )
        return ResumeChoice(None, [])
    if resume != "auto":
        path = Path(resume)
        if not (path / MANIFEST).is_file():
            raise CheckpointError(f"resume={resume}: not a complete bigscale checkpoint")
        named = check(path)
        if named:
            raise CheckpointError(f"resume={resume}: {named.message}")
        return ResumeChoice(path, [])
    skipped: list[Problem] = []
    for tag in reversed(tags):
        problem = check(root / tag)
        if problem is None:
            return ResumeChoice(root / tag, skipped)
        skipped.append(problem)
    return ResumeChoice(None, skipped)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()
