"""Merge the concurrent requests of one HTTP worker into fewer, bigger encoder calls.

Every call from a worker to the encoder process costs a round trip and a serialisation; with many
small requests per worker the encoder would see many small calls. `MicroBatcher` collects the items
(images) that requests submit and sends them in calls of at most `max_size` items:

- when no call is in flight, what was submitted flushes at once (on the next turn of the event loop,
  so requests parsed in the same turn share a call): an idle worker adds no latency;
- while a call is in flight, new items wait for it, so the next call carries everything that
  arrived meanwhile (the window is the encoder's own latency); a full `max_size` call is sent at once
  while fewer than `max_in_flight` calls are out, so a busy worker keeps the encoder fed;
- a request bigger than `max_size` is split over several calls; results come back per request,
  in its item order.

Per-item failures are values returned by `call` (the caller decides what an item's failure looks
like), so one request's bad image never fails another request. An exception from `call` itself
(the encoder unreachable or overloaded) fails the requests whose items were in that call, and only
those. A request cancelled while waiting (its client left) takes its unsent items out of the queue;
the calls already running for others are never cancelled with it. Pure asyncio: one event loop, no locks.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

T = TypeVar("T")
R = TypeVar("R")


@dataclass(eq=False)
class _Request:
    items: list[Any]
    future: asyncio.Future
    results: list[Any] = field(default_factory=list)
    sent: int = 0  # items handed to calls so far
    done: int = 0  # items whose results arrived

    def __post_init__(self) -> None:
        self.results = [None] * len(self.items)


class MicroBatcher(Generic[T, R]):
    """`await batcher.submit(items)` -> `call`'s results for those items, with concurrent submissions
    merged into calls of at most `max_size` items (module docstring: when a call goes out)."""

    def __init__(self, call: Callable[[list[T]], Awaitable[Sequence[R]]], max_size: int, max_in_flight: int = 2):
        if max_size < 1 or max_in_flight < 1:
            raise ValueError("max_size and max_in_flight must be at least 1")
        self.call, self.max_size, self.max_in_flight = call, max_size, max_in_flight
        self.queue: deque[_Request] = deque()
        self.queued = 0  # items waiting, over all queued requests
        self.in_flight = 0
        self.calls: set[asyncio.Task] = set()  # strong references: the loop keeps only weak ones
        self.scheduled = False

    async def submit(self, items: Sequence[T]) -> list[R]:
        if not items:
            return []
        request = _Request(list(items), asyncio.get_running_loop().create_future())
        self.queue.append(request)
        self.queued += len(request.items)
        self._schedule()
        try:
            return await request.future
        except asyncio.CancelledError:
            self._withdraw(request)
            raise

    def _schedule(self) -> None:
        if not self.scheduled:
            self.scheduled = True
            asyncio.get_running_loop().call_soon(self._flush)

    def _withdraw(self, request: _Request) -> None:
        if request in self.queue:
            self.queue.remove(request)
            self.queued -= len(request.items) - request.sent

    def _flush(self) -> None:
        self.scheduled = False
        while self.queued and self.in_flight < self.max_in_flight and (
                self.in_flight == 0 or self.queued >= self.max_size):
            pieces: list[tuple[_Request, int, int]] = []
            room = self.max_size
            while room and self.queue:
                request = self.queue[0]
                end = min(len(request.items), request.sent + room)
                pieces.append((request, request.sent, end))
                room -= end - request.sent
                self.queued -= end - request.sent
                request.sent = end
                if end == len(request.items):
                    self.queue.popleft()
            self.in_flight += 1
            task = asyncio.get_running_loop().create_task(self._run(pieces))
            self.calls.add(task)
            task.add_done_callback(self.calls.discard)

    async def _run(self, pieces: list[tuple[_Request, int, int]]) -> None:
        items = [item for request, start, end in pieces for item in request.items[start:end]]
        try:
            results = await self.call(items)
            if len(results) != len(items):
                raise RuntimeError(f"the call returned {len(results)} results for {len(items)} items")
        except asyncio.CancelledError:  # the loop is shutting down
            for request, _, _ in pieces:
                request.future.cancel()
            raise
        except Exception as exc:
            for request, _, _ in pieces:
                if not request.future.done():
                    request.future.set_exception(exc)
                self._withdraw(request)  # its other items need not go out: it failed already
        else:
            offset = 0
            for request, start, end in pieces:
                request.results[start:end] = results[offset : offset + end - start]
                offset += end - start
                request.done += end - start
                if request.done == len(request.items) and not request.future.done():
                    request.future.set_result(request.results)
        finally:
            self.in_flight -= 1
            self._schedule()
