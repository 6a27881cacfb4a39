"""Tokenize once per cluster (or node); the other ranks wait on a file, not on a collective.

One rank builds the tokenized cache: global rank 0 (``data.cache_scope=cluster``, the cache on a
filesystem every node mounts) or local rank 0 of each node (``node``, a cache per node). The
others wait for the builder's marker file, written atomically when it is done or has failed, and
then read the cache. Waiting on a file means no collective is pending while tokenization runs,
so ``dist.timeout_minutes`` bounds dead ranks, not the size of the dataset. A builder that dies
without a word (killed, out of memory) takes its torchrun agent down, which ends the waiters.
"""

from __future__ import annotations

import json
import os
import socket
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from bigscale.config.schema import CacheScope
from bigscale.dist.env import DistEnv
from bigscale.errors import DataError
from bigscale.logging import get_logger

log = get_logger(__name__)

T = TypeVar("T")

DELAY_ENV = "BIGSCALE_FAULT_TOKENIZE_DELAY_S"
"""Test hook: the builder sleeps this many seconds before tokenizing, to outlast the collective
timeout in a test (see ``bigscale.train.faults`` for the other fault hooks)."""
READY_DIR = ".ready"
_STALE_S = 7 * 24 * 3600


def cache_root(cache_dir: Path, scope: CacheScope) -> Path:
    """The directory the builder writes: ``cache_dir`` itself, or a per-host folder in it, so a
    node-scoped cache on a shared filesystem has no two nodes writing the same files."""
    if CacheScope(scope) is CacheScope.node:
        return Path(cache_dir) / f"node-{socket.gethostname()}"
    return Path(cache_dir)


def is_builder(env: DistEnv, scope: CacheScope) -> bool:
    return env.is_main if CacheScope(scope) is CacheScope.cluster else env.is_local_main


class ReadyMarker:
    """``<cache>/.ready/<run id>.json``: ``{"ok": true, "info": ...}`` or ``{"ok": false,
    "error": ...}``. The run id (fresh per job) keeps a marker of an earlier or concurrent job
    with the same cache from being read as this one's."""

    def __init__(self, cache: Path, run_id: str):
        self.path = Path(cache) / READY_DIR / f"{run_id}.json"

    def done(self, info: dict[str, Any]) -> None:
        self._write({"ok": True, "info": info})

    def fail(self, message: str) -> None:
        self._write({"ok": False, "error": message})

    def _write(self, payload: dict[str, Any]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(payload))
        os.replace(tmp, self.path)  # atomic: a waiter sees nothing or all of it
        now = time.time()
        for old in self.path.parent.glob("*.json"):
            if now - old.stat().st_mtime > _STALE_S:
                old.unlink(missing_ok=True)

    def wait(self, poll_s: float = 0.2, log_every_s: float = 60.0) -> dict[str, Any]:
        """The builder's ``info``; its error as a DataError. Logs every ``log_every_s``."""
        start = last_log = time.monotonic()
        while not self.path.is_file():
            time.sleep(poll_s)
            if time.monotonic() - last_log >= log_every_s:
                last_log = time.monotonic()
                log.info(
                    "waiting for the tokenized data (%.0f min so far; marker %s)",
                    (last_log - start) / 60,
                    self.path,
                )
        payload = json.loads(self.path.read_text())
        if not payload["ok"]:
            raise DataError(payload["error"])
        return payload["info"]


def agree_on_run_id(env: DistEnv) -> str:
    """A fresh id chosen by rank 0; a quick collective, as every rank arrives here together
    (the slow part, tokenizing, comes after)."""
    box = [uuid.uuid4().hex if env.is_main else None]
    if env.world_size > 1:
        import torch.distributed as dist

        dist.broadcast_object_list(box, src=0)
    return str(box[0])


def build_once(
    env: DistEnv,
    scope: CacheScope,
    cache: Path,
    build: Callable[[dict[str, Any] | None], tuple[T, dict[str, Any]]],
    run_id: str | None = None,
) -> T:
    """``build(None)`` on the builder, which returns its result and what the others need to
    find its cache (``info``); then ``build(info)`` on the others. An error on the builder
    reaches them as a DataError with its message. ``run_id``: default, agreed with rank 0."""
    marker = ReadyMarker(cache, run_id or agree_on_run_id(env))
    if not is_builder(env, scope):
        return build(marker.wait())[0]
    try:
        delay = float(os.environ.get(DELAY_ENV, "0") or 0)
        if delay:
            time.sleep(delay)
        result, info = build(None)
    except DataError as e:
        marker.fail(str(e))
        raise
    except BaseException as e:
        marker.fail(f"rank {env.rank} failed while preparing data: {type(e).__name__}: {e}")
        raise
    marker.done(info)
    return result
