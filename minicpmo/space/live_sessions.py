"""Live full-duplex sessions: one DuplexSession per browser session, a worker thread that steps it once per
1-s unit, and a bounded registry with idle timeout.

Data flow: the microphone `.stream` handler only calls `push_audio` (resample + enqueue whole units) and the
webcam handler only stores the latest frame; the worker takes units from the input queue, steps the session
(under the session lock and the global model lock) and puts `LiveUpdate`s on the output queue; the single
long-lived output generator of the browser session drains that queue (`updates()`).
"""

import queue
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np

from minicpmo.audio_utils import OUTPUT_SAMPLE_RATE
from minicpmo.errors import SpaceError

from .audio_io import UnitAssembler
from .model_loading import LoadedModel
from .settings import SpaceSettings

OUTPUT_RATE = OUTPUT_SAMPLE_RATE
_STOP = object()


class LiveSessionsBusy(SpaceError, RuntimeError):
    """Every live slot is taken."""


class LiveSessionClosed(SpaceError, RuntimeError):
    """The session was stopped, timed out or failed."""


@dataclass
class UnitEvent:
    """One unit on the listen/speak timeline."""

    unit: int
    time_s: float
    action: str  # "listen" | "speak"
    text: str
    end_of_turn: bool
    interrupted: bool
    step_s: float


@dataclass
class LiveUpdate:
    """What the output generator forwards: speech (24 kHz float32; silence while listening), or an error."""

    audio: np.ndarray | None = None
    event: UnitEvent | None = None
    error: str | None = None
    reset: bool = False


@dataclass
class LiveOptions:
    system_prompt: str
    ref_audio: np.ndarray | None
    generate_audio: bool = True
    audio_only: bool = False


@dataclass
class LiveStats:
    units_in: int = 0
    units_done: int = 0
    units_dropped: int = 0
    last_step_s: float = 0.0
    speech_s: float = 0.0  # model speech produced so far (not counting the silence sent while listening)


class LiveSession:
    """Server side of one browser's live conversation."""

    def __init__(self, key: str, loaded: LoadedModel, settings: SpaceSettings, options: LiveOptions):
        self.key, self.loaded, self.settings, self.options = key, loaded, settings, options
        self.step_lock = threading.Lock()  # a session is never stepped concurrently (worker vs reset/close)
        self.inputs: queue.Queue = queue.Queue()
        self.outputs: queue.Queue = queue.Queue()
        self.assembler = UnitAssembler()
        self.events: list[UnitEvent] = []
        self.stats = LiveStats()
        self.latest_frame = None
        self.last_activity = time.monotonic()
        self.error: str | None = None
        self.closed = threading.Event()
        self.session = None
        self.output_claim = 0  # the newest output generator owns the output queue
        self._worker = threading.Thread(target=self._run, name=f"live-{key[:8]}", daemon=True)

    # --- lifecycle -----------------------------------------------------------------------------------------------
    def open(self) -> None:
        """Prefill the system prompt and voice, then start the worker."""
        with self.step_lock, self.loaded.lock:
            self.session = self.loaded.model.duplex_session(
                self.loaded.processor, system_prompt=self.options.system_prompt, ref_audio=self.options.ref_audio,
                generate_audio=self.options.generate_audio, force_listen_count=self.settings.live_force_listen_count,
                listen_bias=self.settings.live_listen_bias,
                max_speak_tokens_per_unit=self.settings.live_max_speak_tokens,
            )
        self._worker.start()

    def reset(self) -> None:
        """Forget the conversation (fresh caches) but keep the session slot and the output stream."""
        with self.step_lock:
            self._raise_if_closed()
            self._drain_inputs()
            self.assembler.reset()
            with self.loaded.lock:
                self.session.reset()
            self.events.clear()
            self.stats = LiveStats()
        self.outputs.put(LiveUpdate(reset=True))

    def close(self, reason: str | None = None) -> None:
        """Stop the worker, end the output stream and free the caches; safe to call more than once."""
        if self.closed.is_set():
            return
        if reason and self.error is None:
            self.error = reason
        self.closed.set()
        self.inputs.put(_STOP)
        if self._worker.is_alive() and threading.current_thread() is not self._worker:
            self._worker.join(timeout=30)
        with self.step_lock:
            if self.session is not None:
                self.session.close()
                self.session = None  # let the KV cache go now, not when the browser state expires
        self.outputs.put(_STOP)

    # --- input side (called from Gradio's stream handlers) ---------------------------------------------------------
    def push_audio(self, rate: int, data: np.ndarray) -> int:
        """Queue every complete 1-s unit of this microphone chunk; returns how many were queued."""
        self._raise_if_closed()
        self.last_activity = time.monotonic()
        units = self.assembler.push(rate, data)
        for unit in units:
            self.inputs.put(unit)
            self.stats.units_in += 1
        while self.inputs.qsize() > self.settings.live_max_backlog_units:  # model slower than real time
            try:
                dropped = self.inputs.get_nowait()
            except queue.Empty:
                break
            if dropped is _STOP:
                self.inputs.put(_STOP)
                break
            self.stats.units_dropped += 1
        return len(units)

    def set_frame(self, frame) -> None:
        if not self.options.audio_only and frame is not None:
            self.latest_frame = frame

    # --- worker -----------------------------------------------------------------------------------------------------
    def _run(self) -> None:
        while not self.closed.is_set():
            unit = self.inputs.get()
            if unit is _STOP:
                return
            try:
                with self.step_lock:
                    if self.closed.is_set():
                        return
                    frame = None if self.options.audio_only else self.latest_frame
                    started = time.perf_counter()
                    with self.loaded.lock:
                        out = self.session.step(unit, frame)
                    elapsed = time.perf_counter() - started
            except Exception as error:  # shown to this user only; other sessions keep running
                message = f"live session stopped: {type(error).__name__}: {error}"
                self.outputs.put(LiveUpdate(error=message))
                self.close(message)
                return
            event = UnitEvent(**out.as_event(timings=False), step_s=elapsed)
            self.events.append(event)
            self.stats.units_done += 1
            self.stats.last_step_s = elapsed
            speech = out.audio if out.audio is not None and out.audio.size else None
            if speech is not None:
                self.stats.speech_s += speech.shape[0] / OUTPUT_RATE
            if speech is None and self.options.generate_audio:
                speech = np.zeros(OUTPUT_RATE, dtype=np.float32)  # keep the output clock running while listening
            self.outputs.put(LiveUpdate(audio=speech, event=event))

    def _drain_inputs(self) -> None:
        while True:
            try:
                item = self.inputs.get_nowait()
            except queue.Empty:
                return
            if item is _STOP:
                self.inputs.put(_STOP)
                return

    def _raise_if_closed(self) -> None:
        if self.closed.is_set():
            raise LiveSessionClosed(self.error or "the live session has ended; press Start for a new one")

    # --- output side ------------------------------------------------------------------------------------------------
    def claim_output(self) -> int:
        """Make the caller the one consumer of the output queue (a second Start replaces the old stream)."""
        self.output_claim += 1
        return self.output_claim

    def updates(self, claim: int, poll_s: float = 0.5) -> Iterator[LiveUpdate]:
        """Blocking iterator over the session's updates; ends when the session closes or another consumer
        claims the queue."""
        while self.output_claim == claim:
            try:
                item = self.outputs.get(timeout=poll_s)
            except queue.Empty:
                if self.closed.is_set() and self.outputs.empty():
                    return
                continue
            if item is _STOP:
                return
            yield item


@dataclass
class LiveSessionManager:
    """At most `settings.max_live_sessions` sessions, keyed by the browser session; idle ones are closed."""

    loaded: LoadedModel
    settings: SpaceSettings
    sessions: dict = field(default_factory=dict)

    def __post_init__(self):
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._reaper = threading.Thread(target=self._reap_forever, name="live-reaper", daemon=True)
        self._reaper.start()

    def start(self, key: str, options: LiveOptions) -> tuple[LiveSession, bool]:
        """(session, created): an already running session of this browser is returned as is."""
        with self._lock:
            current = self.sessions.get(key)
            if current is not None and not current.closed.is_set():
                return current, False
            self.sessions.pop(key, None)
            if len(self.sessions) >= self.settings.max_live_sessions:
                raise LiveSessionsBusy(
                    f"all {self.settings.max_live_sessions} live slots are in use by other visitors; "
                    "please try again in a minute (chat and replay still work)"
                )
            live = LiveSession(key, self.loaded, self.settings, options)
            self.sessions[key] = live  # reserve the slot before the (slow) prefill
        try:
            live.open()
        except Exception:
            with self._lock:
                self.sessions.pop(key, None)
            raise
        return live, True

    def get(self, key: str | None) -> LiveSession | None:
        with self._lock:
            return self.sessions.get(key) if key else None

    def close(self, key: str | None, reason: str | None = None) -> bool:
        with self._lock:
            live = self.sessions.pop(key, None) if key else None
        if live is None:
            return False
        live.close(reason)
        return True

    def active_count(self) -> int:
        with self._lock:
            return sum(not live.closed.is_set() for live in self.sessions.values())

    def close_idle(self, now: float | None = None) -> list[str]:
        """Close sessions without microphone input for `live_idle_timeout_s` (and forget failed ones)."""
        now = time.monotonic() if now is None else now
        with self._lock:
            stale = [key for key, live in self.sessions.items()
                     if live.closed.is_set() or now - live.last_activity > self.settings.live_idle_timeout_s]
        for key in stale:
            self.close(key, "closed after no microphone input for "
                            f"{self.settings.live_idle_timeout_s:.0f} s")
        return stale

    def close_all(self) -> None:
        self._stop.set()
        with self._lock:
            keys = list(self.sessions)
        for key in keys:
            self.close(key, "the server is shutting down")

    def _reap_forever(self) -> None:
        interval = min(5.0, self.settings.live_idle_timeout_s / 4)
        while not self._stop.wait(interval):
            self.close_idle()
