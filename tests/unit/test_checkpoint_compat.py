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


def test_new_contents_under_the_same_path_are_a_change_old_checkpoints_lack_the_key() -> None:
    from bigscale.checkpoint.compat import CONTENTS

    saved = {"data.path": "train.jsonl", f"{CONTENTS}data.path": "a" * 64}
    now = {"data.path": "train.jsonl", f"{CONTENTS}data.path": "b" * 64}
    assert changes(saved, now) == [
        "the contents of data.path changed since the checkpoint was written (content key "
        "aaaaaaaaaaaa then, bbbbbbbbbbbb now)"
    ]
    assert changes({"data.path": "train.jsonl"}, now) == []  # written before the key existed


def test_data_contents_follow_the_files_not_the_path(tmp_path) -> None:
    from bigscale.checkpoint.compat import data_contents
    from bigscale.config.schema import DataConfig, MixtureSource

    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    a.write_text('{"text": "one"}\n')
    b.write_text('{"text": "two"}\n')
    cfg = DataConfig(path=str(a))
    first = data_contents(cfg, {})
    assert list(first) == ["data.path"]
    a.write_text('{"text": "one!"}\n')
    assert data_contents(cfg, {}) != first
    assert data_contents(cfg, {"data.path": "from the pipeline"}) == {
        "data.path": "from the pipeline"
    }
    mixed = DataConfig(path="mix", mixture=[MixtureSource(path=str(a)), MixtureSource(path=str(b))])
    assert list(data_contents(mixed, {})) == ["data.mixture[0].path", "data.mixture[1].path"]
