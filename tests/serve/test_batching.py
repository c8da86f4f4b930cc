"""The replica's batcher on its own (no Ray): what a batch holds under load, how long a batch waits, errors."""

from __future__ import annotations

import asyncio
import time

import pytest

from serve.batching import Batcher


class Recorder:
    """A sampler stand-in: records each batch, takes ``seconds`` per batch, fails the items named in ``bad``."""

    def __init__(self, seconds: float = 0.05, bad: set | None = None, crash: bool = False) -> None:
        self.seconds, self.bad, self.crash = seconds, bad or set(), crash
        self.batches: list[list] = []

    async def __call__(self, items: list) -> list:
        self.batches.append(list(items))
        await asyncio.sleep(self.seconds)
        if self.crash:
            raise RuntimeError("the sampler fell over")
        return [ValueError(f"bad item {i}") if i in self.bad else i * 10 for i in items]


def test_under_load_a_batch_takes_everything_that_queued_while_the_previous_one_ran():
    async def main():
        run = Recorder(seconds=0.1)
        batcher = Batcher(run, max_batch_size=8, wait_s=0.01)
        first = asyncio.create_task(batcher(0))
        await asyncio.sleep(0.03)  # the first batch (one item, after its 10 ms wait) is sampling now
        rest = [asyncio.create_task(batcher(i)) for i in range(1, 20)]  # all arrive while it samples
        results = await asyncio.gather(first, *rest)
        return run.batches, results

    batches, results = asyncio.run(main())
    assert results == [i * 10 for i in range(20)]
    # @serve.batch (Ray 2.60) would cut the second batch 10 ms after item 1 arrived, while batch one still
    # samples; here the queue is cut when the sampler is free: full batches, then the rest
    assert [len(b) for b in batches] == [1, 8, 8, 3]
    assert [i for b in batches for i in b] == list(range(20))  # first come, first served


def test_a_lone_request_waits_at_most_wait_s_and_a_full_batch_does_not_wait():
    async def timed(batcher, items):
        started = time.perf_counter()
        await asyncio.gather(*(batcher(i) for i in items))
        return time.perf_counter() - started

    async def main():
        lone = await timed(Batcher(Recorder(seconds=0), max_batch_size=8, wait_s=0.2), [0])
        full = await timed(Batcher(Recorder(seconds=0), max_batch_size=8, wait_s=30.0), range(8))
        return lone, full

    lone, full = asyncio.run(main())
    assert 0.15 <= lone < 2.0
    assert full < 2.0  # a 30 s wait would show: a full batch starts at once


def test_an_item_error_reaches_its_caller_alone_and_a_failed_batch_reaches_all_then_the_loop_goes_on():
    async def main():
        run = Recorder(seconds=0.01, bad={2})
        batcher = Batcher(run, max_batch_size=4, wait_s=0.05)
        mixed = await asyncio.gather(*(batcher(i) for i in range(4)), return_exceptions=True)
        run.crash = True
        crashed = await asyncio.gather(*(batcher(i) for i in range(3)), return_exceptions=True)
        run.crash = False
        after = await batcher(7)
        return mixed, crashed, after

    mixed, crashed, after = asyncio.run(main())
    assert [m if not isinstance(m, Exception) else type(m) for m in mixed] == [0, 10, ValueError, 30]
    assert all(isinstance(c, RuntimeError) for c in crashed)
    assert after == 70


def test_a_caller_that_went_away_takes_no_slot_in_the_batch():
    async def main():
        run = Recorder(seconds=0.1)
        batcher = Batcher(run, max_batch_size=2, wait_s=0.0)
        busy = asyncio.create_task(batcher(0))
        await asyncio.sleep(0.02)
        gone = asyncio.create_task(batcher(1))
        kept = [asyncio.create_task(batcher(i)) for i in (2, 3)]
        await asyncio.sleep(0.01)
        gone.cancel()
        await asyncio.gather(busy, *kept)
        return run.batches

    assert asyncio.run(main()) == [[0], [2, 3]]


def test_max_batch_size_below_one_is_refused():
    with pytest.raises(ValueError, match="max_batch_size"):
        Batcher(Recorder(), max_batch_size=0, wait_s=0.01)
