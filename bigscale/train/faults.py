"""Fault injection, for the tests of what a run does when its numbers go bad.

``BIGSCALE_FAULT_INF_LOSS_STEPS=3,4`` turns the loss of optimizer steps 3 and 4 into +inf (on
the rank given by ``BIGSCALE_FAULT_RANK``, every rank when unset) before the backward pass, so
the real skip path runs: non-finite gradients, the optimizer's overflow check, the guard. Unset,
nothing changes."""

from __future__ import annotations

import os

import torch


class Faults:
    def __init__(self, rank: int, environ: dict[str, str] | None = None):
        env = os.environ if environ is None else environ
        steps = env.get("BIGSCALE_FAULT_INF_LOSS_STEPS", "")
        target = env.get("BIGSCALE_FAULT_RANK")
        applies = target is None or int(target) == rank
        self.inf_loss_steps = {int(s) for s in steps.split(",") if s.strip()} if applies else set()

    def loss(self, loss: torch.Tensor, step: int) -> torch.Tensor:
        """``loss`` as computed for optimizer step ``step`` (counting from 1)."""
        if step in self.inf_loss_steps:
            return loss * float("inf")
        return loss
