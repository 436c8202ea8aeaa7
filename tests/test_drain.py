"""serving/drain.py: IdleDrain's busy/idle bookkeeping, and the SIGTERM handler install() puts in front
of the previous one (uvicorn's, in the service): it calls that handler once, and only once idle.
Signals are raised in this process's main thread; every test restores the SIGTERM handler it found.
"""

from __future__ import annotations

import signal
import threading
import time

import pytest

from serving.drain import IdleDrain


@pytest.fixture(autouse=True)
def restore_sigterm():
    previous = signal.getsignal(signal.SIGTERM)
    yield
    signal.signal(signal.SIGTERM, previous)


class Recorder:
    """A stand-in for uvicorn's SIGTERM handler: records each call."""

    def __init__(self):
        self.calls: list[tuple[int, float]] = []
        self.called = threading.Event()

    def __call__(self, signum, frame) -> None:
        self.calls.append((signum, time.monotonic()))
        self.called.set()


def wait_until(condition, timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.01)
    return condition()


def test_idle_only_after_idle_s_without_work():
    drain = IdleDrain(idle_s=0.1)
    assert not drain.idle(), "a fresh drain counts its creation as activity"
    assert wait_until(drain.idle, 2)
    with drain.active():
        assert drain.busy == 1 and not drain.idle()
        with drain.active():  # units of work nest and overlap
            assert drain.busy == 2
        assert drain.busy == 1 and not drain.idle()
    assert drain.busy == 0 and not drain.idle(), "work just ended: not idle for idle_s yet"
    assert wait_until(drain.idle, 2)


def test_idle_with_idle_s_0_is_just_not_busy():
    drain = IdleDrain(idle_s=0)
    assert drain.idle()
    with drain.active():
        assert not drain.idle()
    assert drain.idle()


def test_active_ends_its_unit_of_work_when_the_work_raises():
    drain = IdleDrain(idle_s=0)
    with pytest.raises(ValueError):
        with drain.active():
            raise ValueError("the request failed")
    assert drain.busy == 0 and drain.idle()


def test_active_counts_units_from_several_threads():
    drain = IdleDrain(idle_s=0)
    entered, release = threading.Barrier(9), threading.Event()

    def work() -> None:
        with drain.active():
            entered.wait(5)
            release.wait(5)

    threads = [threading.Thread(target=work) for _ in range(8)]
    for thread in threads:
        thread.start()
    entered.wait(5)
    assert drain.busy == 8 and not drain.idle()
    release.set()
    for thread in threads:
        thread.join(5)
    assert drain.busy == 0 and drain.idle()


def test_sigterm_reaches_the_previous_handler_once_and_only_when_idle():
    recorder = Recorder()
    signal.signal(signal.SIGTERM, recorder)
    drain = IdleDrain(idle_s=0.15, limit_s=30)
    assert drain.install()
    assert signal.getsignal(signal.SIGTERM) is not recorder
    with drain.active():
        signal.raise_signal(signal.SIGTERM)
        time.sleep(0.3)
        assert recorder.calls == [], "the previous handler ran while a unit of work was running"
        released = time.monotonic()
    assert recorder.called.wait(5), "the previous handler never ran once idle"
    time.sleep(0.15)  # room for a second, wrong call
    assert [signum for signum, _ in recorder.calls] == [signal.SIGTERM]
    assert recorder.calls[0][1] - released >= 0.15 - 0.01, "it waited idle_s after the last unit of work"


def test_sigterm_while_idle_still_waits_idle_s_for_requests_on_their_way():
    recorder = Recorder()
    signal.signal(signal.SIGTERM, recorder)
    drain = IdleDrain(idle_s=0.15, limit_s=30)
    time.sleep(0.2)
    assert drain.idle() and drain.install()
    sent = time.monotonic()
    signal.raise_signal(signal.SIGTERM)
    assert recorder.called.wait(5)
    assert recorder.calls[0][1] - sent >= 0.15 - 0.01
    assert len(recorder.calls) == 1


def test_sigterm_gives_up_waiting_after_limit_s():
    recorder = Recorder()
    signal.signal(signal.SIGTERM, recorder)
    drain = IdleDrain(idle_s=0.05, limit_s=0.2)
    assert drain.install()
    with drain.active():  # never idle while the signal is pending
        sent = time.monotonic()
        signal.raise_signal(signal.SIGTERM)
        assert recorder.called.wait(5), "limit_s did not end the wait"
        assert 0.2 - 0.01 <= recorder.calls[0][1] - sent < 3
    assert len(recorder.calls) == 1


def test_install_leaves_a_non_callable_handler_alone():
    for handler in (signal.SIG_DFL, signal.SIG_IGN):
        signal.signal(signal.SIGTERM, handler)
        assert IdleDrain().install() is False
        assert signal.getsignal(signal.SIGTERM) == handler


def test_install_outside_the_main_thread_changes_nothing():
    recorder = Recorder()
    signal.signal(signal.SIGTERM, recorder)
    result = []
    thread = threading.Thread(target=lambda: result.append(IdleDrain().install()))
    thread.start()
    thread.join(5)
    assert result == [False] and signal.getsignal(signal.SIGTERM) is recorder
