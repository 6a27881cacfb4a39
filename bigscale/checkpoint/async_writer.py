"""Writing a checkpoint's tensor files: hashed as they are written, and, for an asynchronous
save, snapshotted to host memory first so training can go on while a thread writes them.

DeepSpeed writes its shards through ``engine.checkpoint_engine.save(state_dict, path)``;
``FileWriter`` stands in for its torch engine there (and writes bigscale's own per-rank state),
so every big file passes through ``HashingFile`` and its sha256 comes from the bytes written,
never from reading the file back. DeepSpeed's own decoupled/FastPersist engines are not used:
they need the AIO op built, hash nothing, and commit on their own schedule, not after
bigscale's manifest."""

from __future__ import annotations

import copy
import hashlib
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch
from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine

_PARALLEL_HASH_BYTES = 1 << 20
"""Writes are cut into chunks of this size, each hashed on a second thread while the file write
runs (both release the GIL), so hashing adds little to a save's time when a core is free."""

SLEEP_STEP_ENV, SLEEP_SECONDS_ENV = (
    "BIGSCALE_FAULT_CKPT_SLEEP_STEP",
    "BIGSCALE_FAULT_CKPT_SLEEP_SECONDS",
)
"""Test-only: the checkpoint of step ``$BIGSCALE_FAULT_CKPT_SLEEP_STEP`` sleeps
``$BIGSCALE_FAULT_CKPT_SLEEP_SECONDS`` after writing its files, before the commit, so a test can
signal or kill a run while that write is in flight."""

_hasher = ThreadPoolExecutor(max_workers=1, thread_name_prefix="bigscale-hash")


class HashingFile:
    """A binary file opened for writing that keeps the sha256 and size of what went into it."""

    def __init__(self, path: Path):
        self._f = open(path, "wb")  # noqa: SIM115 (closed by close())
        self._sha = hashlib.sha256()
        self.size = 0

    def write(self, data: Any) -> int:
        view = memoryview(data).cast("B")
        # Chunk by chunk, each hashed while it is written: both passes read it while it is
        # still in the cache, instead of competing for memory bandwidth over the whole record.
        for start in range(0, view.nbytes, _PARALLEL_HASH_BYTES):
            chunk = view[start : start + _PARALLEL_HASH_BYTES]
            if chunk.nbytes == _PARALLEL_HASH_BYTES:
                hashing = _hasher.submit(self._sha.update, chunk)
                self._f.write(chunk)
                hashing.result()
            else:
                self._sha.update(chunk)
                self._f.write(chunk)
        self.size += view.nbytes
        return view.nbytes

    def flush(self) -> None:
        self._f.flush()

    def close(self) -> None:
        self._f.close()

    def hexdigest(self) -> str:
        return self._sha.hexdigest()


def save_hashed(obj: Any, path: Path) -> dict[str, Any]:
    """``torch.save`` into ``path``; returns the manifest entry (size, sha256) of the bytes."""
    out = HashingFile(path)
    try:
        torch.save(obj, out)  # type: ignore[arg-type]  # any object with write() will do
    finally:
        out.close()
    return {"size": out.size, "sha256": out.hexdigest()}


class HostPool:
    """Host buffers for snapshots, reused from one save to the next (at most one save is in
    flight, so the previous snapshot is written before the next one overwrites them): after
    the first save a snapshot is a plain copy, without page faults. Pinned where a GPU copies
    into it."""

    def __init__(self) -> None:
        self._buffers: list[torch.Tensor] = []
        self._next = 0

    def begin(self) -> None:
        self._next = 0

    def take(self, nbytes: int, pinned: bool) -> torch.Tensor:
        i, self._next = self._next, self._next + 1
        if i < len(self._buffers) and self._buffers[i].numel() == nbytes:
            return self._buffers[i]
        buf = torch.empty(nbytes, dtype=torch.uint8, pin_memory=pinned)
        if i < len(self._buffers):
            self._buffers[i] = buf
        else:
            self._buffers.append(buf)
        return buf

    @property
    def nbytes(self) -> int:
        return sum(b.numel() for b in self._buffers)


def snapshot(obj: Any, pool: HostPool) -> Any:
    """A copy of ``obj`` whose tensors live in host memory from ``pool``: each tensor copied
    compactly (a view of a larger flat buffer becomes a tensor of its own, as DeepSpeed's
    ``clone_tensors_for_torch_save`` makes it for torch.save), the same tensor met twice copied
    once."""
    copies: dict[tuple[int, torch.dtype, tuple[int, ...], tuple[int, ...]], torch.Tensor] = {}
    on_gpu = False

    def tensor(t: torch.Tensor) -> torch.Tensor:
        nonlocal on_gpu
        key = (t.data_ptr(), t.dtype, tuple(t.shape), t.stride())
        host = copies.get(key)
        if host is None:
            buf = pool.take(t.numel() * t.element_size(), pinned=t.is_cuda)
            host = buf.view(t.dtype).view(t.shape)
            host.copy_(t, non_blocking=t.is_cuda)
            on_gpu = on_gpu or t.is_cuda
            copies[key] = host
        return host

    def walk(x: Any) -> Any:
        if isinstance(x, torch.Tensor):
            return tensor(x.detach())
        if isinstance(x, dict):
            return type(x)((k, walk(v)) for k, v in x.items())
        if isinstance(x, (list, tuple)) and type(x) in (list, tuple):
            return type(x)(walk(v) for v in x)
        if isinstance(x, (str, bytes, int, float, bool, type(None))):
            return x
        return copy.deepcopy(x)  # small objects (a loss scaler, an enum) that may change later

    out = walk(obj)
    if on_gpu:
        torch.cuda.synchronize()  # the copies were issued non-blocking
    return out


class FileWriter(TorchCheckpointEngine):
    """DeepSpeed's checkpoint engine for one save: writes hashed now (``defer=False``), or
    keeps a host snapshot of each file for ``write_all`` to write later (``defer=True``)."""

    def __init__(self, defer: bool, pool: HostPool, step: int):
        super().__init__(None)
        self.step = step
        self.zipfile_serialization = True
        self.defer, self.pool = defer, pool
        self.pending: list[tuple[Path, Any]] = []
        self.entries: dict[Path, dict[str, Any]] = {}
        pool.begin()

    def preserves_storage_sharing(self) -> bool:
        # Asked by DeepSpeed whether to clone the module's tensors (views of flat buffers)
        # before saving: a snapshot copies them compactly already, so a second copy is waste.
        return not self.defer

    def save(self, state_dict: Any, path: str | Path) -> None:
        if self.defer:
            self.pending.append((Path(path), snapshot(state_dict, self.pool)))
        else:
            self.entries[Path(path)] = save_hashed(state_dict, Path(path))

    def write_all(self) -> None:
        while self.pending:
            path, state = self.pending.pop(0)
            self.entries[path] = save_hashed(state, path)
        if os.environ.get(SLEEP_STEP_ENV) == str(self.step):
            time.sleep(float(os.environ.get(SLEEP_SECONDS_ENV) or 10))

    def manifest_entries(self, directory: Path) -> dict[str, dict[str, Any]]:
        return {str(p.relative_to(directory)): e for p, e in self.entries.items()}


class Background:
    """The one background save in flight: a thread running ``work``, its error kept for the
    training loop's thread to raise when it waits."""

    def __init__(self, tag: str, work: Any):
        self.tag = tag
        self.error: BaseException | None = None
        self.started = time.monotonic()

        def run() -> None:
            try:
                work()
            except BaseException as exc:
                self.error = exc

        # A daemon: a process that ends (or is killed) mid-write leaves a partial directory,
        # never a checkpoint that looks complete; the previous one stays the newest.
        self._thread = threading.Thread(target=run, name=f"bigscale-save-{tag}", daemon=True)
        self._thread.start()

    def done(self) -> bool:
        return not self._thread.is_alive()

    def join(self) -> None:
        self._thread.join()
