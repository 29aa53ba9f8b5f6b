"""One tick loop for all live sessions of the Space: every session with a queued unit is stepped in one batch.

The browser sessions' units go to one `minicpmo.duplex.DuplexEngine` (one vision call for all frames, one batched
LLM prefill and decode over the sessions' caches), so two visitors cost one batched step per second instead of two
steps in turn behind the model lock. The loop runs on one thread; every engine call (open, reset, close, step) is
made under the Space's model lock, which chat and replay take too, so the model is never used by two threads.
"""

from __future__ import annotations

import threading
import time
from collections import deque

from minicpmo.duplex.engine import DuplexEngine

from .model_loading import LoadedModel


class LiveTicker:
    """Owns the engine of the live sessions and the thread that steps them.

    A session registers itself (`add`) once its engine session is open; `wake()` is called whenever a session
    queues a unit. `batch_wait_s`: after the first unit of a tick is ready, how long to wait for the other active
    sessions' units so that they join the same batch (their microphones deliver at slightly different times).
    """

    def __init__(self, loaded: LoadedModel, batch_wait_s: float = 0.15, history: int = 64):
        self.loaded = loaded
        self.engine = DuplexEngine(loaded.model, loaded.processor)
        self.batch_wait_s = float(batch_wait_s)
        self.batches: deque = deque(maxlen=history)  # the session keys of the most recent ticks, newest last
        self.ticks = 0
        self._live: dict = {}
        self._ready = threading.Condition()
        self._stop = False
        self._thread = threading.Thread(target=self._run, name="live-ticker", daemon=True)
        self._thread.start()

    # --- sessions -------------------------------------------------------------------------------------------------
    def open(self, key: str, **session_kwargs):
        """Open the engine session of `key` (its system prompt prefilled now) and return its DuplexSession."""
        with self.loaded.lock:
            return self.engine.open(key, **session_kwargs)

    def add(self, live) -> None:
        with self._ready:
            self._live[live.key] = live
            self._ready.notify_all()

    def remove(self, key: str) -> None:
        """Stop stepping `key` and free its engine session (safe when it was never opened or is gone already)."""
        with self._ready:
            self._live.pop(key, None)
        with self.loaded.lock:
            if key in self.engine.sessions:
                self.engine.close(key)

    def reset(self, key: str) -> None:
        with self.loaded.lock:
            self.engine.reset(key)

    def wake(self) -> None:
        with self._ready:
            self._ready.notify_all()

    def stop(self) -> None:
        with self._ready:
            self._stop = True
            self._ready.notify_all()
        self._thread.join(timeout=30)

    # --- the loop -------------------------------------------------------------------------------------------------
    def _pending(self) -> list:
        return [live for live in self._live.values() if live.has_unit()]

    def _wait_for_units(self) -> bool:
        """Block until some session has a unit, then give the others `batch_wait_s` to have theirs; False on stop."""
        with self._ready:
            while not self._stop and not self._pending():
                self._ready.wait(timeout=1.0)
            if self._stop:
                return False
            deadline = time.monotonic() + self.batch_wait_s
            while not self._stop and len(self._pending()) < len(self._live):
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._ready.wait(timeout=left)
            return not self._stop

    def _run(self) -> None:
        while self._wait_for_units():
            self.tick()

    def tick(self) -> int:
        """Step every session that has a unit queued, in one batch; returns how many were stepped."""
        with self.loaded.lock:  # units are taken under the lock, so a reset or close never races a taken unit
            with self._ready:
                sessions = self._pending()
            units = {live.key: live.take_unit() for live in sessions}
            units = {key: unit for key, unit in units.items() if unit is not None}
            if not units:
                return 0
            started = time.perf_counter()
            try:
                results = self.engine.step(units)
            except Exception as error:  # a failure of the batch as a whole: its sessions hear of it, the loop goes on
                results = dict.fromkeys(units, error)
            elapsed = time.perf_counter() - started
        self.ticks += 1
        self.batches.append(tuple(units))
        for live in sessions:
            if live.key in results:
                live.deliver(results[live.key], elapsed)
        return len(units)


__all__ = ["LiveTicker"]
