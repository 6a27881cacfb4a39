"""Derived values (global batch, steps from trainer.epochs) come from one place that the plan,
validation, the DeepSpeed config, the resume fingerprint and the ranks all ask, and are never
written back into the config."""

from __future__ import annotations

import pytest

from bigscale.checkpoint.compat import GLOBAL_BATCH, fingerprint
from bigscale.config.compose import compose_config
from bigscale.config.derived import DataStats, derive, epoch_steps
from bigscale.config.schema import Precision
from bigscale.config.validate import Hardware, validate
from bigscale.dist.engine import build_ds_config
from bigscale.errors import ConfigError, DataError
from bigscale.launch.memory import Workload


def test_epochs_count_micro_batches_per_rank_as_the_loader_does() -> None:
    # 10 rows, 1 rank, micro batches of 1, 2 per step: 5 steps.
    assert epoch_steps(1.0, 10, 1, 1, 2) == (5, 10, 10)
    # 2.5 passes over 10 micro batches, 4 per step: ceil(25 / 4).
    assert epoch_steps(2.5, 10, 1, 1, 4)[0] == 7
    # 150 rows on 4 ranks: 37 each (the tail of 2 is dropped), in 5 micro batches of 8.
    assert epoch_steps(2.0, 150, 4, 8, 1) == (10, 37, 5)
    with pytest.raises(
        DataError,
        match=r"training split has 3 row\(s\) after tokenizing.*fewer than the 4 data-parallel",
    ):
        epoch_steps(1.0, 3, 4, 8, 1)


def test_derived_steps_leave_the_config_alone_and_say_where_they_come_from() -> None:
    epochs = ["trainer.epochs=2", "trainer.micro_batch_size=8", "optim.warmup_steps=0"]
    cfg = compose_config([*epochs, "trainer.max_steps=7"])
    shape = derive(cfg, 2, DataStats(rows=150, longest=40, packed=True))
    assert shape.max_steps == 20 and shape.global_batch == 16
    assert shape.steps_text() == (
        "20 (from trainer.epochs=2: 150 packed rows / 2 ranks = 75 per rank = 10 micro batches "
        "of 8, 1 per step)"
    )
    assert cfg.trainer.max_steps == 7  # not overwritten
    plain = derive(compose_config(["trainer.max_steps=7"]), 2, None)
    assert plain.steps_text() == "7 (trainer.max_steps)"


def test_warmup_is_checked_against_the_derived_steps() -> None:
    epochs = ["experiment=arithmetic", "trainer.epochs=1", "trainer.micro_batch_size=8"]
    cfg = compose_config([*epochs, "trainer.max_steps=1000"])
    validate(cfg, 2, Hardware())  # trainer.max_steps is not what runs: nothing to check yet
    with pytest.raises(ConfigError, match=r"makes 10 optimizer steps .* \(optim.warmup_steps=50\)"):
        derive(cfg, 2, DataStats(rows=160, longest=16, packed=False))
    short = compose_config(["experiment=arithmetic", "trainer.max_steps=50"])
    with pytest.raises(ConfigError, match="optim.warmup_steps=50 must be in"):
        validate(short, 2, Hardware())


def test_warmup_ratio_scales_with_the_run_and_drives_the_schedule() -> None:
    from bigscale.dist.engine import lr_lambda

    base = ["experiment=none", "model=tiny", "data=arithmetic", "optim.warmup_ratio=0.1"]
    cfg = compose_config([*base, "trainer.max_steps=25"])
    validate(cfg, 2, Hardware())
    shape = derive(cfg, 2, None)
    assert shape.warmup_steps == 3  # ceil(2.5)
    factor = lr_lambda(cfg.optim, shape.max_steps)
    assert [factor(s) for s in range(3)] == pytest.approx([1 / 3, 2 / 3, 1.0])
    epochs = compose_config([*base, "trainer.epochs=1", "trainer.micro_batch_size=8"])
    assert derive(epochs, 2, DataStats(rows=160, longest=16, packed=False)).warmup_steps == 1
    both = compose_config([*base, "optim.warmup_steps=5"])
    with pytest.raises(ConfigError, match=r"optim.warmup_steps=5 and optim.warmup_ratio=0.1"):
        validate(both, 2, Hardware())
    with pytest.raises(ConfigError, match=r"optim.warmup_ratio=1 must be in \[0, 1\)"):
        validate(compose_config([*base[:-1], "optim.warmup_ratio=1"]), 2, Hardware())


def test_one_global_batch_for_validation_deepspeed_and_the_fingerprint() -> None:
    cfg = compose_config(["trainer.micro_batch_size=3", "trainer.grad_accum=5"])
    assert cfg.trainer.global_batch(4) == 60
    assert derive(cfg, 4, None).global_batch == 60
    assert build_ds_config(cfg, 4, Precision.fp32)["train_batch_size"] == 60
    assert fingerprint(cfg, 4)[GLOBAL_BATCH] == 60
    checked = ["trainer.micro_batch_size=3", "trainer.grad_accum=5"]
    validate(compose_config([*checked, "trainer.global_batch_size=60"]), 4, Hardware())
    with pytest.raises(ConfigError, match="= 60"):
        validate(compose_config([*checked, "trainer.global_batch_size=59"]), 4, Hardware())


@pytest.mark.parametrize(
    ("stats", "seq_len", "source"),
    [
        (None, 512, "data.max_length"),
        (DataStats(rows=10, longest=37, packed=False), 37, "longest tokenized example"),
        (DataStats(rows=10, longest=500, packed=True), 512, "data.max_length"),
    ],
    ids=["unknown", "padded", "packed"],
)
def test_activations_are_sized_from_the_real_lengths_when_known(
    stats: DataStats | None, seq_len: int, source: str
) -> None:
    work = Workload.from_config(compose_config(["data.max_length=512"]), stats)
    assert (work.seq_len, work.seq_from) == (seq_len, source)


def test_data_stats_read_the_tokenized_rows() -> None:
    import datasets

    ds = datasets.Dataset.from_dict({"input_ids": [[1, 2, 3], [4] * 9, [5]]})
    assert DataStats.of(ds, packed=False) == DataStats(rows=3, longest=9, packed=False)
