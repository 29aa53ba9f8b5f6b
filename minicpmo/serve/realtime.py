"""The realtime server: WebSocket sessions on one `DuplexEngine`, stepped together one unit tick at a time.

One asyncio task (the tick loop) collects a unit (1 s of audio, and the last frame that arrived while that second
of audio was arriving) from every session that has one
buffered and hands them to the engine in one call, on the single model thread (all model work, opening and closing
sessions included, runs on that one executor thread, so the model is never used by two threads). Each connection
has its own reader and writer; the tick never waits for a client.

Backpressure: a session buffers at most `max_buffer_s` of audio (more is refused with an `input_audio_buffer_full`
error, the chunk dropped) and at most `max_outbox` unsent events; a client that stops reading past that is dropped
(`slow_consumer`), so no client can grow server memory without bound or hold back the others.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
from fastapi import FastAPI, WebSocket  # the [serve] extra

from ..duplex.engine import DuplexEngine
from ..errors import MiniCPMOError
from .protocol import (
    INPUT_SAMPLE_RATE,
    ProtocolError,
    decode_audio,
    decode_frame,
    error_event,
    parse_event,
    session_settings,
    unit_events,
)

UNIT_SAMPLES = INPUT_SAMPLE_RATE  # one duplex unit is 1 s of 16 kHz audio


@dataclass
class ClientSession:
    """One connection's buffers: pending audio, the frames of the units not taken yet, the events not yet sent.

    A frame belongs to the unit whose audio was arriving when it came (the stream's own clock: samples received so
    far), not to whichever unit the tick takes next, so a server running behind pairs the same frames and audio as
    one keeping up."""

    session_id: str
    outbox: asyncio.Queue
    audio: list = field(default_factory=list)
    buffered: int = 0
    received: int = 0  # samples received since the session (re)opened
    taken: int = 0  # units taken since then
    frames: dict = field(default_factory=dict)  # unit index -> its latest frame (only units not taken yet)
    opened: bool = False
    dropped: bool = False
    event_ids: itertools.count = field(default_factory=itertools.count)

    def send(self, event: dict) -> bool:
        """Queue an event (numbered); False when the outbox is full (the client stopped reading)."""
        if self.dropped:
            return False
        try:
            self.outbox.put_nowait({**event, "event_id": next(self.event_ids)})
            return True
        except asyncio.QueueFull:
            return False

    def ready(self) -> bool:
        return self.opened and not self.dropped and self.buffered >= UNIT_SAMPLES

    def take_unit(self) -> tuple:
        samples = np.concatenate(self.audio)
        unit, rest = samples[:UNIT_SAMPLES], samples[UNIT_SAMPLES:]
        self.audio, self.buffered = ([rest] if len(rest) else []), len(rest)
        frame = self.frames.pop(self.taken, None)
        self.taken += 1
        return unit, frame

    def add_audio(self, samples: np.ndarray) -> None:
        self.audio.append(samples)
        self.buffered += len(samples)
        self.received += len(samples)

    def add_frame(self, frame) -> None:
        self.frames[self.received // UNIT_SAMPLES] = frame

    def clear(self) -> None:
        """Forget buffered input (a re-open starts the stream clock over)."""
        self.audio, self.buffered, self.received, self.taken, self.frames = [], 0, 0, 0, {}


class RealtimeServer:
    """Sessions, the engine and the tick loop (see module docstring); `app()` is the FastAPI application.

    `max_batch`: the most sessions one engine step takes (None: every session with a unit ready; 1: one by one, the
    baseline of `bench/serve_load.py`). `replica` names this server in `/health` and `session.created` when several
    serve one model (the Ray Serve deployment, `minicpmo.serve.ray_app`)."""

    def __init__(self, model, processor, voice_audio=None, name: str = "model", max_buffer_s: float = 5.0,
                 max_outbox: int = 256, max_sessions: int = 16, max_batch: int | None = None,
                 replica: str | None = None):
        if max_batch is not None and int(max_batch) < 1:
            raise ValueError(f"max_batch must be None (all ready sessions) or >= 1, got {max_batch}")
        self.max_batch = None if max_batch is None else int(max_batch)
        self.engine = DuplexEngine(model, processor)
        self.voice_audio = voice_audio
        self.name = name
        self.replica = replica
        self.max_buffer = int(max_buffer_s * INPUT_SAMPLE_RATE)
        self.max_outbox = int(max_outbox)
        self.max_sessions = int(max_sessions)
        self.sessions: dict[str, ClientSession] = {}
        self.ticks = 0
        self.units = 0
        self._ids = itertools.count(1)
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="minicpmo-model")
        self._wake: asyncio.Event | None = None
        self._ticker: asyncio.Task | None = None

    @classmethod
    def load(cls, model: str | None = None, **options) -> RealtimeServer:
        """A server on `model` as the Space loads it (a saved folder, a hub id, or None for the embedded default),
        speaking with that model's own voice reference when it has one."""
        from ..space.model_loading import load_model
        from ..voices import read_audio_16k

        loaded = load_model(model)
        voice = read_audio_16k(loaded.model_voice) if loaded.model_voice else None
        return cls(loaded.model, loaded.processor, voice_audio=voice, name=loaded.name, **options)

    def _named(self, fields: dict) -> dict:
        """`fields` plus this server's replica name, when it has one."""
        return fields if self.replica is None else {**fields, "replica": self.replica}

    # ----------------------------------------------------------------------------------------- application
    def start(self) -> None:
        """Start the tick loop on the running event loop (idempotent: a host without a lifespan calls it per
        connection)."""
        if self._ticker is None:
            self._wake = asyncio.Event()
            self._ticker = asyncio.get_running_loop().create_task(self._tick_loop())

    async def stop(self) -> None:
        if self._ticker is not None:
            self._ticker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._ticker
            self._ticker = None

    def health(self) -> dict:
        return self._named({"status": "ok", "model": self.name, "sessions": len(self.sessions), "ticks": self.ticks,
                            "units": self.units})

    def app(self) -> FastAPI:
        @contextlib.asynccontextmanager
        async def lifespan(_app):
            self.start()
            try:
                yield
            finally:
                await self.stop()

        app = FastAPI(title="minicpmo realtime", lifespan=lifespan)
        app.get("/health")(self.health)

        @app.websocket("/v1/realtime")
        async def realtime(websocket: WebSocket):
            await self.serve(websocket)

        return app

    async def _model(self, function, *args, **kwargs):
        """Run model work on the one model thread."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, lambda: function(*args, **kwargs))

    # ------------------------------------------------------------------------------------------ one client
    async def serve(self, websocket) -> None:
        self.start()
        await websocket.accept()
        if len(self.sessions) >= self.max_sessions:
            await websocket.send_json({**error_event(ProtocolError("server_full", "the server holds "
                                                                   f"{self.max_sessions} sessions")), "event_id": 0})
            await websocket.close(code=1013)
            return
        session = ClientSession(f"sess_{next(self._ids)}", asyncio.Queue(maxsize=self.max_outbox))
        self.sessions[session.session_id] = session
        writer = asyncio.create_task(self._write(websocket, session))
        session.send({"type": "session.created", "session": self._named({"id": session.session_id})})
        try:
            while not session.dropped:
                message = await websocket.receive()
                if message["type"] == "websocket.disconnect":
                    break
                data = message.get("text") if message.get("text") is not None else message.get("bytes")
                try:
                    if not await self._handle(session, parse_event(data or "")):
                        break
                except MiniCPMOError as error:
                    self._send(session, error_event(error))
        finally:
            await self._drop(session)
            with contextlib.suppress(Exception):
                await asyncio.wait_for(session.outbox.join(), timeout=2.0)  # flush what is queued
            writer.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await writer

    async def _write(self, websocket, session: ClientSession) -> None:
        while True:
            event = await session.outbox.get()
            try:
                await websocket.send_json(event)
            finally:
                session.outbox.task_done()

    def _send(self, session: ClientSession, event: dict) -> None:
        if not session.send(event) and not session.dropped:
            session.dropped = True  # stopped reading: dropped at once, so it holds neither memory nor the tick
            asyncio.get_running_loop().create_task(self._drop(session))

    async def _drop(self, session: ClientSession) -> None:
        session.dropped = True
        if self.sessions.pop(session.session_id, None) is not None and session.opened:
            session.opened = False
            await self._model(self.engine.close, session.session_id)
        session.clear()

    async def _handle(self, session: ClientSession, event: dict) -> bool:
        """Apply one client event; False ends the connection."""
        kind = event["type"]
        if kind == "session.close":
            return False
        if kind == "session.update":
            settings = session_settings(event)
            await self._open(session, settings)
            self._send(session, {"type": "session.updated", "session": settings})
        elif kind == "input_audio_buffer.append":
            samples = decode_audio(event)
            if not session.opened:
                await self._open(session, {})
            if session.buffered + len(samples) > self.max_buffer:
                raise ProtocolError("input_audio_buffer_full", f"more than {self.max_buffer / INPUT_SAMPLE_RATE:.1f} "
                                    "s of audio waiting: send in real time (this chunk was dropped)")
            session.add_audio(samples)
            self._wake.set()
        elif kind == "frame.append":
            session.add_frame(decode_frame(event))
        return True

    async def _open(self, session: ClientSession, settings: dict) -> None:
        """(Re)open the engine session with these settings; a re-open starts the conversation over."""
        ref_audio = self.voice_audio if settings.get("voice") == "model" else None
        controls = settings.get("controls", {})

        def reopen():
            if session.session_id in self.engine.sessions:
                self.engine.close(session.session_id)
            try:
                self.engine.open(session.session_id, system_prompt=settings.get("instructions"), ref_audio=ref_audio,
                                 **controls)
            except (TypeError, ValueError) as error:
                raise ProtocolError("invalid_session", f"the session could not open: {error}") from None

        session.opened = False
        await self._model(reopen)
        session.opened = True
        session.clear()

    # ------------------------------------------------------------------------------------------- the tick
    async def _tick_loop(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            while True:
                ready = [session for session in list(self.sessions.values()) if session.ready()]
                if not ready:
                    break
                units = [(session.session_id, session.take_unit()) for session in ready]
                for start in range(0, len(units), self.max_batch or len(units)):
                    await self._step(dict(units[start:start + (self.max_batch or len(units))]))

    async def _step(self, units: dict) -> None:
        """One engine step over `units` and the events it makes, sent to each session."""
        try:
            results = await self._model(self.engine.step, units)
        except Exception as error:  # a model failure: every session of the step hears of it, the loop goes on
            results = {session_id: error for session_id in units}
        self.ticks += 1
        for session_id, result in results.items():
            session = self.sessions.get(session_id)
            if session is None:
                continue
            if isinstance(result, Exception):
                self._send(session, error_event(result))
                continue
            self.units += 1
            for event in unit_events(result):
                self._send(session, event)


def create_app(model, processor, voice_audio=None, name: str = "model", **options):
    """The FastAPI app serving `model` (see `RealtimeServer` for options)."""
    return RealtimeServer(model, processor, voice_audio=voice_audio, name=name, **options).app()


__all__ = ["ClientSession", "RealtimeServer", "create_app"]
