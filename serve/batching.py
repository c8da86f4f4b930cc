"""Request batching for the model replica: a batch starts when the sampler is free, with what queued meanwhile.

Why not ``@serve.batch``: since it gained ``max_concurrent_batches`` (ray-project/ray#53096; Ray 2.60 here),
its batch loop does not wait for a batch to finish before it forms the next one. It takes the first queued
request, waits ``batch_wait_timeout_s`` for company, and parks the batch at its concurrency semaphore. While one
batch samples, the next ones are cut from whatever arrived within that window, so a busy replica runs small
batches: measured with ``bench/serve.py`` (2 CPU cores, 32 clients in flight, ``max_batch_size`` 8, 10 ms
wait), a mean of 2.9 to 3.2 images per sampler call.

``Batcher`` cuts a batch only when the previous one has returned: a batch holds everything that queued while
the sampler was busy (up to ``max_batch_size``), and it waits for company (``wait_s`` from its first request's
arrival) only while it is not full. Under load the first request has waited longer than ``wait_s`` already, so
a batch starts as soon as the sampler is free; a lone request waits ``wait_s`` at most.
"""

from __future__ import annotations

import asyncio
import collections
import logging
from collections.abc import Awaitable, Callable
from typing import Any

logger = logging.getLogger("ray.serve")


class Batcher:
    """``await batcher(item)``: ``item``'s result from ``run(batch)``, a list with one result or exception per item
    (an exception is raised to that item's caller alone). One batch runs at a time per ``Batcher``."""

    def __init__(
        self, run: Callable[[list], Awaitable[list]], max_batch_size: int, wait_s: float, name: str = "batch"
    ) -> None:
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size={max_batch_size}: must be at least 1")
        self.run = run
        self.max_batch_size = max_batch_size
        self.wait_s = max(0.0, float(wait_s))
        self.name = name
        self._pending: collections.deque[tuple[Any, asyncio.Future, float]] = collections.deque()
        self._arrived = asyncio.Event()
        self._task: asyncio.Task | None = None

    async def __call__(self, item: Any) -> Any:
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        self._pending.append((item, future, loop.time()))
        self._arrived.set()
        if self._task is None or self._task.done():
            self._task = loop.create_task(self._loop(), name=f"faceforge-{self.name}")
        return await future

    async def _next_batch(self) -> list[tuple[Any, asyncio.Future, float]]:
        loop = asyncio.get_running_loop()
        while not self._pending:
            self._arrived.clear()
            await self._arrived.wait()
        deadline = self._pending[0][2] + self.wait_s
        while len(self._pending) < self.max_batch_size and (left := deadline - loop.time()) > 0:
            self._arrived.clear()
            try:
                await asyncio.wait_for(self._arrived.wait(), left)
            except TimeoutError:
                break
        batch = []
        while self._pending and len(batch) < self.max_batch_size:
            entry = self._pending.popleft()
            if not entry[1].done():  # a caller that went away takes no slot
                batch.append(entry)
        return batch

    async def _loop(self) -> None:
        while True:
            batch = await self._next_batch()
            if not batch:
                continue
            try:
                results = await self.run([item for item, _, _ in batch])
                if len(results) != len(batch):
                    raise RuntimeError(f"{self.name}: {len(results)} results for a batch of {len(batch)}")
            except Exception as error:  # noqa: BLE001 - every caller of the batch gets it; the loop lives on
                logger.exception("%s: the batch failed", self.name)
                results = [error] * len(batch)
            for (_, future, _), result in zip(batch, results):
                if future.done():
                    continue
                if isinstance(result, BaseException):
                    future.set_exception(result)
                else:
                    future.set_result(result)
