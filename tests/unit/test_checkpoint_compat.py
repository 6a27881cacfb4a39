"""What a resume may change: the split of the global batch, not the global batch."""

from __future__ import annotations

from bigscale.checkpoint.compat import GLOBAL_BATCH, changes


def layout(micro: int, accum: int, ranks: int, seed: int = 42) -> dict[str, int]:
    return {
        GLOBAL_BATCH: micro * accum * ranks,
        "trainer.micro_batch_size": micro,
        "trainer.grad_accum": accum,
        "ranks": ranks,
        "trainer.seed": seed,
    }


def test_same_global_batch_on_other_ranks_is_allowed() -> None:
    saved = layout(8, 2, 2)
    assert changes(saved, layout(16, 2, 1)) == []
    assert changes(saved, layout(8, 4, 1)) == []
    assert changes(saved, layout(4, 1, 8)) == []


def test_global_batch_change_is_refused_with_its_factors() -> None:
    found = changes(layout(8, 2, 2), layout(8, 2, 1))
    assert found == [
        f"{GLOBAL_BATCH}: 32 in the checkpoint, 16 now",
        "ranks: 2 in the checkpoint, 1 now",
    ]
    assert changes(layout(8, 2, 2), layout(8, 2, 2, seed=1)) == [
        "trainer.seed: 42 in the checkpoint, 1 now"
    ]


def test_keys_the_checkpoint_lacks_are_not_compared() -> None:
    saved = layout(8, 2, 2)
    del saved["ranks"]  # written before the rank count was part of the fingerprint
    assert changes(saved, layout(16, 2, 1)) == []
