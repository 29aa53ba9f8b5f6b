"""A small Python client for `python -m minicpmo.serve` (needs the `websockets` package: the [serve] extra).

    from minicpmo.serve.client import RealtimeClient
    with RealtimeClient("ws://localhost:8000/v1/realtime") as client:
        client.update_session(instructions="Answer briefly.", voice="model")
        for second in chunks:  # 1 s of 16 kHz float32 audio each, sent in real time
            client.append_audio(second)
            client.append_frame(frame_png_bytes)
        for event in client.events(timeout=5.0):
            print(event["type"], event.get("delta", ""))
"""

from __future__ import annotations

import base64
import io
import json

import numpy as np

from .protocol import INPUT_SAMPLE_RATE, encode_audio


class RealtimeClient:
    def __init__(self, url: str, open_timeout: float = 10.0):
        from websockets.sync.client import connect

        self.connection = connect(url, open_timeout=open_timeout, max_size=None)
        self.session = self.receive()  # session.created

    def send(self, event: dict) -> None:
        self.connection.send(json.dumps(event))

    def update_session(self, instructions: str | None = None, voice: str | None = None, **controls) -> None:
        session = {"voice": voice, "controls": controls}
        if instructions is not None:
            session["instructions"] = instructions
        self.send({"type": "session.update", "session": session})

    def append_audio(self, samples: np.ndarray) -> None:
        """float32 16 kHz mono samples (any length; the server cuts 1-s units)."""
        self.send({"type": "input_audio_buffer.append", "audio": encode_audio(np.asarray(samples, np.float32)),
                   "sample_rate": INPUT_SAMPLE_RATE})

    def append_frame(self, image) -> None:
        """A PIL image or encoded JPEG/PNG bytes; the server pairs it with the unit whose audio is arriving (the last
        frame sent during a unit wins)."""
        if not isinstance(image, (bytes, bytearray)):
            buffer = io.BytesIO()
            image.save(buffer, format="PNG")
            image = buffer.getvalue()
        self.send({"type": "frame.append", "image": base64.b64encode(bytes(image)).decode("ascii")})

    def receive(self, timeout: float | None = None) -> dict:
        return json.loads(self.connection.recv(timeout=timeout))

    def events(self, timeout: float = 5.0):
        """Server events until none comes for `timeout` seconds or the server closes."""
        from websockets.exceptions import ConnectionClosed

        while True:
            try:
                yield self.receive(timeout=timeout)
            except (TimeoutError, ConnectionClosed):
                return

    def close(self) -> None:
        from websockets.exceptions import ConnectionClosed

        try:
            self.send({"type": "session.close"})
        except ConnectionClosed:
            pass
        self.connection.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def decode_audio_delta(event: dict) -> np.ndarray:
    """A `response.audio.delta` event -> float32 24 kHz samples."""
    return np.frombuffer(base64.b64decode(event["audio"]), dtype="<i2").astype(np.float32) / 32768.0


__all__ = ["RealtimeClient", "decode_audio_delta"]
