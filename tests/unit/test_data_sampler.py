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


def test_start_continues_on_another_world_size_with_the_next_sample() -> None:
    """What 2 ranks took of epoch 1, then 3 ranks (and then 1) from ``start``: together the
    epoch's order, each sample once, none skipped but the tail that evens out the last share."""
    n, seed, epoch = 101, 5, 1
    ref = ResumableDistributedSampler(n, rank=0, world_size=1, seed=seed)
    ref.set_epoch(epoch)
    order = list(ref)
    assert len(order) == n

    def take(world: int, start: int, per_rank: int | None) -> list[list[int]]:
        out = []
        for rank in range(world):
            s = ResumableDistributedSampler(n, rank=rank, world_size=world, seed=seed)
            s.load_state_dict({"epoch": epoch, "start": start, "consumed": 0})
            it = iter(s)
            out.append([next(it) for _ in range(per_rank)] if per_rank else list(it))
        return out

    two = take(2, 0, 12)  # 24 samples
    three = take(3, 24, 10)  # 30 more
    one = take(1, 54, None)  # the rest
    seen = [i for part in two + three + one for i in part]
    assert sorted(seen[:24]) == sorted(order[:24])
    assert sorted(seen[24:54]) == sorted(order[24:54])
    assert seen[54:] == order[54:]
    assert len(seen) == len(set(seen)) == n
    # Three ranks from 24 share out 77 samples: 25 each, the last two dropped.
    assert len(take(3, 24, None)[2]) == 25


def test_start_zero_is_the_plain_sampler() -> None:
    s = ResumableDistributedSampler(40, rank=1, world_size=2, seed=7)
    s.load_state_dict({"epoch": 3, "start": 0, "consumed": 4})
    t = ResumableDistributedSampler(40, rank=1, world_size=2, seed=7)
    t.load_state_dict({"epoch": 3, "start": 8, "consumed": 0})
    assert list(s) == list(t)
    assert s.state_dict() == {"epoch": 3, "consumed": 20}
    assert t.state_dict() == {"epoch": 3, "start": 8, "consumed": 16}
