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
    from minicpmo.serve.client import RealtimeClient
    from minicpmo.serve.local import running_server

    with running_server(create_app(tiny_model(), processor())) as url, RealtimeClient(url) as client:
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


def test_a_frame_goes_with_the_unit_whose_audio_was_arriving_however_late_the_tick():
    import asyncio

    import numpy as np

    from minicpmo.serve.realtime import ClientSession

    session = ClientSession("s", asyncio.Queue())
    first, second = image(32, 32, seed=1), image(32, 32, seed=2)
    session.add_audio(tone(0.5))
    session.add_frame(first)  # during unit 0
    session.add_audio(tone(0.5))
    session.add_frame(second)  # after unit 0's last sample: unit 1's, though unit 0 is not taken yet
    session.add_audio(tone(1.2))
    unit0, frame0 = session.take_unit()
    unit1, frame1 = session.take_unit()
    assert frame0 is first and frame1 is second and len(unit0) == len(unit1) == 16000
    assert session.buffered == int(0.2 * 16000) and session.frames == {}
    session.add_frame(first)
    session.clear()
    assert (session.received, session.taken, session.frames, session.buffered) == (0, 0, {}, 0)
    np.testing.assert_array_equal(unit1[:8000], tone(1.2)[:8000])


@pytest.mark.parametrize("max_batch", [None, 1])
def test_concurrent_clients_on_uvicorn_get_their_own_events_in_order(max_batch):
    """Three clients stream at once (faster than the server steps): each one's event ids count up without gaps, its
    units come in order, and its decisions and text equal its session stepped alone."""
    import threading

    from minicpmo.duplex.engine import DuplexEngine
    from minicpmo.serve.client import RealtimeClient
    from minicpmo.serve.local import running_server

    model, proc = tiny_model(), processor()
    streams = {i: [(tone(1.0, 200 + 90 * i + 30 * k), image(64, 48, seed=10 * i + k) if k != 1 else None)
                   for k in range(3)] for i in range(3)}
    controls = {i: {**ALWAYS_SPEAK, "listen_bias": [-1e9, -1e9, 1e9][i]} for i in streams}
    expected = {}
    for i, stream in streams.items():
        engine = DuplexEngine(model, proc)
        engine.open("alone", **controls[i])
        outs = [engine.step({"alone": unit})["alone"] for unit in stream]
        expected[i] = [(o.action, o.text) for o in outs]
    got, failures = {}, []

    def client_run(i, url):
        try:
            with RealtimeClient(url) as client:
                client.update_session(**controls[i])
                assert client.receive(timeout=60)["type"] == "session.updated"
                for audio, frame in streams[i]:
                    if frame is not None:
                        client.append_frame(frame)
                    client.append_audio(audio[:7000])
                    client.append_audio(audio[7000:])
                events = []
                for event in client.events(timeout=60):  # until the server closes: unit 2's text comes after its
                    events.append(event)                  # decision, and the server sends what it queued first
                    if event["type"] == "unit.decision" and event["unit"] == 2:
                        client.send({"type": "session.close"})
                got[i] = events
        except BaseException as error:
            failures.append((i, error))

    with running_server(create_app(model, proc, max_batch=max_batch)) as url:
        threads = [threading.Thread(target=client_run, args=(i, url)) for i in streams]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=120)
    assert not failures
    for i, events in got.items():
        ids = [event["event_id"] for event in events]
        assert ids == list(range(ids[0], ids[0] + len(ids)))
        assert [e["unit"] for e in events if e["type"] == "unit.decision"] == [0, 1, 2]
        texts = {}
        for e in events:
            if e["type"] == "response.text.delta":
                texts[e["unit"]] = texts.get(e["unit"], "") + e["delta"]
        decisions = [(e["action"], texts.get(e["unit"], "")) for e in events if e["type"] == "unit.decision"]
        assert decisions == expected[i]
    assert expected[0] != expected[1] and expected[1] != expected[2]  # the streams differ, so cross-talk would show
    assert all(action == "speak" and text for action, text in expected[0])
