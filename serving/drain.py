"""Keep the model process (BatchedModel) up on SIGTERM until the requests in flight elsewhere have reached it.

BentoML stops all its processes at once. The public Embedder drains its accepted requests, but each
of them still needs one call to BatchedModel, which would otherwise close its socket at the same
moment and turn those requests into 503s. So BatchedModel postpones uvicorn's own SIGTERM handling
until it has been idle for `idle_s` (or `limit_s` passed), then lets uvicorn shut down as it would have.
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

logger = logging.getLogger(__name__)


class IdleDrain:
    def __init__(self, idle_s: float = 1.0, limit_s: float = 60.0):
        self.idle_s, self.limit_s = idle_s, limit_s
        self.busy = 0
        self.last_active = time.monotonic()
        self.lock = threading.Lock()

    @contextmanager
    def active(self) -> Iterator[None]:
        """Wrap each unit of work; the process is idle when none is running and none ran lately."""
        with self.lock:
            self.busy += 1
        try:
            yield
        finally:
            with self.lock:
                self.busy -= 1
                self.last_active = time.monotonic()

    def idle(self) -> bool:
        with self.lock:
            return self.busy == 0 and time.monotonic() - self.last_active >= self.idle_s

    def install(self) -> bool:
        """Wrap the current SIGTERM handler (uvicorn's, when called during startup in the main thread)."""
        if threading.current_thread() is not threading.main_thread():
            logger.warning("not in the main thread: SIGTERM stops the model process at once")
            return False
        previous = signal.getsignal(signal.SIGTERM)
        if not callable(previous):
            return False

        def postpone(signum: int, frame: object) -> None:
            threading.Thread(target=self._stop_when_idle, args=(previous, signum, frame), daemon=True).start()

        signal.signal(signal.SIGTERM, postpone)
        return True

    def _stop_when_idle(self, handler, signum: int, frame: object) -> None:
        start = time.monotonic()
        with self.lock:  # give requests already on their way idle_s to arrive
            self.last_active = max(self.last_active, start)
        while not self.idle() and time.monotonic() - start < self.limit_s:
            time.sleep(0.05)
        logger.info("SIGTERM: stopping after %.1f s of draining", time.monotonic() - start)
        handler(signum, frame)  # uvicorn's handler only sets a flag its loop polls: safe from this thread
