"""What training minimizes, batch by batch: the trainer asks an objective for the loss of a
micro batch and for the metric sums it logs; it knows nothing of pairs or references.

``sft``: the model's own next-token loss. The preference objectives run chosen and rejected
through one forward (``pair_collate`` puts them in one padded batch; with ``data.packing``
``pack_pair_collate`` packs them into rows, each sequence summed by its ``segment_ids``), sum
each completion's token log-probs (through the chunked head when ``model.loss_chunk_tokens`` is
set, so the full logits never exist), and hand them to ``bigscale.train.losses``. DPO and IPO
read the reference model's log-probs from the table the reference pass made before training
(``bigscale.train.reference``), by each pair's row index.

``reward``: the model is a sequence classifier with one output (``load_reward_model``); its
score of each side's last real token is that side's reward, trained with the Bradley-Terry
pairwise loss. No log-probs, no reference.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from bigscale.config.schema import ObjectiveName, TrainConfig
from bigscale.data.chat import IGNORE_INDEX
from bigscale.data.pair_packing import SEGMENT_IDS
from bigscale.dist.engine import Engine
from bigscale.train import losses

PAIR_METRICS = (
    "rewards/chosen",
    "rewards/rejected",
    "rewards/accuracy",
    "rewards/margin",
    "logps/chosen",
    "logps/rejected",
)
"""Logged on every training row (means over the step's pairs on all ranks) and, prefixed
``eval_``, at every evaluation."""

REWARD_METRICS = PAIR_METRICS[:4]
"""A reward model's: its scores are the rewards; it has no completion log-probs."""

TRAIN, VALIDATION = "train", "validation"


@dataclass
class BatchLoss:
    loss: torch.Tensor
    """What backward runs on: the micro batch's mean."""
    sums: torch.Tensor
    """float64 sums of the objective's metrics over the micro batch and, last, the pair count
    (empty for SFT); added over micro batches and ranks before ``Objective.metrics``."""


class Objective:
    """SFT: the model's loss on the labelled tokens, no metrics of its own."""

    width = 0
    """Length of ``BatchLoss.sums``."""

    def loss(self, engine: Engine, batch: dict[str, torch.Tensor], split: str) -> BatchLoss:
        return BatchLoss(engine.forward(batch), torch.zeros(0, dtype=torch.float64))

    def metrics(self, sums: torch.Tensor, prefix: str = "") -> dict[str, float]:
        return {}


def sequence_logps(
    engine: Engine, batch: dict[str, torch.Tensor], chunk_tokens: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed log-probs of each row's labelled tokens, and their count, from one forward."""
    labels = batch["labels"].to(engine.device)
    targets = F.pad(labels, (0, 1), value=IGNORE_INDEX)[..., 1:]  # position t predicts t + 1
    mask = targets != IGNORE_INDEX
    if chunk_tokens:
        token_logps = engine.outputs(batch, token_logps=True).logits
    else:
        logits = engine.outputs(batch, labels=None).logits.float()
        picked = torch.gather(logits, 2, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
        token_logps = picked - torch.logsumexp(logits, dim=-1)
    if SEGMENT_IDS not in batch:
        return (token_logps * mask).sum(-1), mask.sum(-1)
    # Packed pairs: sum each sequence's positions on its own. A label is never set across a
    # boundary (a sequence's first token has none), so position t and its target t + 1 belong
    # to the same sequence wherever the mask is on.
    segments = batch[SEGMENT_IDS].to(engine.device)
    on = mask & (segments >= 0)
    count = 2 * len(batch["pair_index"])
    index = segments[on]
    sums = token_logps.new_zeros(count).index_add(0, index, token_logps[on])
    tokens = torch.zeros(count, dtype=torch.long, device=segments.device)
    return sums, tokens.index_add(0, index, torch.ones_like(index))


class PreferenceObjective(Objective):
    width = len(PAIR_METRICS) + 1

    def __init__(self, cfg: TrainConfig, reference: dict[str, torch.Tensor] | None):
        self.cfg = cfg.objective
        self.name = ObjectiveName(cfg.objective.name)
        self.chunk_tokens = cfg.model.loss_chunk_tokens
        self.reference = reference

    def loss(self, engine: Engine, batch: dict[str, torch.Tensor], split: str) -> BatchLoss:
        logps, tokens = sequence_logps(engine, batch, self.chunk_tokens)
        chosen, rejected = logps.chunk(2)
        n_chosen, n_rejected = tokens.chunk(2)
        o = self.cfg
        loss = None
        if self.name in (ObjectiveName.dpo, ObjectiveName.ipo):
            assert self.reference is not None, "the reference pass runs before training"
            ref = self.reference[split][batch["pair_index"]].to(engine.device, chosen.dtype)
            if self.name is ObjectiveName.dpo:
                pair = losses.dpo(chosen, rejected, ref[:, 0], ref[:, 1], o.beta, o.label_smoothing)
            else:
                pair = losses.ipo(
                    chosen, rejected, ref[:, 0], ref[:, 1], n_chosen, n_rejected, o.beta
                )
        elif self.name is ObjectiveName.simpo:
            pair = losses.simpo(chosen, rejected, n_chosen, n_rejected, o.beta, o.gamma)
        else:
            pair = losses.orpo(chosen, rejected, n_chosen, n_rejected, o.lambda_)
            # The SFT term: mean cross-entropy over the chosen completions' tokens.
            loss = -chosen.sum() / n_chosen.sum().clamp(min=1)
        loss = pair.losses.mean() if loss is None else loss + pair.losses.mean()
        c, r = pair.chosen_rewards, pair.rejected_rewards
        rows = [c, r, (c > r).to(c.dtype), c - r, chosen.detach(), rejected.detach()]
        sums = torch.stack([x.sum() for x in rows]).double().cpu()
        count = torch.tensor([float(len(chosen))], dtype=torch.float64)
        return BatchLoss(loss, torch.cat([sums, count]))

    def metrics(self, sums: torch.Tensor, prefix: str = "") -> dict[str, float]:
        count = float(sums[-1])
        if not count:
            return {}
        return {f"{prefix}{name}": float(sums[i]) / count for i, name in enumerate(PAIR_METRICS)}


def pair_sums(chosen: torch.Tensor, rejected: torch.Tensor) -> torch.Tensor:
    """float64 sums of the ``rewards/*`` metrics over the pairs and, last, their count."""
    rows = [chosen, rejected, (chosen > rejected).to(chosen.dtype), chosen - rejected]
    sums = torch.stack([x.sum() for x in rows]).double().cpu()
    return torch.cat([sums, torch.tensor([float(len(chosen))], dtype=torch.float64)])


class RewardObjective(Objective):
    """A Bradley-Terry reward model: one forward scores chosen and rejected (one padded batch,
    the model pooling each row's last non-pad token), the loss is the pairs' mean of
    ``-log sigmoid(r_chosen - r_rejected)``."""

    width = len(REWARD_METRICS) + 1

    def loss(self, engine: Engine, batch: dict[str, torch.Tensor], split: str) -> BatchLoss:
        # labels=None: the batch's token labels are not a classifier's targets.
        scores = engine.outputs(batch, labels=None).logits.float().squeeze(-1)
        chosen, rejected = scores.chunk(2)
        pair = losses.bradley_terry(chosen, rejected)
        return BatchLoss(pair.losses.mean(), pair_sums(pair.chosen_rewards, pair.rejected_rewards))

    def metrics(self, sums: torch.Tensor, prefix: str = "") -> dict[str, float]:
        count = float(sums[-1])
        if not count:
            return {}
        return {f"{prefix}{name}": float(sums[i]) / count for i, name in enumerate(REWARD_METRICS)}
