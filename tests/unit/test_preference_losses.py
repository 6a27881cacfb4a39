"""Each preference loss against TRL's own implementation on the same batch and log-probs
(TRL is a test-only dependency: its loss code is called on tensors, the trainer objects it
lives in stood in for by the few attributes it reads), and at hand-derived points."""

from __future__ import annotations

import math
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from bigscale.data.chat import IGNORE_INDEX
from bigscale.model.chunked_loss import chunked_token_logps
from bigscale.train import losses
from bigscale.train.objectives import sequence_logps

trl_dpo = pytest.importorskip("trl.trainer.dpo_trainer")
trl_cpo = pytest.importorskip("trl.experimental.cpo.cpo_trainer")
trl_orpo = pytest.importorskip("trl.experimental.orpo.orpo_trainer")

PAIRS, LENGTH = 4, 12
F64 = torch.float64  # the comparisons are of formulas, not of rounding


@pytest.fixture
def batch() -> dict[str, torch.Tensor]:
    """Per-token policy log-probs on [chosen; rejected] rows, a completion mask of varied
    lengths, and reference sums that differ from the policy's."""
    g = torch.Generator().manual_seed(0)
    token_logps = -torch.rand(2 * PAIRS, LENGTH - 1, generator=g, dtype=F64) * 3
    mask = torch.zeros(2 * PAIRS, LENGTH, dtype=torch.long)
    for row in range(2 * PAIRS):
        start = 2 + row % 3
        mask[row, start : LENGTH - row % 4] = 1
    token_logps = token_logps * mask[:, 1:]  # TRL's fused head gives 0 off the completion
    return {
        "token_logps": token_logps,
        "mask": mask,
        "ref": -torch.rand(2 * PAIRS, generator=g, dtype=F64) * 20,
    }


def _sums(batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, ...]:
    logps = batch["token_logps"].sum(-1)
    tokens = batch["mask"][:, 1:].sum(-1).to(logps.dtype)
    chosen, rejected = logps.chunk(2)
    n_chosen, n_rejected = tokens.chunk(2)
    ref_chosen, ref_rejected = batch["ref"].chunk(2)
    return chosen, rejected, ref_chosen, ref_rejected, n_chosen, n_rejected


def _trl_dpo_loss(batch: dict[str, torch.Tensor], loss_type: str, beta: float) -> torch.Tensor:
    """TRL's DPOTrainer._compute_loss with precomputed reference log-probs, its model giving
    back our per-token log-probs."""
    n = 2 * PAIRS
    outputs = SimpleNamespace(
        log_probs=batch["token_logps"],
        entropy=torch.zeros(n, LENGTH - 1, dtype=F64),
        mean_logits=torch.zeros(n, LENGTH - 1, dtype=F64),
        is_top1=torch.zeros(n, LENGTH - 1, dtype=torch.bool),
    )
    accelerator = SimpleNamespace(
        device=torch.device("cpu"),
        gather=lambda x: x,
        gather_for_metrics=lambda x: x.reshape(-1),
    )
    trainer = SimpleNamespace(
        model=SimpleNamespace(training=True),
        accelerator=accelerator,
        aux_loss_enabled=False,
        ld_alpha=None,
        precompute_ref_logps=True,
        f_divergence_type="reverse_kl",
        loss_types=[loss_type],
        loss_weights=[1.0],
        beta=beta,
        label_smoothing=0.0,
        use_weighting=False,
        _metrics=defaultdict(lambda: defaultdict(list)),
        _total_train_tokens=0,
        _tp_size=1,
    )
    ref_chosen, ref_rejected = batch["ref"].chunk(2)
    inputs = {
        "input_ids": torch.zeros(n, LENGTH, dtype=torch.long),
        "attention_mask": torch.ones(n, LENGTH, dtype=torch.long),
        "completion_mask": batch["mask"],
        "ref_chosen_logps": ref_chosen,
        "ref_rejected_logps": ref_rejected,
    }
    return trl_dpo.DPOTrainer._compute_loss(
        trainer, lambda **_: outputs, inputs, return_outputs=False
    )


def _cpo(loss_type: str, beta: float, **extra: float) -> SimpleNamespace:
    return SimpleNamespace(
        alpha=0.0,
        loss_type=loss_type,
        beta=beta,
        label_smoothing=extra.get("label_smoothing", 0.0),
        simpo_gamma=extra.get("gamma", 0.0),
        accelerator=SimpleNamespace(device=torch.device("cpu")),
    )


@pytest.mark.parametrize("beta", [0.1, 0.5])
def test_dpo_matches_trl(batch: dict[str, torch.Tensor], beta: float) -> None:
    chosen, rejected, ref_c, ref_r, _, _ = _sums(batch)
    ours = losses.dpo(chosen, rejected, ref_c, ref_r, beta).losses.mean()
    assert ours.item() == pytest.approx(_trl_dpo_loss(batch, "sigmoid", beta).item(), abs=1e-6)


def test_ipo_matches_trl(batch: dict[str, torch.Tensor]) -> None:
    chosen, rejected, ref_c, ref_r, n_c, n_r = _sums(batch)
    ours = losses.ipo(chosen, rejected, ref_c, ref_r, n_c, n_r, 0.1).losses.mean()
    assert ours.item() == pytest.approx(_trl_dpo_loss(batch, "ipo", 0.1).item(), abs=1e-6)


def test_conservative_dpo_matches_trl(batch: dict[str, torch.Tensor]) -> None:
    """TRL's CPO sigmoid loss is the label-smoothed (conservative) DPO loss on whatever
    margin it is given: given the log-ratios, it is cDPO."""
    chosen, rejected, ref_c, ref_r, _, _ = _sums(batch)
    ours = losses.dpo(chosen, rejected, ref_c, ref_r, 0.2, label_smoothing=0.1)
    trl = trl_cpo.CPOTrainer.cpo_loss(
        _cpo("sigmoid", 0.2, label_smoothing=0.1), chosen - ref_c, rejected - ref_r
    )
    torch.testing.assert_close(ours.losses, trl[0], atol=1e-6, rtol=0)
    torch.testing.assert_close(ours.chosen_rewards, trl[1], atol=1e-6, rtol=0)


def test_simpo_matches_trl(batch: dict[str, torch.Tensor]) -> None:
    chosen, rejected, _, _, n_c, n_r = _sums(batch)
    ours = losses.simpo(chosen, rejected, n_c, n_r, beta=2.0, gamma=0.5)
    # TRL's CPOTrainer averages the log-probs per token for SimPO before its loss.
    trl = trl_cpo.CPOTrainer.cpo_loss(_cpo("simpo", 2.0, gamma=0.5), chosen / n_c, rejected / n_r)
    torch.testing.assert_close(ours.losses, trl[0], atol=1e-6, rtol=0)
    torch.testing.assert_close(ours.chosen_rewards, trl[1], atol=1e-6, rtol=0)
    torch.testing.assert_close(ours.rejected_rewards, trl[2], atol=1e-6, rtol=0)


def test_orpo_matches_trl(batch: dict[str, torch.Tensor]) -> None:
    chosen, rejected, _, _, n_c, n_r = _sums(batch)
    ours = losses.orpo(chosen, rejected, n_c, n_r, lambda_=0.1)
    trainer = SimpleNamespace(beta=0.1, accelerator=SimpleNamespace(device=torch.device("cpu")))
    trl = trl_orpo.ORPOTrainer.odds_ratio_loss(trainer, chosen / n_c, rejected / n_r)
    # TRL returns lambda * log sigmoid(log odds) and subtracts its mean from the SFT loss.
    torch.testing.assert_close(ours.losses, -trl[0].double(), atol=1e-6, rtol=0)
    torch.testing.assert_close(ours.chosen_rewards, trl[1].double(), atol=1e-6, rtol=0)


def test_log1mexp_matches_trl() -> None:
    x = -torch.logspace(-8, 2, 50)
    torch.testing.assert_close(losses.log1mexp(x), trl_orpo.log1mexp(x), atol=1e-12, rtol=0)


def test_trivial_points() -> None:
    """Policy == reference: every DPO margin is 0, loss log 2, rewards 0; IPO's loss is then
    (1/(2 beta))^2; SimPO with equal mean log-probs is -log sigmoid(-gamma); ORPO with equal
    mean log-probs is lambda log 2."""
    logps = torch.tensor([-3.0, -7.5, -1.25])
    tokens = torch.tensor([2.0, 5.0, 1.0])
    dpo = losses.dpo(logps, logps - 1, logps, logps - 1, beta=0.3)
    torch.testing.assert_close(dpo.losses, torch.full((3,), math.log(2)))
    assert dpo.chosen_rewards.abs().max() == 0 and dpo.rejected_rewards.abs().max() == 0
    ipo = losses.ipo(logps, logps, logps, logps, tokens, tokens, beta=0.1)
    torch.testing.assert_close(ipo.losses, torch.full((3,), 25.0))
    simpo = losses.simpo(logps, logps, tokens, tokens, beta=2.0, gamma=0.5)
    torch.testing.assert_close(simpo.losses, torch.full((3,), -math.log(1 / (1 + math.exp(0.5)))))
    orpo = losses.orpo(logps, logps, tokens, tokens, lambda_=0.1)
    torch.testing.assert_close(orpo.losses, torch.full((3,), 0.1 * math.log(2)))
    # A clear preference: the DPO loss falls below log 2 as the margin grows.
    assert losses.dpo(logps + 1, logps, logps, logps, 0.1).losses.max() < math.log(2)


def test_sequence_logps_match_trl_full_and_chunked() -> None:
    """Our summed completion log-probs, from full logits and from the chunked head, equal
    TRL's ``get_batch_logps`` on the same logits and labels."""
    g = torch.Generator().manual_seed(1)
    hidden = torch.randn(2 * PAIRS, LENGTH, 16, generator=g, dtype=F64)
    head = nn.Linear(16, 40, bias=False, dtype=F64)
    labels = torch.randint(0, 40, (2 * PAIRS, LENGTH), generator=g)
    labels[:, :3] = IGNORE_INDEX
    labels[0, -4:] = IGNORE_INDEX  # padding
    logits = head(hidden)
    expected = trl_orpo.ORPOTrainer.get_batch_logps(logits, labels)
    engine = SimpleNamespace(
        device=torch.device("cpu"), outputs=lambda batch, **_: SimpleNamespace(logits=logits)
    )
    full, tokens = sequence_logps(engine, {"labels": labels}, chunk_tokens=0)
    # The logits are taken in fp32 (as transformers' loss does): fp32 rounding of ~10 terms.
    torch.testing.assert_close(full, expected, atol=1e-5, rtol=0, check_dtype=False)
    assert tokens.tolist() == (labels[:, 1:] != IGNORE_INDEX).sum(-1).tolist()
    chunked = chunked_token_logps(hidden, labels, head, chunk_tokens=7).sum(-1)
    torch.testing.assert_close(chunked, expected, atol=1e-5, rtol=0, check_dtype=False)
