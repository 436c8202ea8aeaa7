"""serving/microbatch.py: concurrent submissions merged into bounded calls, results split back per request;
MicroBatcher (calls on the event loop) and ThreadBatcher (calls on a thread of their own)."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from serving.microbatch import MicroBatcher, ThreadBatcher


class Encoder:
    """A fake encoder call that records its batches; item "bad" is a per-item error value, "boom" raises."""

    def __init__(self, delay: float = 0.01):
        self.calls: list[list] = []
        self.delay = delay
        self.release: asyncio.Event | None = None

    async def __call__(self, items: list) -> list:
        self.calls.append(list(items))
        if self.release is not None:
            await self.release.wait()
        await asyncio.sleep(self.delay)
        if "boom" in items:
            raise ConnectionError("encoder gone")
        return [{"error": item} if item == "bad" else item * 10 for item in items]


def run(coroutine):
    return asyncio.run(coroutine)


def test_an_idle_batcher_sends_at_once_and_a_busy_one_merges_what_arrives_meanwhile():
    async def scenario():
        encoder = Encoder(delay=0.05)
        batcher = MicroBatcher(encoder, max_size=64)
        first = asyncio.create_task(batcher.submit([1]))
        await asyncio.sleep(0.01)  # the first call is in flight now
        assert encoder.calls == [[1]]
        rest = [asyncio.create_task(batcher.submit([i, i + 100])) for i in range(2, 6)]
        results = [await first] + [await task for task in rest]
        return encoder.calls, results

    calls, results = run(scenario())
    assert calls == [[1], [2, 102, 3, 103, 4, 104, 5, 105]]  # one merged call, in arrival order
    assert results == [[10], [20, 1020], [30, 1030], [40, 1040], [50, 1050]]


def test_requests_in_the_same_loop_turn_share_one_call():
    async def scenario():
        encoder = Encoder()
        batcher = MicroBatcher(encoder, max_size=64)
        results = await asyncio.gather(*(batcher.submit([i]) for i in range(5)))
        return encoder.calls, results

    calls, results = run(scenario())
    assert calls == [[0, 1, 2, 3, 4]] and results == [[0], [10], [20], [30], [40]]


def test_calls_never_exceed_max_size_and_big_requests_are_split_and_reassembled_in_order():
    async def scenario():
        encoder = Encoder()
        batcher = MicroBatcher(encoder, max_size=4, max_in_flight=2)
        results = await asyncio.gather(batcher.submit(list(range(10))), batcher.submit([100, 101, 102]))
        return encoder.calls, results

    calls, results = run(scenario())
    assert all(len(call) <= 4 for call in calls)
    assert sorted(item for call in calls for item in call) == sorted(list(range(10)) + [100, 101, 102])
    assert results == [[i * 10 for i in range(10)], [1000, 1010, 1020]]
    assert len(calls) == 4  # 13 items in calls of 4: nothing sent half-empty while more waited


def test_full_batches_go_out_while_a_call_is_in_flight_but_partial_ones_wait_for_the_window():
    async def scenario():
        encoder = Encoder()
        encoder.release = asyncio.Event()
        batcher = MicroBatcher(encoder, max_size=3, max_in_flight=2, window_s=10)
        tasks = [asyncio.create_task(batcher.submit([0]))]
        await asyncio.sleep(0)
        await asyncio.sleep(0)
        tasks.append(asyncio.create_task(batcher.submit([1])))  # partial: waits for the call in flight
        await asyncio.sleep(0.02)
        before_full = [list(call) for call in encoder.calls]
        tasks.append(asyncio.create_task(batcher.submit([2, 3])))  # 3 waiting = a full call: goes out
        await asyncio.sleep(0.02)
        with_full = [list(call) for call in encoder.calls]
        encoder.release.set()
        await asyncio.gather(*tasks)
        return before_full, with_full

    before_full, with_full = run(scenario())
    assert before_full == [[0]]
    assert with_full == [[0], [1, 2, 3]]


def test_a_bad_item_is_its_own_requests_value_and_a_failed_call_fails_only_its_requests():
    async def scenario():
        encoder = Encoder(delay=0.05)
        batcher = MicroBatcher(encoder, max_size=2, max_in_flight=1)
        good, bad = await asyncio.gather(batcher.submit([1]), batcher.submit(["bad"]))
        first = asyncio.create_task(batcher.submit([7]))
        await asyncio.sleep(0.01)
        doomed = asyncio.create_task(batcher.submit(["boom", 3]))  # one full call of its own
        later = asyncio.create_task(batcher.submit([4]))  # the next call
        outcomes = await asyncio.gather(first, doomed, later, return_exceptions=True)
        return good, bad, outcomes, encoder.calls

    good, bad, (first, doomed, later), calls = run(scenario())
    assert good == [10] and bad == [{"error": "bad"}]
    assert first == [70] and later == [40]
    assert isinstance(doomed, ConnectionError)
    assert calls[-2:] == [["boom", 3], [4]]


def test_a_failure_in_one_part_of_a_split_request_fails_that_request_once():
    async def scenario():
        encoder = Encoder()
        batcher = MicroBatcher(encoder, max_size=2, max_in_flight=1)
        with pytest.raises(ConnectionError):
            await batcher.submit([1, 2, "boom", 4, 5, 6])
        await asyncio.sleep(0.05)
        return encoder.calls, batcher.queued, batcher.in_flight

    calls, queued, in_flight = run(scenario())
    assert calls == [[1, 2], ["boom", 4]]  # the rest of a failed request is not sent
    assert queued == 0 and in_flight == 0


def test_a_cancelled_request_withdraws_its_items_and_does_not_cancel_the_others():
    async def scenario():
        encoder = Encoder(delay=0.05)
        batcher = MicroBatcher(encoder, max_size=8, window_s=10)
        first = asyncio.create_task(batcher.submit([1]))
        await asyncio.sleep(0.01)
        leaving = asyncio.create_task(batcher.submit([2]))
        staying = asyncio.create_task(batcher.submit([3]))
        await asyncio.sleep(0.01)
        leaving.cancel()
        results = await asyncio.gather(first, staying)
        return encoder.calls, results, leaving.cancelled()

    calls, results, cancelled = run(scenario())
    assert cancelled and results == [[10], [30]]
    assert calls == [[1], [3]]


def test_a_partial_call_goes_out_after_the_window_while_another_is_in_flight():
    """The next call must be queued in the encoder before the current one returns, or the encoder idles
    for every round trip between its batches."""
    async def scenario():
        encoder = Encoder()
        encoder.release = asyncio.Event()
        batcher = MicroBatcher(encoder, max_size=64, window_s=0.02)
        tasks = [asyncio.create_task(batcher.submit([0]))]
        await asyncio.sleep(0.005)
        tasks += [asyncio.create_task(batcher.submit([i])) for i in (1, 2)]
        await asyncio.sleep(0.005)
        within = [list(call) for call in encoder.calls]
        await asyncio.sleep(0.05)
        after = [list(call) for call in encoder.calls]
        encoder.release.set()
        return within, after, await asyncio.gather(*tasks)

    within, after, results = run(scenario())
    assert within == [[0]]  # the burst is still being collected
    assert after == [[0], [1, 2]]  # and went out as one call, the first call still running
    assert results == [[0], [10], [20]]


def test_a_wrong_result_count_is_an_error_not_a_silent_drop():
    async def short(items):
        return items[:-1]

    async def scenario():
        return await MicroBatcher(short, max_size=4).submit([1, 2])

    with pytest.raises(RuntimeError, match="2 items"):
        run(scenario())
    assert run(MicroBatcher(short, max_size=4).submit([])) == []


# ---------------------------------------------------------------- ThreadBatcher


class BlockingEncoder:
    """The thread-side fake: records its batches, holds each call until `gate` is set, and reports the
    thread it ran on; item "bad" is a per-item error value, "boom" raises."""

    def __init__(self):
        self.calls: list[list] = []
        self.gate = threading.Event()
        self.started = threading.Semaphore(0)
        self.threads: set[str] = set()

    def __call__(self, items: list) -> list:
        self.calls.append(list(items))
        self.threads.add(threading.current_thread().name)
        self.started.release()
        self.gate.wait(10)
        if "boom" in items:
            raise ConnectionError("session failed")
        return [{"error": item} if item == "bad" else item * 10 for item in items]


async def started(encoder: BlockingEncoder, calls: int) -> None:
    for _ in range(calls):
        assert await asyncio.to_thread(encoder.started.acquire, True, 10)


def test_thread_batcher_merges_what_arrives_during_a_call_and_splits_big_requests():
    async def scenario():
        encoder = BlockingEncoder()
        batcher = ThreadBatcher([encoder], max_size=4, name="test-encoder")
        first = asyncio.create_task(batcher.submit([1]))
        await started(encoder, 1)
        rest = [asyncio.create_task(batcher.submit(items)) for items in ([2, 3], ["bad"], [4, 5, 6, 7, 8, 9])]
        await asyncio.sleep(0.05)
        encoder.gate.set()
        return encoder, await first, await asyncio.gather(*rest)

    encoder, first, rest = run(scenario())
    assert encoder.calls == [[1], [2, 3, "bad", 4], [5, 6, 7, 8], [9]]  # what waited, in order, at most 4
    assert first == [10] and rest == [[20, 30], [{"error": "bad"}], [40, 50, 60, 70, 80, 90]]
    assert encoder.threads == {"test-encoder-0"}


def test_thread_batcher_starts_the_next_call_while_the_event_loop_is_busy():
    """The encoder must not wait for a turn of the event loop (busy parsing requests) to start its next batch."""
    async def scenario():
        encoder = BlockingEncoder()
        batcher = ThreadBatcher([encoder], max_size=8)
        first = asyncio.create_task(batcher.submit([1]))
        await started(encoder, 1)
        second = asyncio.create_task(batcher.submit([2]))
        await asyncio.sleep(0)  # queued
        encoder.gate.set()
        time.sleep(0.2)  # the loop is blocked: no callback of it can run
        calls_while_blocked = [list(call) for call in encoder.calls]
        return calls_while_blocked, await first, await second

    calls_while_blocked, first, second = run(scenario())
    assert calls_while_blocked == [[1], [2]] and first == [10] and second == [20]


def test_thread_batcher_failures_stay_with_their_call_and_cancelled_requests_withdraw():
    async def scenario():
        encoder = BlockingEncoder()
        batcher = ThreadBatcher([encoder], max_size=2)
        first = asyncio.create_task(batcher.submit(["boom"]))
        await started(encoder, 1)
        leaving = asyncio.create_task(batcher.submit([5]))
        split = asyncio.create_task(batcher.submit([1, 2, "boom", 4, 6]))
        await asyncio.sleep(0.01)
        leaving.cancel()
        await asyncio.sleep(0.01)
        encoder.gate.set()
        outcomes = await asyncio.gather(first, split, return_exceptions=True)
        after = await batcher.submit([3])  # the thread is alive after a failed call
        return encoder.calls, outcomes, leaving.cancelled(), after, batcher.queued

    calls, outcomes, cancelled, after, queued = run(scenario())
    assert all(isinstance(outcome, ConnectionError) for outcome in outcomes)
    assert cancelled and after == [30] and queued == 0
    assert calls == [["boom"], [1, 2], ["boom", 4], [3]]  # 5 withdrawn; 6, after its request failed, not sent


def test_thread_batcher_runs_its_calls_side_by_side_each_on_its_own_thread():
    async def scenario():
        started, release = threading.Barrier(3), threading.Event()
        threads: list[str] = []

        def make(name: str):
            def call(items: list) -> list:
                threads.append(threading.current_thread().name)
                started.wait(10)  # both calls are running at once, or this times out
                release.wait(10)
                return [f"{name}:{item}" for item in items]
            return call

        batcher = ThreadBatcher([make("a"), make("b")], max_size=2, name="session")
        tasks = [asyncio.create_task(batcher.submit([i, i + 10])) for i in range(2)]
        await asyncio.to_thread(started.wait, 10)
        release.set()
        return sorted(threads), await asyncio.gather(*tasks)

    threads, results = run(scenario())
    assert threads == ["session-0", "session-1"]
    assert sorted(r[0].split(":")[1] for r in results) == ["0", "1"] and all(len(r) == 2 for r in results)
