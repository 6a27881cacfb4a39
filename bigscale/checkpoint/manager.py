"""Checkpoints that count only when whole: the training loop calls ``save(step)``; this module
owns the interval, the atomic write, the manifest, ``latest``, retention and the choice of what
to resume from.

A checkpoint is written under ``.partial-<tag>``; every rank writes its DeepSpeed shards and its
own training state; the files are checksummed (split across ranks); rank 0 writes
``manifest.json`` last and renames the directory to ``<tag>``; only then does ``latest`` move.
A job killed at any moment leaves either the previous complete checkpoint or the new one.

With ``checkpoint.async`` the training loop waits only while the state is copied to host
memory; writing, hashing and the commit (agreed on a gloo group of its own) run in a thread.
The sha256 of a file bigscale writes comes from the bytes as they are written."""

from __future__ import annotations

import json
import os
import pickle
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.distributed as dist

from bigscale.checkpoint.async_writer import Background, FileWriter, HostPool
from bigscale.checkpoint.precheck import Precheck
from bigscale.checkpoint.select import (
    LATEST,
    MANIFEST,
    META,
    PARTIAL,
    Problem,
    _sha256,
    check_files,
    complete_tags,
    select_resume_point,
    tag_for,
)
from bigscale.checkpoint.storage import storage_failure
from bigscale.config.schema import CheckpointConfig
from bigscale.dist.env import DistEnv
from bigscale.errors import CheckpointError, DivergenceError
from bigscale.logging import get_logger

log = get_logger(__name__)


class ShardedState(Protocol):
    """What writes the big, sharded part of a checkpoint (the DeepSpeed engine)."""

    def save_checkpoint(self, directory: Path, tag: str) -> None: ...

    def load_checkpoint(self, directory: Path, tag: str) -> None: ...

    def weights_finite(self) -> bool: ...


class Stateful(Protocol):
    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


class CheckpointManager:
    def __init__(
        self, root: Path, cfg: CheckpointConfig, env: DistEnv, precheck: Precheck | None = None
    ):
        self.root, self.cfg, self.env = Path(root), cfg, env
        self._precheck = precheck  # a check of the likely resume point, started early
        self._last_save = time.monotonic()
        self._last_saved_step = -1
        self._inflight: Background | None = None
        self._pool = HostPool()
        self._group: Any = None

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
        wait: bool | None = None,
    ) -> bool:
        """Write a checkpoint for ``step`` if it is due (or ``force``); True if one was written.

        ``meta`` is called only when one is written: the trainer asks after every step. With
        ``checkpoint.async`` the files are written and committed in the background; ``wait``
        (default: ``force``, i.e. the final and a stop signal's save) returns only once the
        checkpoint is complete."""
        if step == self._last_saved_step or not (force or self.due(step)):
            if force if wait is None else wait:
                self.wait()  # this step's checkpoint may still be in the background
            return False
        tag = tag_for(step)
        # The previous save first: it completes (or fails) before this one is judged or begun.
        self.wait(waiting_for=tag)
        if not sharded.weights_finite():
            latest = self.root / LATEST
            last = latest.read_text().strip() if latest.is_file() else "none yet"
            raise DivergenceError(
                f"step {step}: the model's weights are not finite (NaN or inf); checkpoint {tag} "
                f"was not written and the last complete one ({last}) is intact. Resume from it "
                "with a lower optim.lr, or check the model's initial weights"
            )
        partial = self.root / f"{PARTIAL}{tag}"
        group = self._checkpoint_group()
        writer = FileWriter(defer=self.cfg.async_, pool=self._pool, step=step)

        def start() -> None:
            if self.env.is_main:
                shutil.rmtree(partial, ignore_errors=True)
                partial.mkdir(parents=True)

        def write_shards() -> None:
            try:
                sharded.save_checkpoint(self.root, partial.name, writer)
            except (OSError, RuntimeError):
                # DeepSpeed's save ends in a barrier the ranks that wrote their part wait in;
                # meet them there, so the agreement below pairs with theirs.
                _barrier()
                raise
            # Plain containers only, so loading can insist on weights_only=True.
            writer.save(state.state_dict(), partial / f"train_state_rank{self.env.rank:05d}.pt")
            if self.env.is_main:
                (partial / META).write_text(
                    json.dumps({**meta(), "world_size": self.env.world_size})
                )
                if extra_files is not None:
                    extra_files(partial)

        self._agree(tag, partial, start)
        self._agree(tag, partial, write_shards)
        self._last_save = time.monotonic()
        self._last_saved_step = step

        def finish(group: Any = None) -> None:
            self._agree(tag, partial, writer.write_all, group)
            manifest = self._checksums(partial, writer.manifest_entries(partial), group)
            self._agree(tag, partial, lambda: self._commit(tag, partial, manifest), group)

        if not self.cfg.async_:
            finish()
            return True
        # The background thread's collectives run on their own (gloo) group, never on the one
        # the training loop's collectives use at the same time.
        self._inflight = Background(tag, lambda: finish(group))
        if wait is None:
            wait = force
        if wait:
            self.wait()
        return True

    def wait(self, waiting_for: str | None = None) -> None:
        """Block until the background save in flight (if any) is complete; raise its error."""
        inflight, self._inflight = self._inflight, None
        if inflight is None:
            return
        if waiting_for is not None and not inflight.done():
            log.info(
                "checkpoint %s waits for the background write of %s to finish (at most one "
                "save is in flight; save less often if this repeats)",
                waiting_for,
                inflight.tag,
            )
        inflight.join()
        if inflight.error is not None:
            raise inflight.error

    def _checkpoint_group(self) -> Any:
        """A gloo group for the background writer's agreement, made once, on every rank (making
        it is collective: the first save is reached by all ranks together)."""
        if self.cfg.async_ and self._group is None and _distributed():
            self._group = dist.new_group(backend="gloo")
        return self._group

    def _commit(self, tag: str, partial: Path, manifest: dict[str, dict[str, Any]]) -> None:
        if not self.env.is_main:
            return
        final = self.root / tag
        (partial / MANIFEST).write_text(json.dumps({"tag": tag, "files": manifest}, indent=1))
        shutil.rmtree(final, ignore_errors=True)
        os.replace(partial, final)
        try:
            _write_atomic(self.root / LATEST, tag)
        except BaseException:
            shutil.rmtree(final, ignore_errors=True)  # complete only once latest names it
            raise
        self._rotate()
        log.info("checkpoint %s written (%d files)", final, len(manifest))

    def _agree(self, tag: str, partial: Path, phase: Callable[[], None], group: Any = None) -> None:
        """Run one phase of a save on every rank, then agree on its outcome (this stands in for
        a barrier): a rank that could not write (a full disk, a read-only directory) makes
        every rank stop with the same message, the partial directory removed and the last
        complete checkpoint untouched, instead of the others waiting for it in a collective."""
        failure: BaseException | None = None
        mine: tuple[str, bool] | None = None
        try:
            phase()
        except (OSError, RuntimeError) as exc:
            failure = exc
            storage = storage_failure(exc, self.root)
            mine = (storage, True) if storage else (f"rank {self.env.rank}: {exc!r}", False)
        found = [m for m in _all_gather(mine, group) if m]
        if not found:
            return
        if self.env.is_main:
            shutil.rmtree(partial, ignore_errors=True)
        latest = self.root / LATEST
        last = (
            f"the last complete checkpoint ({latest.read_text().strip()}) is intact and a rerun "
            "resumes from it"
            if latest.is_file()
            else "there is no earlier complete checkpoint"
        )
        cause, user_caused = next((m for m in found if not m[1]), found[0])
        message = (
            f"checkpoint {tag} could not be written: {cause}. Its partial directory was removed; "
            f"{last}"
        )
        if not user_caused:  # not the storage: a bug, which keeps its traceback
            raise RuntimeError(message) from failure
        raise CheckpointError(message) from None

    def _checksums(
        self, directory: Path, written: dict[str, dict[str, Any]], group: Any = None
    ) -> dict[str, dict[str, Any]]:
        """Size and sha256 of every file: those bigscale wrote were hashed as they were
        written; the few small ones other libraries wrote (the Hugging Face config and
        tokenizer, DeepSpeed's recovery script) are read back, split across ranks."""
        files = sorted(
            str(p.relative_to(directory))
            for p in directory.rglob("*")
            if p.is_file() and str(p.relative_to(directory)) not in written
        )
        mine = dict(written)
        for name in files[self.env.rank :: self.env.world_size]:
            mine[name] = {
                "size": (directory / name).stat().st_size,
                "sha256": _sha256(directory / name),
            }
        merged: dict[str, dict[str, Any]] = {}
        for part in _all_gather(mine, group):
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
        return complete_tags(self.root)

    def verify(self, tag: str) -> Problem | None:
        """A missing or truncated file (or, with ``verify``, a changed one), checked on all
        ranks in parallel; the same answer everywhere."""
        return self._verify_dir(self.root / tag)

    def _verify_dir(self, directory: Path) -> Problem | None:
        share = (self.env.rank, self.env.world_size)
        checked, problem = False, None
        if self._precheck is not None:
            checked, problem = self._precheck.answer_for(directory, self.cfg.verify, share)
        if not checked:
            problem = check_files(directory, self.cfg.verify, share)
        found = [p for p in _all_gather(problem) if p]
        return Problem(directory.name, found[0]) if found else None

    def resume_point(self, resume: str) -> Path | None:
        """The checkpoint to resume from (see ``select_resume_point``), checked on all ranks in
        parallel, saying which damaged ones it passed over."""
        choice = select_resume_point(self.root, resume, self.cfg.verify, check=self._verify_dir)
        for problem in choice.skipped:
            tag, message = problem.tag, problem.message
            log.warning("checkpoint %s is damaged: %s; trying the previous one", tag, message)
        return choice.point

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


def _all_gather(value: Any, group: Any = None) -> list[Any]:
    if not _distributed():
        return [value]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, value, group=group)
    return out
