"""Merge the concurrent requests of one HTTP worker into fewer, bigger encoder calls.

Every call from a worker to the encoder process costs a round trip and a serialisation; with many
small requests per worker the encoder would see many small calls. `MicroBatcher` collects the items
(images) that requests submit and sends them in calls of at most `max_size` items:

- when no call is in flight, what was submitted flushes at once (on the next turn of the event loop,
  so requests parsed in the same turn share a call): an idle worker adds no latency;
- while a call is in flight, new items wait at most `window_s` (or until `max_size` of them wait), so
  a burst of requests shares one call, and then go out while fewer than `max_in_flight` calls are out.
  Waiting for the call in flight to return instead would leave the encoder idle for every round trip:
  the next call must already be queued in the encoder when its current batch ends;
- a request bigger than `max_size` is split over several calls; results come back per request,
  in its item order.

Per-item failures are values returned by `call` (the caller decides what an item's failure looks
like), so one request's bad image never fails another request. An exception from `call` itself
(the encoder unreachable or overloaded) fails the requests whose items were in that call, and only
those. A request cancelled while waiting (its client left) takes its unsent items out of the queue;
the calls already running for others are never cancelled with it. MicroBatcher is pure asyncio (one
event loop, no locks); ThreadBatcher (an encoder in the same process) follows the same rules on
threads of its own, which share its queue under one lock.
"""

from __future__ import annotations

import asyncio
import threading
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
    arrived: float = 0.0  # loop time of submission
    sent: int = 0  # items handed to calls so far
    done: int = 0  # items whose results arrived

    def __post_init__(self) -> None:
        self.results = [None] * len(self.items)


class MicroBatcher(Generic[T, R]):
    """`await batcher.submit(items)` -> `call`'s results for those items, with concurrent submissions
    merged into calls of at most `max_size` items (module docstring: when a call goes out)."""

    def __init__(self, call: Callable[[list[T]], Awaitable[Sequence[R]]], max_size: int, max_in_flight: int = 4,
                 window_s: float = 0.005):
        if max_size < 1 or max_in_flight < 1 or window_s < 0:
            raise ValueError("max_size and max_in_flight must be at least 1, window_s at least 0")
        self.call, self.max_size, self.max_in_flight, self.window_s = call, max_size, max_in_flight, window_s
        self.queue: deque[_Request] = deque()
        self.queued = 0  # items waiting, over all queued requests
        self.in_flight = 0
        self.calls: set[asyncio.Task] = set()  # strong references: the loop keeps only weak ones
        self.scheduled = False
        self.timer: asyncio.TimerHandle | None = None

    async def submit(self, items: Sequence[T]) -> list[R]:
        if not items:
            return []
        loop = asyncio.get_running_loop()
        request = _Request(list(items), loop.create_future(), arrived=loop.time())
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
        self.queued -= withdraw(self.queue, request)

    def _due(self) -> bool:
        """Whether the queued items go out now (the module docstring's rules), else arm the window's timer."""
        if not self.queued or self.in_flight >= self.max_in_flight:
            return False
        loop = asyncio.get_running_loop()
        waited = loop.time() - self.queue[0].arrived
        if self.in_flight == 0 or self.queued >= self.max_size or waited >= self.window_s:
            return True
        if self.timer is None:
            self.timer = loop.call_later(self.window_s - waited, self._on_timer)
        return False

    def _on_timer(self) -> None:
        self.timer = None
        self._flush()

    def _flush(self) -> None:
        self.scheduled = False
        while self._due():
            pieces, taken = take(self.queue, self.max_size)
            self.queued -= taken
            self.in_flight += 1
            task = asyncio.get_running_loop().create_task(self._run(pieces))
            self.calls.add(task)
            task.add_done_callback(self.calls.discard)

    async def _run(self, pieces: list[Piece]) -> None:
        try:
            results = await self.call(items_of(pieces))
            finished = fill(pieces, results)
        except asyncio.CancelledError:  # the loop is shutting down
            for request, _, _ in pieces:
                request.future.cancel()
            raise
        except Exception as exc:
            for request, _, _ in pieces:
                settle(request.future, exception=exc)
                self._withdraw(request)  # its other items need not go out: it failed already
        else:
            for request in finished:
                settle(request.future, request.results)
        finally:
            self.in_flight -= 1
            self._schedule()


class ThreadBatcher(Generic[T, R]):
    """`await batcher.submit(items)` -> a call's results for those items, with each of `calls` run on a
    thread of its own: a free thread takes every item queued (at most `max_size`) the moment its last
    call ends. For encoders in the same process: the event loop keeps parsing requests while they run
    (ONNX Runtime releases the GIL), and no encoder waits for a turn of that loop, which is busy, to be
    fed. Several calls (one ONNX Runtime session each) run side by side. Same per-request results,
    splitting, failures and withdrawal as MicroBatcher."""

    def __init__(self, calls: Sequence[Callable[[list[T]], Sequence[R]]], max_size: int, name: str = "encoder"):
        if max_size < 1 or not calls:
            raise ValueError("max_size must be at least 1, and there must be a call")
        self.max_size = max_size
        self.queue: deque[_Request] = deque()
        self.queued = 0
        self.ready = threading.Condition()
        for number, call in enumerate(calls):
            threading.Thread(target=self._work, args=(call,), name=f"{name}-{number}", daemon=True).start()

    async def submit(self, items: Sequence[T]) -> list[R]:
        if not items:
            return []
        request = _Request(list(items), asyncio.get_running_loop().create_future())
        with self.ready:
            self.queue.append(request)
            self.queued += len(request.items)
            self.ready.notify()
        try:
            return await request.future
        except asyncio.CancelledError:
            with self.ready:
                self._withdraw(request)
            raise

    def _withdraw(self, request: _Request) -> None:
        self.queued -= withdraw(self.queue, request)

    def _work(self, call: Callable[[list[T]], Sequence[R]]) -> None:
        while True:
            with self.ready:
                while not self.queued:
                    self.ready.wait()
                pieces, taken = take(self.queue, self.max_size)
                self.queued -= taken
                if self.queued:  # more than one call's worth: another free thread takes the rest
                    self.ready.notify()
            try:
                finished = fill(pieces, call(items_of(pieces)))
            except Exception as exc:
                with self.ready:
                    for request, _, _ in pieces:
                        self._withdraw(request)
                for request, _, _ in pieces:
                    request.future.get_loop().call_soon_threadsafe(settle, request.future, None, exc)
            else:
                for request in finished:
                    request.future.get_loop().call_soon_threadsafe(settle, request.future, request.results)


Piece = tuple[_Request, int, int]  # a request and the slice [start, end) of its items in one call


def take(queue: deque[_Request], room: int) -> tuple[list[Piece], int]:
    """Up to `room` items from the front of the queue, splitting a request that does not fit (its rest stays
    first in line): the pieces for one call and how many items they hold."""
    pieces: list[Piece] = []
    taken = 0
    while taken < room and queue:
        request = queue[0]
        end = min(len(request.items), request.sent + room - taken)
        pieces.append((request, request.sent, end))
        taken += end - request.sent
        request.sent = end
        if end == len(request.items):
            queue.popleft()
    return pieces, taken


def withdraw(queue: deque[_Request], request: _Request) -> int:
    """Take a request out of the queue: how many of its items were still waiting (0 if it was not there)."""
    if request not in queue:
        return 0
    queue.remove(request)
    return len(request.items) - request.sent


def items_of(pieces: list[Piece]) -> list[Any]:
    return [item for request, start, end in pieces for item in request.items[start:end]]


def fill(pieces: list[Piece], results: Sequence[Any]) -> list[_Request]:
    """Store one call's results in their requests: the requests that now have all of theirs."""
    if len(results) != sum(end - start for _, start, end in pieces):
        raise RuntimeError(f"the call returned {len(results)} results for {len(items_of(pieces))} items")
    finished, offset = [], 0
    for request, start, end in pieces:
        request.results[start:end] = results[offset : offset + end - start]
        offset += end - start
        request.done += end - start
        if request.done == len(request.items):
            finished.append(request)
    return finished


def settle(future: asyncio.Future, result: Any = None, exception: BaseException | None = None) -> None:
    """Resolve a request's future unless it is done already (cancelled, or failed by an earlier call)."""
    if future.done():
        return
    if exception is not None:
        future.set_exception(exception)
    else:
        future.set_result(result)
