"""Preference data: pairs tokenized with the loss on the completion only (strings and
conversations), each pre-flight refusal named by file:line, and the objective/data
cross-checks of the config."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bigscale.config.compose import compose_config
from bigscale.config.schema import DataConfig, DataStyle
from bigscale.config.validate import Hardware, validate
from bigscale.data.chat import IGNORE_INDEX
from bigscale.data.preference import encode_pair, pair_collate
from bigscale.data.sources import preflight
from bigscale.errors import ConfigError, DataError


def _cfg(path: Path) -> DataConfig:
    return DataConfig(path=str(path), style=DataStyle.preference)


def _write(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _completion(ids: list[int], labels: list[int], tokenizer) -> str:
    return tokenizer.decode([t for t, y in zip(ids, labels, strict=True) if y != IGNORE_INDEX])


def test_string_pair_has_loss_on_completion_and_eos_only(char_tokenizer) -> None:
    row = {"prompt": "12+3=", "chosen": "15", "rejected": "16"}
    enc = encode_pair(row, char_tokenizer, DataConfig(path="x", style=DataStyle.preference))
    assert _completion(enc["input_ids"], enc["labels"], char_tokenizer) == "15</s>"
    assert _completion(enc["rejected_input_ids"], enc["rejected_labels"], char_tokenizer) == (
        "16</s>"
    )
    assert enc["input_ids"][:6] == enc["rejected_input_ids"][:6]  # the shared prompt


def test_conversation_pair_has_loss_on_the_last_assistant_turn_only(char_tokenizer) -> None:
    """As ultrafeedback_binarized: a string prompt and conversations sharing the user turn;
    an earlier assistant turn is prompt, not completion."""
    turns = [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "hello"},
        {"role": "user", "content": "2+2?"},
    ]
    row = {
        "prompt": "2+2?",
        "chosen": [*turns, {"role": "assistant", "content": "4"}],
        "rejected": [*turns, {"role": "assistant", "content": "5"}],
    }
    enc = encode_pair(row, char_tokenizer, DataConfig(path="x", style=DataStyle.preference))
    assert _completion(enc["input_ids"], enc["labels"], char_tokenizer) == "4<|im_end|>\n"
    assert _completion(enc["rejected_input_ids"], enc["rejected_labels"], char_tokenizer) == (
        "5<|im_end|>\n"
    )
    # Only the completion given, the prompt in its own field: the user turn is built from it.
    short = {
        "prompt": "2+2?",
        "chosen": [{"role": "assistant", "content": "4"}],
        "rejected": [{"role": "assistant", "content": "5"}],
    }
    enc = encode_pair(short, char_tokenizer, DataConfig(path="x", style=DataStyle.preference))
    assert "2+2?" in char_tokenizer.decode(enc["input_ids"])


def test_pair_collate_puts_chosen_then_rejected_in_one_batch() -> None:
    examples = [
        {
            "input_ids": [1, 2, 3],
            "labels": [-100, 2, 3],
            "rejected_input_ids": [1, 2, 4, 5],
            "rejected_labels": [-100, 2, 4, 5],
            "pair_index": 7,
        },
        {
            "input_ids": [1, 6],
            "labels": [-100, 6],
            "rejected_input_ids": [1, 7],
            "rejected_labels": [-100, 7],
            "pair_index": 2,
        },
    ]
    batch = pair_collate(examples, pad_id=0)
    assert batch["input_ids"].tolist() == [[1, 2, 3, 0], [1, 6, 0, 0], [1, 2, 4, 5], [1, 7, 0, 0]]
    assert batch["labels"][0].tolist() == [-100, 2, 3, -100]
    assert batch["pair_index"].tolist() == [7, 2]
    assert int(batch["num_tokens"]) == 11


GOOD = {"prompt": "1+1=", "chosen": "2", "rejected": "3"}
USER = {"role": "user", "content": "q"}


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        ({"prompt": "1+1=", "chosen": "2"}, "data.rejected_field='rejected' is missing"),
        ({"prompt": "1+1=", "chosen": "2", "rejected": "2"}, "identical"),
        ({"prompt": "1+1=", "chosen": "  ", "rejected": "3"}, "empty completion"),
        (
            {
                "chosen": [USER, {"role": "assistant", "content": "a"}],
                "rejected": [
                    {"role": "user", "content": "other"},
                    {"role": "assistant", "content": "b"},
                ],
            },
            "different prompt turns",
        ),
        (
            {
                "prompt": "q",
                "chosen": "a",
                "rejected": [USER, {"role": "assistant", "content": "b"}],
            },
            "must both be strings or both conversations",
        ),
    ],
)
def test_preflight_refuses_bad_pairs_with_file_and_line(
    tmp_path: Path, bad: dict, message: str
) -> None:
    path = _write(tmp_path / "pairs.jsonl", [GOOD, GOOD, bad])
    with pytest.raises(DataError) as err:
        preflight(_cfg(path))
    assert f"{path}:3" in str(err.value)
    assert message in str(err.value)


def test_preflight_accepts_good_pairs(tmp_path: Path) -> None:
    chat = {
        "prompt": "q",
        "chosen": [USER, {"role": "assistant", "content": "a"}],
        "rejected": [USER, {"role": "assistant", "content": "b"}],
    }
    preflight(_cfg(_write(tmp_path / "strings.jsonl", [GOOD, GOOD])))
    preflight(_cfg(_write(tmp_path / "chat.jsonl", [chat, chat])))


def _validate(*overrides: str) -> None:
    validate(compose_config(["experiment=arithmetic", *overrides]), 2, Hardware())


def test_preference_objective_on_sft_data_names_the_fields_it_needs() -> None:
    with pytest.raises(ConfigError) as err:
        _validate("objective=dpo")  # the default job's data: prompt/response sums
    msg = str(err.value)
    for needed in ("data.prompt_field", "data.chosen_field", "data.rejected_field"):
        assert needed in msg
    assert "data=preference_files" in msg


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["objective=sft"], "data.style=preference holds pairs"),
        (["objective=dpo", "objective.beta=0"], "objective.beta=0 must be positive"),
        (["objective=dpo", "objective.label_smoothing=0.5"], "must be in [0, 0.5)"),
        (["objective=simpo", "objective.label_smoothing=0.1"], "conservative DPO's"),
        (["objective=reward", "data.packing=true"], "not supported with objective=reward"),
        (["objective=dpo", "data.streaming=true"], "data.streaming is not supported"),
        (["objective=reward", "model.loss_chunk_tokens=64"], "model.loss_chunk_tokens=64"),
    ],
)
def test_objective_cross_checks(overrides: list[str], message: str) -> None:
    with pytest.raises(ConfigError) as err:
        _validate("data=arithmetic_pairs", *overrides)
    assert message in str(err.value)


@pytest.mark.parametrize("name", ["dpo", "ipo", "simpo", "orpo"])
def test_log_prob_objectives_accept_packing(name: str) -> None:
    _validate("data=arithmetic_pairs", f"objective={name}", "data.packing=true")


@pytest.mark.parametrize("name", ["sft", "dpo", "ipo", "simpo", "orpo", "reward"])
def test_objective_presets_compose(name: str) -> None:
    assert compose_config([f"objective={name}"]).objective.name.value == name


def test_demo_and_hub_presets_validate() -> None:
    _validate("experiment=dpo_arithmetic")
    cfg = compose_config(["experiment=arithmetic", "objective=dpo", "data=ultrafeedback"])
    assert cfg.data.split == "train_prefs" and cfg.data.style is DataStyle.preference


def test_early_stopping_can_watch_held_out_preference_accuracy() -> None:
    _validate("experiment=dpo_arithmetic", "eval.early_stopping.metric=eval_rewards/accuracy")
    from bigscale.train.early_stop import EarlyStopper

    cfg = compose_config(["eval.early_stopping.metric=eval_rewards/accuracy"])
    stopper = EarlyStopper(cfg.eval.early_stopping)  # mode auto: higher accuracy is better
    assert not stopper.update(10, {"eval_rewards/accuracy": 0.6})
    assert stopper.best == 0.6
    stopper.update(20, {"eval_rewards/accuracy": 0.9})
    assert stopper.best == 0.9
