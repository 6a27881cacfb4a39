"""The distributed sampler: disjoint shards, shared order, new order per epoch, exact resume."""

from __future__ import annotations

from bigscale.data.sampler import ResumableDistributedSampler


def shards(n: int, world: int, seed: int = 0, epoch: int = 0) -> list[list[int]]:
    out = []
    for rank in range(world):
        s = ResumableDistributedSampler(n, rank=rank, world_size=world, seed=seed)
        s.set_epoch(epoch)
        out.append(list(s))
    return out


def test_ranks_disjoint_equal_and_covering() -> None:
    parts = shards(103, world=4)
    assert [len(p) for p in parts] == [25] * 4
    everything = [i for p in parts for i in p]
    assert len(set(everything)) == 100  # disjoint; 3 samples dropped so every rank has 25
    assert set(everything) <= set(range(103))
    assert everything != sorted(everything)  # shuffled


def test_same_seed_same_order_new_epoch_new_order() -> None:
    assert shards(50, 2, seed=1) == shards(50, 2, seed=1)
    assert shards(50, 2, seed=1) != shards(50, 2, seed=2)
    assert shards(50, 2, seed=1, epoch=0) != shards(50, 2, seed=1, epoch=1)


def test_no_shuffle_is_strided() -> None:
    s = ResumableDistributedSampler(10, rank=1, world_size=3, seed=0, shuffle=False)
    assert list(s) == [1, 4, 7]


def test_resume_mid_epoch_yields_exactly_the_rest() -> None:
    full = ResumableDistributedSampler(40, rank=1, world_size=2, seed=7)
    full.set_epoch(3)
    expected = list(full)

    s = ResumableDistributedSampler(40, rank=1, world_size=2, seed=7)
    s.set_epoch(3)
    it = iter(s)
    head = [next(it) for _ in range(6)]
    state = s.state_dict()
    assert state == {"epoch": 3, "consumed": 6}

    restored = ResumableDistributedSampler(40, rank=1, world_size=2, seed=7)
    restored.load_state_dict(state)
    restored.set_epoch(3)  # the same epoch again keeps the position
    rest = list(restored)
    assert head + rest == expected
    assert restored.state_dict() == {"epoch": 3, "consumed": 20}


def test_iterating_after_a_full_epoch_moves_to_the_next() -> None:
    s = ResumableDistributedSampler(20, rank=0, world_size=2, seed=0)
    first, second = list(s), list(s)
    assert s.epoch == 1 and first != second
    ref = ResumableDistributedSampler(20, rank=0, world_size=2, seed=0)
    ref.set_epoch(1)
    assert second == list(ref)
