"""uvicorn's C HTTP parser (httptools) with h11's bound on an unfinished request head.

uvicorn, under BentoML, parses requests with httptools when it is installed, else with h11 (pure
Python). httptools costs the event loop less CPU per request, which on a CPU host is CPU the model
does not get (the serve benchmark's records show it). But uvicorn gives httptools no bound on a
request head that never ends: a 20 KiB head sent in pieces stayed open, buffered, where h11 answers
400 and closes past 16 KiB. `BoundedHttpToolsProtocol` counts the bytes read while a head is still
unfinished and answers the same 400 past the same 16 KiB; `install()` makes it what uvicorn's
`http="auto"` (BentoML's setting) loads. serving/limits.py lists the other bounds.
"""

from __future__ import annotations

from uvicorn.protocols.http import auto
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

MAX_INCOMPLETE_HEAD = 16 * 1024  # h11's max_incomplete_event_size default, which uvicorn keeps


class BoundedHttpToolsProtocol(HttpToolsProtocol):
    head_bytes = 0  # read since this request's head began, while it is unfinished
    in_head = False

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self.head_bytes, self.in_head = 0, True

    def on_headers_complete(self) -> None:
        self.in_head = False
        super().on_headers_complete()

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if self.in_head and not self.transport.is_closing():
            self.head_bytes += len(data)
            if self.head_bytes > MAX_INCOMPLETE_HEAD:
                self.logger.warning("Request head over %d bytes.", MAX_INCOMPLETE_HEAD)
                self.send_400_response("Request head too large.")


def install() -> None:
    """In a service process, before uvicorn loads its protocol (at server start)."""
    auto.AutoHTTPProtocol = BoundedHttpToolsProtocol
