"""The parallel layout: rank arithmetic, the rules checked before any rank starts, the sequence
slices every rank of a group cuts from the same batch, and the document mask that keeps packed
documents apart once attention gathers the whole sequence."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import GPT2Config

from bigscale.checkpoint.compat import changes, fingerprint
from bigscale.cli import main as cli_main
from bigscale.config.compose import compose_config
from bigscale.config.derived import derive
from bigscale.config.schema import Precision, TinyModelSpec
from bigscale.config.validate import Hardware, validate
from bigscale.data.shard import LOSS_TOKENS, SHIFT_LABELS, shard_batch
from bigscale.data.tokenize import IGNORE_INDEX
from bigscale.dist.engine import build_ds_config
from bigscale.dist.layout import ParallelLayout
from bigscale.errors import ConfigError
from bigscale.model.tiny import create_tiny_model


def test_layout_groups_are_consecutive_ranks() -> None:
    layout = ParallelLayout(world_size=8, sp=2)
    assert layout.dp == 4 and layout.loss_divisor == 4
    assert [layout.dp_rank(r) for r in range(8)] == [0, 0, 1, 1, 2, 2, 3, 3]
    assert [layout.sp_rank(r) for r in range(8)] == [0, 1] * 4
    assert layout.sp_groups() == [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert [r for r in range(8) if layout.counts_data(r)] == [0, 2, 4, 6]
    tp = ParallelLayout(world_size=4, tp=2)
    assert tp.dp == 2 and tp.loss_divisor == 4 and tp.replica_ranks(3) == [2, 3]
    assert "2 data-parallel x 2 sequence-parallel = 4 ranks" in ParallelLayout(4, sp=2).describe()


def test_zero3_model_init_is_told_the_sequence_parallel_ranks() -> None:
    # transformers builds a ZeRO-3 model under zero.Init, which reads DeepSpeed's config without
    # the sequence-parallel groups: the size in the config is how it divides the world.
    cfg = compose_config(["strategy=zero3", "strategy.sequence_parallel_size=2"])
    ds = build_ds_config(cfg, 4, Precision.fp32)
    assert ds["sequence_parallel_size"] == 2
    assert ds["train_batch_size"] == cfg.trainer.global_batch(4 // ds["sequence_parallel_size"])
    assert "sequence_parallel_size" not in build_ds_config(compose_config([]), 4, Precision.fp32)


def test_global_batch_counts_data_parallel_ranks_only() -> None:
    cfg = compose_config(
        ["strategy=zero2", "strategy.sequence_parallel_size=2", "trainer.micro_batch_size=4"]
    )
    assert derive(cfg, 4, None).global_batch == 4 * cfg.trainer.grad_accum * 2


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("models") / "tiny"
    create_tiny_model(path, TinyModelSpec(num_heads=4))
    return path


def check(overrides: list[str], world_size: int) -> None:
    validate(
        compose_config(["experiment=arithmetic", "strategy=zero2", *overrides]),
        world_size,
        Hardware(),
    )


@pytest.mark.parametrize(
    ("overrides", "world", "fragments"),
    [
        (["strategy.sequence_parallel_size=2"], 3, ["does not divide the 3 ranks"]),
        (["strategy.tensor_parallel_size=2"], 3, ["tensor_parallel_size=2 does not divide"]),
        (["strategy.sequence_parallel_size=3"], 3, ["4 query heads", "4 key-value heads"]),
        (
            ["strategy.sequence_parallel_size=2", "data.packing=true", "data.max_length=33"],
            2,
            ["data.max_length=33", "multiple of 2", "data.max_length=34"],
        ),
        (["strategy=ddp", "strategy.sequence_parallel_size=2"], 2, ["ZeRO stage 1, 2 or 3"]),
        (
            ["strategy.sequence_parallel_size=2", "model.attn_implementation=eager"],
            2,
            ["model.attn_implementation=eager"],
        ),
        (["strategy=zero3", "strategy.tensor_parallel_size=2"], 2, ["ZeRO stages 0-2"]),
        (
            ["strategy.sequence_parallel_size=2", "strategy.tensor_parallel_size=2"],
            4,
            ["set one of them to 1"],
        ),
        (["strategy.sequence_parallel_size=0"], 2, ["at least 1"]),
        (  # 2 nodes of 3 ranks: the group of ranks 2 and 3 would span them
            ["strategy.sequence_parallel_size=2", "launcher.nproc_per_node=3"],
            6,
            ["launcher.nproc_per_node=3 ranks per node would split", "multiple of 2"],
        ),
        (
            [
                "launcher=slurm",
                "launcher.nodes=2",
                "launcher.gpus_per_node=2",
                "strategy.tensor_parallel_size=4",
            ],
            4,
            ["launcher.gpus_per_node=2 ranks per node", "tensor_parallel_size=4 (4 consecutive"],
        ),
        (["objective=dpo", "strategy.sequence_parallel_size=2"], 2, ["objective=dpo"]),
    ],
)
def test_bad_layouts_are_refused_with_the_fix(
    tiny: Path, overrides: list[str], world: int, fragments: list[str]
) -> None:
    with pytest.raises(ConfigError) as err:
        check([f"model.name_or_path={tiny}", *overrides], world)
    for fragment in fragments:
        assert fragment in str(err.value)


@pytest.fixture(scope="module")
def gpt2(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A GPT-2 config (no weights): DeepSpeed's AutoTP refuses the architecture."""
    path = tmp_path_factory.mktemp("models") / "gpt2"
    GPT2Config(n_layer=1, n_embd=32, n_head=4, vocab_size=101, n_positions=64).save_pretrained(path)
    return path


def test_tensor_parallel_refuses_a_model_autotp_cannot_shard(gpt2: Path) -> None:
    with pytest.raises(ConfigError) as err:
        check([f"model.name_or_path={gpt2}", "strategy.tensor_parallel_size=2"], 2)
    message = str(err.value)
    assert f"strategy.tensor_parallel_size=2 cannot shard {gpt2} (model_type gpt2)" in message
    assert "GPT2LMHeadModel has no tensor-parallel plan" in message
    assert "e.g. llama" in message and "strategy.tensor_parallel_size=1" in message
    assert "\n" not in message
    # The same model without tensor parallelism is fine.
    check([f"model.name_or_path={gpt2}"], 2)


def test_cli_refuses_autotp_on_gpt2_in_one_line(
    gpt2: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    overrides = ["experiment=arithmetic", "strategy=zero2", f"model.name_or_path={gpt2}"]
    tp = ["strategy.tensor_parallel_size=2", "launcher.nproc_per_node=2"]
    assert cli_main(["plan", *overrides, *tp, "run_dir=r"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: strategy.tensor_parallel_size=2"), err
    assert "model_type gpt2" in err[0]


def test_good_layouts_pass(tiny: Path) -> None:
    check([f"model.name_or_path={tiny}", "strategy.sequence_parallel_size=2"], 4)
    check([f"model.name_or_path={tiny}", "strategy.sequence_parallel_size=4"], 4)
    # The export puts the tensor slices together; the generation eval runs per tensor group.
    tp = ["strategy.tensor_parallel_size=2", "eval.exact_match=true", "export.at_end=true"]
    check([f"model.name_or_path={tiny}", *tp], 2)


def test_resume_may_change_the_split_sizes_while_the_global_batch_stays() -> None:
    base = compose_config(["strategy=zero2"])
    split = compose_config(["strategy=zero2", "strategy.sequence_parallel_size=2"])
    sliced = compose_config(["strategy=zero2", "strategy.tensor_parallel_size=2"])
    assert changes(fingerprint(base, 2), fingerprint(base, 2)) == []
    # Same global batch: 2 ranks of plain data parallel, or 4 ranks as 2 x SP 2; one rank, or
    # 2 ranks splitting its sequences, or its weights; split sequences, then split weights.
    assert changes(fingerprint(base, 2), fingerprint(split, 4)) == []
    assert changes(fingerprint(split, 2), fingerprint(base, 1)) == []
    assert changes(fingerprint(sliced, 2), fingerprint(base, 1)) == []
    assert changes(fingerprint(split, 2), fingerprint(sliced, 2)) == []
    # 2 ranks no longer splitting sequences are 2 replicas: twice the global batch.
    found = changes(fingerprint(split, 2), fingerprint(base, 2))
    assert len(found) == 1 and found[0].startswith("global batch"), found
    # ZeRO stage 0 writes no partitioned optimizer files to build a universal checkpoint from.
    ddp = compose_config(["strategy=ddp"])
    ddp_sliced = compose_config(["strategy=ddp", "strategy.tensor_parallel_size=2"])
    found = changes(fingerprint(ddp_sliced, 2), fingerprint(ddp, 1))
    assert len(found) == 1 and "tensor_parallel_size: 2 in the checkpoint, 1 now" in found[0]
    assert "strategy=zero1 or zero2" in found[0] and "tensor_parallel_size=2;" in found[0]
    assert "strategy.sequence_parallel_size, the number of data-parallel ranks" in found[0]


def test_slices_shift_labels_before_the_cut_and_pad_to_a_multiple() -> None:
    ids = torch.tensor([[10, 11, 12, 13, 14], [20, 21, 22, 23, 24]])
    labels = torch.tensor([[IGNORE_INDEX, 11, 12, 13, 14], [20, 21, 22, IGNORE_INDEX, 24]])
    batch = {"input_ids": ids, "labels": labels, "num_tokens": torch.tensor(10)}
    parts = [shard_batch(batch, r, 2) for r in range(2)]
    assert [p["input_ids"].shape[1] for p in parts] == [3, 3]  # 5 padded to 6
    assert torch.equal(torch.cat([p["input_ids"] for p in parts], 1)[:, :5], ids)
    shifted = torch.cat([p[SHIFT_LABELS] for p in parts], 1)
    # Rank 0's last position (token 12) predicts 13, which lives on rank 1.
    assert shifted[0].tolist() == [11, 12, 13, 14, IGNORE_INDEX, IGNORE_INDEX]
    assert shifted[1].tolist() == [21, 22, IGNORE_INDEX, 24, IGNORE_INDEX, IGNORE_INDEX]
    assert all(int(p[LOSS_TOKENS]) == 7 for p in parts)  # the whole batch's, on every rank
    positions = torch.cat([p["position_ids"] for p in parts], 1)
    assert positions[0].tolist() == [0, 1, 2, 3, 4, 5]


def test_document_mask_keeps_packed_documents_apart() -> None:
    # Imported here: the module pulls in DeepSpeed.
    from bigscale.dist.sequence_parallel import document_mask

    positions = torch.tensor([[0, 1, 2, 0, 1, 0]])
    mask = document_mask(positions)[0, 0]
    assert mask[4].tolist() == [False, False, False, True, True, False]
    assert mask[2].tolist() == [True, True, True, False, False, False]
    assert mask[5].tolist() == [False] * 5 + [True]
    assert document_mask(torch.arange(6)[None]) is None  # one document: plain causal


def test_memory_plan_divides_activations_by_sequence_and_weights_by_tensor_ranks() -> None:
    from dataclasses import replace

    from bigscale.config.schema import Precision, StrategyConfig
    from bigscale.launch.memory import ModelShape, Workload, estimate

    shape = ModelShape.from_config(
        __import__("transformers").LlamaConfig(
            hidden_size=2048, num_hidden_layers=16, num_attention_heads=32, vocab_size=32000
        ),
        params=1_000_000_000,
    )
    work = Workload(micro_batch=1, seq_len=32768)
    zero2 = StrategyConfig(name="zero2", zero_stage=2)
    base = estimate(shape, zero2, Precision.bf16, 8, work)
    sp = estimate(shape, replace(zero2, sequence_parallel_size=4), Precision.bf16, 8, work)
    assert sp.activations_gib == pytest.approx(base.activations_gib / 4)
    assert sp.weights_gib == base.weights_gib and sp.optimizer_gib == base.optimizer_gib
    tp = estimate(shape, replace(zero2, tensor_parallel_size=2), Precision.bf16, 8, work)
    assert tp.weights_gib == pytest.approx(base.weights_gib / 2)
    # ZeRO-2 now partitions the optimizer over 4 data-parallel ranks, each holding half.
    assert tp.optimizer_gib == pytest.approx(base.optimizer_gib * 8 / 4 / 2)
