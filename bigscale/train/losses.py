"""Preference losses on per-sequence log-probabilities: pure functions of tensors.

Each takes the summed log-probabilities of the chosen and rejected completions (``[pairs]``,
summed over the completion's tokens) and, where the loss needs them, the reference model's and
the completion lengths; it returns the per-pair losses and the implicit rewards that the
``rewards/*`` metrics report. The formulas follow the papers and TRL's implementations, which
``tests/unit/test_preference_losses.py`` checks them against.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class PairLosses:
    losses: torch.Tensor
    """Per-pair loss; the objective is their mean (plus ORPO's SFT term)."""
    chosen_rewards: torch.Tensor
    rejected_rewards: torch.Tensor


def dpo(
    chosen: torch.Tensor,
    rejected: torch.Tensor,
    ref_chosen: torch.Tensor,
    ref_rejected: torch.Tensor,
    beta: float,
    label_smoothing: float = 0.0,
) -> PairLosses:
    """DPO's sigmoid loss ``-log sigmoid(beta * margin)`` on the log-ratio margin; with
    ``label_smoothing`` e the conservative form, ``(1-e)`` of that plus ``e`` of the flipped
    pair's. At policy == reference the margin is 0 and the loss is log 2."""
    chosen_ratio, rejected_ratio = chosen - ref_chosen, rejected - ref_rejected
    margin = beta * (chosen_ratio - rejected_ratio)
    losses = -F.logsigmoid(margin) * (1 - label_smoothing)
    if label_smoothing:
        losses = losses - F.logsigmoid(-margin) * label_smoothing
    return PairLosses(losses, beta * chosen_ratio.detach(), beta * rejected_ratio.detach())


def ipo(
    chosen: torch.Tensor,
    rejected: torch.Tensor,
    ref_chosen: torch.Tensor,
    ref_rejected: torch.Tensor,
    chosen_tokens: torch.Tensor,
    rejected_tokens: torch.Tensor,
    beta: float,
) -> PairLosses:
    """IPO: ``(margin - 1/(2 beta))^2`` on the margin of per-token mean log-ratios (the length
    normalization TRL applies, agreed with the IPO authors)."""
    chosen_ratio, rejected_ratio = chosen - ref_chosen, rejected - ref_rejected
    margin = chosen_ratio / chosen_tokens.clamp(min=1) - rejected_ratio / rejected_tokens.clamp(
        min=1
    )
    losses = (margin - 1 / (2 * beta)) ** 2
    return PairLosses(losses, beta * chosen_ratio.detach(), beta * rejected_ratio.detach())


def simpo(
    chosen: torch.Tensor,
    rejected: torch.Tensor,
    chosen_tokens: torch.Tensor,
    rejected_tokens: torch.Tensor,
    beta: float,
    gamma: float,
) -> PairLosses:
    """SimPO: reward ``beta x`` the mean log-prob of a completion, loss
    ``-log sigmoid(reward_chosen - reward_rejected - gamma)``; no reference."""
    chosen_reward = beta * chosen / chosen_tokens.clamp(min=1)
    rejected_reward = beta * rejected / rejected_tokens.clamp(min=1)
    losses = -F.logsigmoid(chosen_reward - rejected_reward - gamma)
    return PairLosses(losses, chosen_reward.detach(), rejected_reward.detach())


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """``log(1 - exp(x))`` for ``x < 0``, accurate on both sides of ``-log 2``."""
    return torch.where(x > -math.log(2), torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


def orpo(
    chosen: torch.Tensor,
    rejected: torch.Tensor,
    chosen_tokens: torch.Tensor,
    rejected_tokens: torch.Tensor,
    lambda_: float,
) -> PairLosses:
    """ORPO's odds-ratio term ``-lambda log sigmoid(log odds(chosen) - log odds(rejected))``
    on per-token mean log-probs; the objective adds the SFT loss on the chosen tokens."""
    mean_chosen = chosen / chosen_tokens.clamp(min=1)
    mean_rejected = rejected / rejected_tokens.clamp(min=1)
    log_odds = (mean_chosen - mean_rejected) - (log1mexp(mean_chosen) - log1mexp(mean_rejected))
    losses = -lambda_ * F.logsigmoid(log_odds)
    return PairLosses(losses, lambda_ * mean_chosen.detach(), lambda_ * mean_rejected.detach())


def bradley_terry(chosen_scores: torch.Tensor, rejected_scores: torch.Tensor) -> PairLosses:
    """A reward model's pairwise loss ``-log sigmoid(r_chosen - r_rejected)``: the negative
    log-likelihood that the chosen completion wins under the Bradley-Terry model. The scores
    are the model's outputs themselves (no reference, no beta): they are the rewards."""
    losses = -F.logsigmoid(chosen_scores - rejected_scores)
    return PairLosses(losses, chosen_scores.detach(), rejected_scores.detach())
