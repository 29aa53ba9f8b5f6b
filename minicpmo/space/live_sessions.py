"""Live full-duplex sessions: one engine session per browser session, all of them stepped together once per
1-s unit by the manager's `LiveTicker`, and a bounded registry with idle timeout.

Data flow: the microphone `.stream` handler only calls `push_audio` (resample + enqueue whole units) and the
webcam handler only stores the latest frame; the ticker takes one unit from every session that has one, steps
them in one batch (`minicpmo.duplex.DuplexEngine`, under the model lock) and puts each session's `LiveUpdate` on
its output queue; the single long-lived output generator of the browser session drains that queue (`updates()`).
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
from .live_ticker import LiveTicker
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
    """Server side of one browser's live conversation; the manager's `LiveTicker` steps it with the others."""

    def __init__(self, key: str, loaded: LoadedModel, settings: SpaceSettings, options: LiveOptions,
                 ticker: LiveTicker):
        self.key, self.loaded, self.settings, self.options, self.ticker = key, loaded, settings, options, ticker
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
        self._close_lock = threading.Lock()

    # --- lifecycle -----------------------------------------------------------------------------------------------
    def open(self) -> None:
        """Prefill the system prompt and voice in the engine, then join the ticks."""
        self.session = self.ticker.open(
            self.key, system_prompt=self.options.system_prompt, ref_audio=self.options.ref_audio,
            generate_audio=self.options.generate_audio, force_listen_count=self.settings.live_force_listen_count,
            listen_bias=self.settings.live_listen_bias, max_speak_tokens_per_unit=self.settings.live_max_speak_tokens,
        )
        self.ticker.add(self)

    def reset(self) -> None:
        """Forget the conversation (fresh caches) but keep the session slot and the output stream."""
        self._raise_if_closed()
        with self.loaded.lock:  # the ticker takes units under this lock: none is in flight while we reset
            self._drain_inputs()
            self.assembler.reset()
            self.ticker.reset(self.key)
            self.events.clear()
            self.stats = LiveStats()
        self.outputs.put(LiveUpdate(reset=True))

    def close(self, reason: str | None = None) -> None:
        """Leave the ticks, end the output stream and free the caches; safe to call more than once."""
        with self._close_lock:
            if self.closed.is_set():
                return
            if reason and self.error is None:
                self.error = reason
            self.closed.set()
        self.ticker.remove(self.key)
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
                self.inputs.get_nowait()
            except queue.Empty:
                break
            self.stats.units_dropped += 1
        if units:
            self.ticker.wake()
        return len(units)

    def set_frame(self, frame) -> None:
        if not self.options.audio_only and frame is not None:
            self.latest_frame = frame

    # --- stepped by the ticker -----------------------------------------------------------------------------------------
    def has_unit(self) -> bool:
        return not self.closed.is_set() and not self.inputs.empty()

    def take_unit(self):
        """The next queued unit with the latest frame, or None."""
        try:
            unit = self.inputs.get_nowait()
        except queue.Empty:
            return None
        return unit, None if self.options.audio_only else self.latest_frame

    def deliver(self, out, elapsed: float) -> None:
        """The ticker's result for this session's unit: a DuplexOutput, or the error that stopped it."""
        if isinstance(out, Exception):  # shown to this user only; other sessions keep running
            message = f"live session stopped: {type(out).__name__}: {out}"
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
                self.inputs.get_nowait()
            except queue.Empty:
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
        self.ticker = LiveTicker(self.loaded, batch_wait_s=self.settings.live_batch_wait_s)
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
            live = LiveSession(key, self.loaded, self.settings, options, self.ticker)
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
        self.ticker.stop()

    def _reap_forever(self) -> None:
        interval = min(5.0, self.settings.live_idle_timeout_s / 4)
        while not self._stop.wait(interval):
            self.close_idle()
