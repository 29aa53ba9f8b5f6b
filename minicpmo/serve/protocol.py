"""The realtime session protocol: JSON events in the OpenAI Realtime style, parsed and checked without a model.

Client events: `session.update` {session: {instructions, voice ("model" or none), controls: {DuplexConfig fields}}},
`input_audio_buffer.append` {audio: base64 little-endian PCM16 mono, sample_rate: 16000}, `frame.append`
{image: base64 JPEG/PNG}, `session.close`. Server events: `session.created`, `session.updated`, `unit.decision`
{unit, action, time_s}, `response.text.delta` {unit, delta}, `response.audio.delta` {unit, audio: base64 PCM16,
sample_rate: 24000}, `response.done` {unit} (turn end), `response.interrupted` {unit} (barge-in), `error` {code,
message}. Every server event carries `event_id` (its number on the session: clients can check none was lost or
reordered).
"""

from __future__ import annotations

import base64
import binascii
import io
import json
from dataclasses import fields

import numpy as np

from ..duplex.duplex_config import DuplexConfig
from ..errors import DuplexError

INPUT_SAMPLE_RATE = 16000
OUTPUT_SAMPLE_RATE = 24000
MAX_MESSAGE_BYTES = 4 * 1024 * 1024  # a 1-s PCM16 chunk is 43 kB in base64, a 1080p JPEG well under 1 MB
CLIENT_EVENTS = ("session.update", "input_audio_buffer.append", "frame.append", "session.close")
SESSION_FIELDS = ("instructions", "voice", "controls")
# Controls a client may set: every DuplexConfig field.
CONTROL_FIELDS = tuple(f.name for f in fields(DuplexConfig))


class ProtocolError(DuplexError):
    """A client event the server cannot take; `code` names the problem for the error event."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code


def parse_event(message: str | bytes) -> dict:
    """A client message -> its event dict (checked: size, JSON object, known type)."""
    if len(message) > MAX_MESSAGE_BYTES:
        raise ProtocolError("message_too_large", f"message of {len(message)} bytes; the limit is {MAX_MESSAGE_BYTES}")
    try:
        event = json.loads(message)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ProtocolError("invalid_json", f"the message is not JSON: {error}") from None
    if not isinstance(event, dict) or not isinstance(event.get("type"), str):
        raise ProtocolError("invalid_event", "an event is a JSON object with a string `type`")
    if event["type"] not in CLIENT_EVENTS:
        raise ProtocolError("unknown_event", f"unknown event type {event['type']!r}; known: {', '.join(CLIENT_EVENTS)}")
    return event


def _b64(event: dict, key: str) -> bytes:
    value = event.get(key)
    if not isinstance(value, str):
        raise ProtocolError("invalid_event", f"{event['type']} needs a base64 string `{key}`")
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise ProtocolError("invalid_base64", f"`{key}` of {event['type']} is not valid base64") from None


def decode_audio(event: dict) -> np.ndarray:
    """`input_audio_buffer.append` -> float32 samples at 16 kHz."""
    rate = event.get("sample_rate", INPUT_SAMPLE_RATE)
    if rate != INPUT_SAMPLE_RATE:
        raise ProtocolError("invalid_sample_rate", f"audio must be {INPUT_SAMPLE_RATE} Hz mono PCM16, got {rate!r} Hz")
    raw = _b64(event, "audio")
    if len(raw) % 2:
        raise ProtocolError("invalid_audio", f"PCM16 audio has an even number of bytes, got {len(raw)}")
    return np.frombuffer(raw, dtype="<i2").astype(np.float32) / 32768.0


def decode_frame(event: dict):
    """`frame.append` -> an RGB PIL image."""
    from PIL import Image, UnidentifiedImageError

    raw = _b64(event, "image")
    try:
        image = Image.open(io.BytesIO(raw))
        image.load()
    except (UnidentifiedImageError, OSError, ValueError) as error:
        raise ProtocolError("invalid_frame", f"the frame is not a readable JPEG/PNG image: {error}") from None
    return image.convert("RGB")


def _checked_object(value, known: tuple, what: str, code: str) -> dict:
    """`value` must be a JSON object whose keys are all in `known`."""
    if not isinstance(value, dict):
        raise ProtocolError(code, f"{what} must be a JSON object")
    unknown = sorted(set(value) - set(known))
    if unknown:
        raise ProtocolError("invalid_session", f"unknown {what} fields {unknown}; known: {list(known)}")
    return value


def session_settings(event: dict) -> dict:
    """`session.update` -> {instructions, voice, controls} (only the fields given), checked."""
    session = _checked_object(event.get("session", {}), SESSION_FIELDS, "session.update's `session`", "invalid_event")
    if "instructions" in session and not isinstance(session["instructions"], (str, type(None))):
        raise ProtocolError("invalid_session", "`instructions` is a string")
    if session.get("voice") not in (None, "model"):
        raise ProtocolError("invalid_session", f"`voice` is \"model\" (the model's own voice) or null, "
                                               f"got {session['voice']!r}")
    _checked_object(session.get("controls", {}), CONTROL_FIELDS, "`controls` (DuplexConfig)", "invalid_session")
    return session


def encode_audio(samples: np.ndarray) -> str:
    """float32 [-1, 1] -> base64 PCM16."""
    pcm = (np.clip(samples, -1.0, 1.0) * 32767.0).round().astype("<i2")
    return base64.b64encode(pcm.tobytes()).decode("ascii")


def unit_events(out) -> list[dict]:
    """One unit's DuplexOutput -> the server events it makes (decision, text, audio, turn end / barge-in)."""
    events = [{"type": "unit.decision", "unit": out.unit_index, "action": out.action, "time_s": out.time_s}]
    if out.text:
        events.append({"type": "response.text.delta", "unit": out.unit_index, "delta": out.text})
    if out.audio is not None and len(out.audio):
        events.append({"type": "response.audio.delta", "unit": out.unit_index, "audio": encode_audio(out.audio),
                       "sample_rate": OUTPUT_SAMPLE_RATE})
    if out.interrupted:
        events.append({"type": "response.interrupted", "unit": out.unit_index})
    elif out.end_of_turn:
        events.append({"type": "response.done", "unit": out.unit_index})
    return events


def error_event(error: Exception) -> dict:
    code = getattr(error, "code", None) or type(error).__name__
    return {"type": "error", "error": {"code": code, "message": str(error)}}


__all__ = ["CLIENT_EVENTS", "INPUT_SAMPLE_RATE", "MAX_MESSAGE_BYTES", "OUTPUT_SAMPLE_RATE", "ProtocolError",
           "decode_audio", "decode_frame", "encode_audio", "error_event", "parse_event", "session_settings",
           "unit_events"]
