"""Reward models (``objective=reward``): the Bradley-Terry loss against TRL's RewardTrainer and
by hand, the one-score head built from a real (tiny) checkpoint, scoring each row at its last
real token however it is padded, LoRA on it, and the config checks."""

from __future__ import annotations

import math
from collections import defaultdict
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch

from bigscale.config.compose import compose_config
from bigscale.config.schema import Precision
from bigscale.config.validate import Hardware, validate
from bigscale.data.collate import model_inputs
from bigscale.data.preference import encode_pair, pair_collate
from bigscale.errors import ConfigError
from bigscale.model.load import is_classifier, load_model
from bigscale.train import losses
from bigscale.train.objectives import RewardObjective
from tests.models import tiny_llama

trl_reward = pytest.importorskip("trl.trainer.reward_trainer")


def _trl_loss(model: Any, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    """TRL's RewardTrainer.compute_loss, the trainer object stood in for by the attributes it
    reads (no margin, no reward centering, one process)."""
    same = SimpleNamespace(gather=lambda t: t, gather_for_metrics=lambda t: t)
    trainer = SimpleNamespace(
        model=SimpleNamespace(training=True),
        args=SimpleNamespace(center_rewards_coefficient=None),
        accelerator=same,
        _total_train_tokens=0,
        _tp_size=1,
        _metrics={"train": defaultdict(list), "eval": defaultdict(list)},
    )
    return trl_reward.RewardTrainer.compute_loss(trainer, model, dict(inputs))


def test_bradley_terry_matches_trl_and_hand_values() -> None:
    g = torch.Generator().manual_seed(0)
    scores = torch.randn(8, 1, generator=g, dtype=torch.float64) * 3
    trl = _trl_loss(lambda **_: SimpleNamespace(logits=scores), {"attention_mask": torch.ones(8)})
    chosen, rejected = scores.squeeze(-1).chunk(2)
    ours = losses.bradley_terry(chosen, rejected)
    torch.testing.assert_close(ours.losses.mean(), trl, atol=1e-6, rtol=0)
    assert torch.equal(ours.chosen_rewards, chosen) and torch.equal(ours.rejected_rewards, rejected)
    # Hand-derived: equal scores -> log 2; a margin of 2 -> log(1 + e^-2); of -2 -> 2 + that.
    pair = losses.bradley_terry(torch.tensor([0.5, 2.0, 0.0]), torch.tensor([0.5, 0.0, 2.0]))
    expected = [math.log(2), math.log1p(math.exp(-2)), 2 + math.log1p(math.exp(-2))]
    torch.testing.assert_close(pair.losses, torch.tensor(expected), atol=1e-6, rtol=0)


class _Direct:
    """What ``RewardObjective`` asks of the engine (``outputs``), on the bare model."""

    device = torch.device("cpu")

    def __init__(self, model: torch.nn.Module) -> None:
        self.model = model

    def outputs(self, batch: dict[str, torch.Tensor], **extra: Any) -> Any:
        return self.model(**{**model_inputs(batch), **extra})


@pytest.fixture
def reward_model(tmp_path: Path, char_tokenizer: Any) -> tuple[torch.nn.Module, Any, Any]:
    source = tmp_path / "tiny"
    tiny_llama(seed=1, vocab_size=len(char_tokenizer)).save_pretrained(source)
    char_tokenizer.save_pretrained(source)
    cfg = compose_config(
        ["experiment=arithmetic", f"model.name_or_path={source}", "model.dtype=float32"]
    )
    model = load_model(cfg.model, Precision.fp32, char_tokenizer, reward=True)
    return model, char_tokenizer, cfg


def test_reward_head_scores_the_last_real_token_and_matches_trl(
    reward_model: tuple[torch.nn.Module, Any, Any],
) -> None:
    model, tok, cfg = reward_model
    assert is_classifier(model) and model.config.num_labels == 1
    assert model.config.pad_token_id == tok.pad_token_id
    assert model.config.architectures == ["LlamaForSequenceClassification"]
    cfg = compose_config(["experiment=arithmetic", "data=arithmetic_pairs"])
    rows = [
        {"prompt": "1+2=", "chosen": "3", "rejected": "3 !? wrong"},
        {"prompt": "12+30=", "chosen": "42", "rejected": "42!"},
    ]
    examples = [{**encode_pair(r, tok, cfg.data, i), "pair_index": i} for i, r in enumerate(rows)]
    batch = pair_collate(examples, tok.pad_token_id)
    model.eval()
    with torch.no_grad():
        out = RewardObjective().loss(_Direct(model), batch, "train")
        trl = _trl_loss(model, {k: batch[k] for k in ("input_ids", "attention_mask")})
        # Each row alone, unpadded: padding must not move the score.
        alone = torch.cat(
            [
                model(input_ids=ids[mask.bool()][None]).logits
                for ids, mask in zip(batch["input_ids"], batch["attention_mask"], strict=True)
            ]
        ).squeeze(-1)
    torch.testing.assert_close(out.loss, trl, atol=1e-6, rtol=0)
    chosen, rejected = alone.double().chunk(2)
    torch.testing.assert_close(out.sums[0], chosen.sum(), atol=1e-5, rtol=0)
    torch.testing.assert_close(out.sums[1], rejected.sum(), atol=1e-5, rtol=0)
    assert out.sums[2] == float((chosen > rejected).sum()) and out.sums[-1] == 2
    metrics = RewardObjective().metrics(out.sums, prefix="eval_")
    assert set(metrics) == {
        "eval_rewards/chosen",
        "eval_rewards/rejected",
        "eval_rewards/accuracy",
        "eval_rewards/margin",
    }


def test_lora_on_a_reward_model_trains_the_score_head_in_full(
    reward_model: tuple[torch.nn.Module, Any, Any],
) -> None:
    from bigscale.model.lora import apply_lora

    model, _, _ = reward_model
    cfg = compose_config(["finetune=lora"])
    peft_model = apply_lora(model, cfg.finetune, seed=0, gradient_checkpointing=False)
    config = peft_model.peft_config["default"]
    assert config.task_type == "SEQ_CLS" and "score" not in config.target_modules
    trainable = {n for n, p in peft_model.named_parameters() if p.requires_grad}
    assert any(n.endswith("score.modules_to_save.default.weight") for n in trainable), trainable
    assert any("lora_A" in n for n in trainable)


def _validate(*overrides: str) -> None:
    validate(compose_config(["experiment=arithmetic", *overrides]), 2, Hardware())


def test_reward_validates_on_pairs_and_refuses_other_data() -> None:
    _validate("objective=reward", "data=arithmetic_pairs")
    with pytest.raises(ConfigError) as err:
        _validate("objective=reward")  # the default job's data: prompt/response sums
    msg = str(err.value)
    for needed in ("data.prompt_field", "data.chosen_field", "data.rejected_field"):
        assert needed in msg, msg
    with pytest.raises(ConfigError, match="model.loss_chunk_tokens=64 chunks the LM head"):
        _validate("objective=reward", "data=arithmetic_pairs", "model.loss_chunk_tokens=64")
