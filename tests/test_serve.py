"""The realtime WebSocket server on the tiny model (in-process, FastAPI's TestClient): events, errors, backpressure."""

import base64
import io
import json

import pytest
from fastapi.testclient import TestClient
from helpers import image, processor, tiny_model, tone

from minicpmo.serve.protocol import MAX_MESSAGE_BYTES, encode_audio
from minicpmo.serve.realtime import create_app

ALWAYS_SPEAK = {"listen_bias": -1e9, "force_listen_count": 0, "max_speak_tokens_per_unit": 4,
                "generate_audio": False}


def audio_event(seconds=1.0, freq=300, rate=16000):
    return {"type": "input_audio_buffer.append", "audio": encode_audio(tone(seconds, freq)), "sample_rate": rate}


def png_event(seed=0):
    buffer = io.BytesIO()
    image(320, 240, seed=seed).save(buffer, format="PNG")
    return {"type": "frame.append", "image": base64.b64encode(buffer.getvalue()).decode()}


def receive_until(ws, kind):
    events = []
    while True:
        event = ws.receive_json()
        events.append(event)
        if event["type"] == kind:
            return events


@pytest.fixture(scope="module")
def app():
    return create_app(tiny_model(), processor(), max_buffer_s=3.0, max_sessions=3)


def test_a_session_streams_units_and_gets_numbered_events(app):
    with TestClient(app) as client, client.websocket_connect("/v1/realtime") as ws:
        assert ws.receive_json()["type"] == "session.created"
        ws.send_json({"type": "session.update", "session": {"instructions": "Be brief.", "controls": ALWAYS_SPEAK}})
        updated = ws.receive_json()
        assert updated["type"] == "session.updated" and updated["session"]["instructions"] == "Be brief."
        decisions = []
        for k in range(3):
            ws.send_json(png_event(k))
            ws.send_json(audio_event(1.0, 300 + 40 * k))
            events = receive_until(ws, "unit.decision")
            decisions.append(events[-1])
        assert [d["unit"] for d in decisions] == [0, 1, 2]
        assert all(d["action"] == "speak" for d in decisions)
        health = client.get("/health").json()
        assert health["status"] == "ok" and health["sessions"] == 1 and health["units"] >= 3


def test_event_ids_count_up_without_gaps(app):
    with TestClient(app) as client, client.websocket_connect("/v1/realtime") as ws:
        ids = [ws.receive_json()["event_id"]]
        ws.send_json({"type": "session.update", "session": {"controls": ALWAYS_SPEAK}})
        ids.append(ws.receive_json()["event_id"])
        ws.send_json(audio_event(2.0))
        events = receive_until(ws, "unit.decision")
        events += receive_until(ws, "unit.decision")
        ids += [e["event_id"] for e in events]
        assert ids == list(range(len(ids)))


@pytest.mark.parametrize("message, code", [
    (json.dumps({"type": "conversation.item.create"}), "unknown_event"),
    ("not json", "invalid_json"),
    (json.dumps(audio_event(rate=44100)), "invalid_sample_rate"),
    (json.dumps({"type": "frame.append", "image": base64.b64encode(b"not an image").decode()}), "invalid_frame"),
    (json.dumps({"type": "input_audio_buffer.append", "audio": "***"}), "invalid_base64"),
    (json.dumps({"type": "session.update", "session": {"controls": {"no_such_control": 1}}}), "invalid_session"),
    (json.dumps({"type": "session.update", "session": {"voice": "alloy"}}), "invalid_session"),
    ("x" * (MAX_MESSAGE_BYTES + 1), "message_too_large"),
])
def test_bad_input_gets_an_error_event_and_the_session_goes_on(app, message, code):
    with TestClient(app) as client, client.websocket_connect("/v1/realtime") as ws:
        ws.receive_json()
        ws.send_text(message)
        error = ws.receive_json()
        assert error["type"] == "error" and error["error"]["code"] == code, error
        ws.send_json({"type": "session.update", "session": {"controls": ALWAYS_SPEAK}})
        assert ws.receive_json()["type"] == "session.updated"
        ws.send_json(audio_event())
        assert receive_until(ws, "unit.decision")[-1]["unit"] == 0


def test_audio_beyond_the_buffer_is_refused_not_kept():
    app = create_app(tiny_model(), processor(), max_buffer_s=1.5)
    with TestClient(app) as client, client.websocket_connect("/v1/realtime") as ws:
        ws.receive_json()
        ws.send_json({"type": "session.update", "session": {"controls": {"generate_audio": False}}})
        ws.receive_json()
        ws.send_json(audio_event(2.0))  # more than the server buffers at once
        error = ws.receive_json()
        assert error["type"] == "error" and error["error"]["code"] == "input_audio_buffer_full"


def test_two_clients_are_stepped_and_answered_separately(app):
    with TestClient(app) as client, client.websocket_connect("/v1/realtime") as one, \
            client.websocket_connect("/v1/realtime") as two:
        ids = {one.receive_json()["session"]["id"], two.receive_json()["session"]["id"]}
        assert len(ids) == 2
        for ws in (one, two):
            ws.send_json({"type": "session.update", "session": {"controls": ALWAYS_SPEAK}})
            ws.receive_json()
        for k in range(2):
            one.send_json(audio_event(1.0, 300 + k))
            two.send_json(audio_event(1.0, 500 + k))
            assert receive_until(one, "unit.decision")[-1]["unit"] == k
            assert receive_until(two, "unit.decision")[-1]["unit"] == k
        assert client.get("/health").json()["sessions"] == 2


def test_the_python_client_talks_to_a_uvicorn_server():
    import threading
    import time

    import uvicorn

    from minicpmo.serve.client import RealtimeClient

    app = create_app(tiny_model(), processor())
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 30
        while not (server.started and server.servers) and time.monotonic() < deadline:
            time.sleep(0.05)
        port = server.servers[0].sockets[0].getsockname()[1]
        with RealtimeClient(f"ws://127.0.0.1:{port}/v1/realtime") as client:
            assert client.session["type"] == "session.created"
            client.update_session(instructions="Be brief.", **ALWAYS_SPEAK)
            assert client.receive(timeout=30)["type"] == "session.updated"
            client.append_frame(image(320, 240))
            client.append_audio(tone(1.0, 300))
            events = []
            for event in client.events(timeout=30):
                events.append(event)
                if event["type"] == "unit.decision":
                    break
            assert events[-1] == {"type": "unit.decision", "unit": 0, "action": "speak", "time_s": 0.0,
                                  "event_id": events[-1]["event_id"]}
    finally:
        server.should_exit = True
        thread.join(timeout=10)
