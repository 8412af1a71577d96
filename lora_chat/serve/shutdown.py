"""Stopping a server the way process managers do: SIGTERM (or SIGINT) once drains, twice stops now.

    stop = Stopping(on_first=drain, on_again=force)     # both engines build one
    with stop.installed():                              # where no one else owns the signals (--engine vllm)
        ...
    # lorachat's own engine runs under uvicorn, which installs its handlers inside `Server.serve`:
    DrainingServer(config, stop) routes them here instead.

`on_first` runs on a thread of its own (a drain takes seconds; a signal handler must return at once); a second
signal calls `on_again` on the signal's thread. Why not uvicorn's own handling alone: on SIGTERM it closes the
listening socket at once (a new client meets a refused connection, not a 503 it can retry on), waits up to
`timeout_graceful_shutdown` for open connections without telling running streams anything, and since 0.29 it
re-raises the captured signal after its shutdown, so the process dies of SIGTERM (exit 143) instead of exiting
0. So lorachat keeps uvicorn's server and its connection handling and replaces only `handle_exit`.
"""

from __future__ import annotations

import contextlib
import signal
import threading
import time
from collections.abc import Callable, Iterator
from types import FrameType
from typing import Any

import uvicorn

SIGNALS = (signal.SIGTERM, signal.SIGINT)


class Stopping:
    """The first SIGTERM/SIGINT starts `on_first` on a thread; a second one calls `on_again`."""

    def __init__(self, on_first: Callable[[], None], on_again: Callable[[], None]):
        self.on_first, self.on_again = on_first, on_again
        self.signalled = threading.Event()
        self.thread: threading.Thread | None = None

    def __call__(self, sig: int, frame: FrameType | None = None) -> None:
        if self.signalled.is_set():
            self.on_again()
            return
        self.signalled.set()
        self.thread = threading.Thread(target=self.on_first, name="lorachat-drain", daemon=True)
        self.thread.start()

    @contextlib.contextmanager
    def installed(self) -> Iterator[None]:
        """SIGTERM and SIGINT handled by this object inside the block (main thread only), restored after it."""
        previous = {sig: signal.signal(sig, self) for sig in SIGNALS}
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)


class DrainingServer(uvicorn.Server):
    """uvicorn's server whose SIGTERM/SIGINT go to a `Stopping` instead of ending it (and re-raising) at once."""

    def __init__(self, config: uvicorn.Config, stopping: Stopping):
        super().__init__(config)
        self.stopping = stopping

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        self.stopping(sig, frame)


def drain(*, begin: Callable[[], None], idle: Callable[[], bool], abort: Callable[[str], None],
          finish: Callable[[], None], timeout: float, say: Callable[[str], None] = print,
          poll_s: float = 0.05) -> bool:
    """Stop taking work (`begin`), wait up to `timeout` s for the running work to end (`idle`), else `abort` what
    is left, then `finish` (the server exits). True when everything finished in time."""
    begin()
    deadline = time.monotonic() + timeout
    say(f"draining: finishing running requests (up to {timeout:g} s); new ones get 503")
    while not idle() and time.monotonic() < deadline:
        time.sleep(poll_s)
    clean = idle()
    if not clean:
        abort(f"the drain timeout of {timeout:g} s passed")
        say(f"drain timeout of {timeout:g} s passed: open requests ended with an error")
    finish()  # uvicorn then waits (timeout_graceful_shutdown) for handlers to write their last events
    return clean


def force_exit(server: Any) -> Callable[[], None]:
    """What a second signal does to a uvicorn server: stop now, connections and all."""
    def stop() -> None:
        server.should_exit = True
        server.force_exit = True
    return stop
