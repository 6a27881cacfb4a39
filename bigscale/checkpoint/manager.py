"""Checkpoints that count only when whole: the training loop calls ``save(step)``; this module
owns the interval, the atomic write, the manifest, ``latest``, retention and the choice of what
to resume from.

A checkpoint is written under ``.partial-<tag>``; every rank writes its DeepSpeed shards and its
own training state; the files are checksummed (split across ranks); rank 0 writes
``manifest.json`` last and renames the directory to ``<tag>``; only then does ``latest`` move.
A job killed at any moment leaves either the previous complete checkpoint or the new one."""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.distributed as dist

from bigscale.config.schema import CheckpointConfig
from bigscale.dist.env import DistEnv
from bigscale.errors import CheckpointError, DivergenceError
from bigscale.logging import get_logger

log = get_logger(__name__)

MANIFEST = "manifest.json"
META = "meta.json"
LATEST = "latest"
PARTIAL = ".partial-"


class ShardedState(Protocol):
    """What writes the big, sharded part of a checkpoint (the DeepSpeed engine)."""

    def save_checkpoint(self, directory: Path, tag: str) -> None: ...

    def load_checkpoint(self, directory: Path, tag: str) -> None: ...

    def weights_finite(self) -> bool: ...


class Stateful(Protocol):
    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


def tag_for(step: int) -> str:
    return f"step_{step:08d}"


def step_of(tag: str) -> int:
    return int(tag.rsplit("_", 1)[1])


@dataclass(frozen=True)
class Problem:
    tag: str
    message: str


class CheckpointManager:
    def __init__(self, root: Path, cfg: CheckpointConfig, env: DistEnv):
        self.root, self.cfg, self.env = Path(root), cfg, env
        self._last_save = time.monotonic()
        self._last_saved_step = -1

    # -- saving ---------------------------------------------------------------------------

    def due(self, step: int) -> bool:
        """Same answer on every rank (saving is collective): the time rule is rank 0's clock."""
        if self.cfg.every_steps and step % self.cfg.every_steps == 0:
            return True
        if not self.cfg.every_minutes:
            return False
        late = time.monotonic() - self._last_save >= 60 * self.cfg.every_minutes
        return bool(_broadcast(late))

    def save(
        self,
        step: int,
        sharded: ShardedState,
        state: Stateful,
        meta: Callable[[], dict[str, Any]],
        extra_files: Callable[[Path], None] | None = None,
        force: bool = False,
    ) -> bool:
        """Write a checkpoint for ``step`` if it is due (or ``force``); True if one was written.

        ``meta`` is called only when one is written: the trainer asks after every step."""
        if step == self._last_saved_step or not (force or self.due(step)):
            return False
        tag = tag_for(step)
        if not sharded.weights_finite():
            latest = self.root / LATEST
            last = latest.read_text().strip() if latest.is_file() else "none yet"
            raise DivergenceError(
                f"step {step}: the model's weights are not finite (NaN or inf); checkpoint {tag} "
                f"was not written and the last complete one ({last}) is intact. Resume from it "
                "with a lower optim.lr, or check the model's initial weights"
            )
        partial = self.root / f"{PARTIAL}{tag}"
        if self.env.is_main:
            shutil.rmtree(partial, ignore_errors=True)
            partial.mkdir(parents=True)
        _barrier()
        sharded.save_checkpoint(self.root, partial.name)
        # Plain containers only, so loading can insist on weights_only=True.
        torch.save(state.state_dict(), partial / f"train_state_rank{self.env.rank:05d}.pt")
        if self.env.is_main:
            (partial / META).write_text(json.dumps({**meta(), "world_size": self.env.world_size}))
            if extra_files is not None:
                extra_files(partial)
        _barrier()
        manifest = self._checksums(partial)
        if self.env.is_main:
            (partial / MANIFEST).write_text(json.dumps({"tag": tag, "files": manifest}, indent=1))
            final = self.root / tag
            shutil.rmtree(final, ignore_errors=True)
            os.replace(partial, final)
            _write_atomic(self.root / LATEST, tag)
            self._rotate()
            log.info("checkpoint %s written (%d files)", final, len(manifest))
        _barrier()
        self._last_save = time.monotonic()
        self._last_saved_step = step
        return True

    def _checksums(self, directory: Path) -> dict[str, dict[str, Any]]:
        """Size and sha256 of every file, the hashing split across ranks."""
        files = sorted(str(p.relative_to(directory)) for p in directory.rglob("*") if p.is_file())
        mine = {
            name: {"size": (directory / name).stat().st_size, "sha256": _sha256(directory / name)}
            for name in files[self.env.rank :: self.env.world_size]
        }
        merged: dict[str, dict[str, Any]] = {}
        for part in _all_gather(mine):
            merged.update(part)
        return dict(sorted(merged.items()))

    def _rotate(self) -> None:
        for stale in self.root.glob(f"{PARTIAL}*"):
            shutil.rmtree(stale, ignore_errors=True)
        if self.cfg.keep_last <= 0:
            return
        complete = self.complete_tags()
        for tag in complete[: -self.cfg.keep_last]:
            shutil.rmtree(self.root / tag, ignore_errors=True)

    # -- resuming -------------------------------------------------------------------------

    def complete_tags(self) -> list[str]:
        """Tags with a manifest (written last), oldest first."""
        if not self.root.is_dir():
            return []
        tags = [
            p.name
            for p in self.root.iterdir()
            if p.is_dir() and p.name.startswith("step_") and (p / MANIFEST).is_file()
        ]
        return sorted(tags, key=step_of)

    def verify(self, tag: str) -> Problem | None:
        """A missing or truncated file (or, with ``verify``, a changed one), checked on all
        ranks in parallel; the same answer everywhere."""
        directory = self.root / tag
        problem: str | None = None
        try:
            files = json.loads((directory / MANIFEST).read_text())["files"]
        except (OSError, ValueError, KeyError) as exc:
            files, problem = {}, f"unreadable {MANIFEST} ({exc})"
        names = sorted(files)
        for name in names[self.env.rank :: self.env.world_size]:
            path, expected = directory / name, files[name]
            if not path.is_file():
                problem = f"{path} is missing"
            elif path.stat().st_size != expected["size"]:
                problem = (
                    f"{path} is truncated or changed ({path.stat().st_size} bytes, manifest "
                    f"says {expected['size']})"
                )
            elif self.cfg.verify and _sha256(path) != expected["sha256"]:
                problem = f"{path} does not match its checksum"
            if problem:
                break
        found = [p for p in _all_gather(problem) if p]
        return Problem(tag, found[0]) if found else None

    def resume_point(self, resume: str) -> Path | None:
        """The checkpoint to resume from: per ``resume`` (auto, never or a path), the newest one
        that verifies, falling back past damaged ones and saying so."""
        if resume == "never":
            if self.complete_tags():
                raise CheckpointError(
                    f"resume=never but {self.root} already holds checkpoints "
                    f"({', '.join(self.complete_tags())}); use a new run_dir or resume=auto"
                )
            return None
        if resume != "auto":
            path = Path(resume)
            if not (path / MANIFEST).is_file():
                raise CheckpointError(f"resume={resume}: not a complete bigscale checkpoint")
            problem = CheckpointManager(path.parent, self.cfg, self.env).verify(path.name)
            if problem:
                raise CheckpointError(f"resume={resume}: {problem.message}")
            return path
        for tag in reversed(self.complete_tags()):
            problem = self.verify(tag)
            if problem is None:
                return self.root / tag
            log.warning(
                "checkpoint %s is damaged: %s; trying the previous one", tag, problem.message
            )
        return None

    def load(self, checkpoint: Path, sharded: ShardedState, state: Stateful) -> dict[str, Any]:
        """Restore the engine and this rank's training state; returns the checkpoint's meta.

        The checkpoint may come from another number of ranks: the engine re-partitions its
        state (or says why it cannot), and a rank the checkpoint has no state for takes rank
        0's counters and data position, which are the same on every rank, but not its random
        state (it keeps its own seed, rather than repeat rank 0's dropout masks)."""
        meta = json.loads((checkpoint / META).read_text())
        own = checkpoint / f"train_state_rank{self.env.rank:05d}.pt"
        take_rng = self.env.rank < meta["world_size"]
        if not take_rng:
            own = checkpoint / f"train_state_rank{0:05d}.pt"
        try:
            sharded.load_checkpoint(checkpoint.parent, checkpoint.name)
            saved = torch.load(own, map_location="cpu", weights_only=True)
            if not take_rng:
                saved.pop("rng", None)
            state.load_state_dict(saved)
        except pickle.UnpicklingError as exc:
            raise CheckpointError(
                f"refusing to load {checkpoint}: it holds objects other than tensors and plain "
                f"data, which could run code ({str(exc).splitlines()[0]})"
            ) from None
        return meta


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text + "\n")
    os.replace(tmp, path)


def _distributed() -> bool:
    return dist.is_initialized() and dist.get_world_size() > 1


def _barrier() -> None:
    if _distributed():
        dist.barrier()


def _broadcast(value: Any) -> Any:
    if not _distributed():
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _all_gather(value: Any) -> list[Any]:
    if not _distributed():
        return [value]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, value)
    return out
