"""The torchrun wrapper ends a failed run with the code of the rank that caused it."""

from __future__ import annotations

from torch.distributed.elastic.multiprocessing.errors import ChildFailedError, ProcessFailure

from bigscale.launch.torchrun import _cause


def _failed(codes: dict[int, int]) -> ChildFailedError:
    failures = {
        rank: ProcessFailure(local_rank=rank, pid=1000 + rank, exitcode=code, error_file="<N/A>")
        for rank, code in codes.items()
    }
    return ChildFailedError("bigscale.train", failures)


def test_the_rank_with_a_bigscale_error_is_the_cause_not_the_ones_that_crashed_after() -> None:
    # Rank 0 refused a checkpoint (exit 2); rank 1 then lost its peer in a collective (exit 1).
    rank, failure = _cause(_failed({1: 1, 0: 2}))
    assert (rank, failure.exitcode) == (0, 2)
    rank, failure = _cause(_failed({0: 1, 3: 3}))  # a divergence on rank 3
    assert (rank, failure.exitcode) == (3, 3)


def test_otherwise_torchruns_first_failure() -> None:
    rank, failure = _cause(_failed({1: -9}))
    assert (rank, failure.exitcode) == (1, -9)


def test_the_watchdog_that_named_a_stuck_rank_is_the_cause() -> None:
    # Rank 0's watchdog named the stopped rank 1 and exited 4; torchrun then killed rank 1.
    rank, failure = _cause(_failed({1: -9, 0: 4}))
    assert (rank, failure.exitcode) == (0, 4)
