"""Everything besides model and optimizer that a run must carry across a restart: progress
counters, the data position and every random generator of this rank.

Saved as plain containers (ints, lists, tensors) so it loads with ``weights_only=True``."""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch


@dataclass
class TrainState:
    step: int = 0
    """Optimizer steps done."""
    tokens_seen: int = 0
    """Real tokens consumed by all ranks."""
    epoch: int = 0
    samples_in_epoch: int = 0
    """Samples all ranks together have taken from the start of the current epoch's order, the
    same on every rank and independent of how many there are: a run resumed on another number
    of ranks continues right after them. Counted by the training loop itself, not by the
    sampler, which loader workers may have drawn ahead of it."""
    skipped_steps: int = 0
    """Steps whose non-finite loss or gradient norm left the weights unchanged."""
    bad_steps_in_row: int = 0
    loss_spikes: int = 0
    recent_losses: list[float] = field(default_factory=list)
    """The last steps' losses, for loss-spike detection."""
    stream: str | None = None
    """This rank's position in a streamed dataset (``data.streaming``), as JSON: it holds the
    ``datasets`` state, whose integers may exceed what a tensor holds. None otherwise."""

    def state_dict(self) -> dict[str, Any]:
        return {
            "step": self.step,
            "tokens_seen": self.tokens_seen,
            "epoch": self.epoch,
            "samples_in_epoch": self.samples_in_epoch,
            "skipped_steps": self.skipped_steps,
            "bad_steps_in_row": self.bad_steps_in_row,
            "loss_spikes": self.loss_spikes,
            "recent_losses": list(self.recent_losses),
            "rng": capture_rng(),
            **({"stream": self.stream} if self.stream is not None else {}),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Counters and position; the random state too when given (a rank that did not exist
        when the checkpoint was written gets the counters alone and keeps its own seed)."""
        self.step = int(state["step"])
        self.tokens_seen = int(state["tokens_seen"])
        self.epoch = int(state["epoch"])
        self.samples_in_epoch = int(state["samples_in_epoch"])
        # Absent from checkpoints written before the step guard existed.
        self.skipped_steps = int(state.get("skipped_steps", 0))
        self.bad_steps_in_row = int(state.get("bad_steps_in_row", 0))
        self.loss_spikes = int(state.get("loss_spikes", 0))
        self.recent_losses = [float(x) for x in state.get("recent_losses", [])]
        self.stream = state.get("stream")
        if "rng" in state:
            restore_rng(state["rng"])


def capture_rng() -> dict[str, Any]:
    version, mt, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    out: dict[str, Any] = {
        "python": [version, list(mt), gauss],
        "numpy": [name, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        out["cuda"] = torch.cuda.get_rng_state_all()
    return out


def restore_rng(state: dict[str, Any]) -> None:
    version, mt, gauss = state["python"]
    random.setstate((version, tuple(mt), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
