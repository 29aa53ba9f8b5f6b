"""Ray Serve scale-out on a local Ray instance: 2 CPU replicas of the tiny model, sessions spread over both, each
session's events equal to its session stepped alone (`python -m minicpmo.serve --ray --replicas N`)."""

import os
import socket
import threading

import pytest
from helpers import image, processor, tiny_model, tone

ray = pytest.importorskip("ray")  # the [ray] extra (in [dev])

ALWAYS_SPEAK = dict(listen_bias=-1e9, force_listen_count=0, max_speak_tokens_per_unit=4, generate_audio=False)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def ray_url(tmp_path_factory):
    from ray import serve

    from minicpmo.serve import ray_app

    folder = tmp_path_factory.mktemp("tiny_model")
    tiny_model().save_pretrained(folder)
    processor().save_pretrained(folder)
    port = _free_port()
    # a busy 2-core CI machine starts Serve's proxy actor in more than its default 5-s readiness check
    os.environ.setdefault("RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S", "60")
    os.environ.setdefault("RAY_SERVE_PROXY_HEALTH_CHECK_TIMEOUT_S", "60")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        application = ray_app.build_application(str(folder), replicas=2, cpus_per_replica=0.5, gpus_per_replica=0)
        ray_app.run(application, port=port, blocking=False)
        yield f"ws://127.0.0.1:{port}/v1/realtime", folder
    finally:
        serve.shutdown()
        ray.shutdown()


def _stream(i):
    return [(tone(1.0, 220 + 80 * i + 40 * k), image(64, 48, seed=10 * i + k) if k == 0 else None) for k in range(2)]


def test_sessions_spread_over_two_replicas_and_each_matches_its_session_alone(ray_url):
    from minicpmo.duplex.engine import DuplexEngine
    from minicpmo.serve.client import RealtimeClient
    from minicpmo.space.model_loading import load_pretrained

    url, folder = ray_url
    loaded = load_pretrained(folder)
    controls = {i: {**ALWAYS_SPEAK, "listen_bias": [-1e9, 1e9, -1e9, -1e9][i]} for i in range(4)}
    expected = {}
    for i in controls:
        engine = DuplexEngine(loaded.model, loaded.processor)
        engine.open("alone", **controls[i])
        expected[i] = [(o.action, o.text) for o in (engine.step({"alone": unit})["alone"] for unit in _stream(i))]

    clients = {i: RealtimeClient(url, open_timeout=120) for i in controls}  # all open before any streams
    try:
        replicas = {i: client.session["session"]["replica"] for i, client in clients.items()}
        assert len(set(replicas.values())) == 2, replicas  # Serve's router spread the open sessions
        got, failures = {}, []

        def run(i):
            try:
                client = clients[i]
                client.update_session(**controls[i])
                assert client.receive(timeout=120)["type"] == "session.updated"
                for audio, frame in _stream(i):
                    if frame is not None:
                        client.append_frame(frame)
                    client.append_audio(audio)
                events = []
                for event in client.events(timeout=120):
                    events.append(event)
                    if event["type"] == "unit.decision" and event["unit"] == 1:
                        client.send({"type": "session.close"})
                got[i] = events
            except BaseException as error:
                failures.append((i, error))

        threads = [threading.Thread(target=run, args=(i,)) for i in clients]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=300)
    finally:
        for client in clients.values():
            client.close()
    assert not failures, failures
    for i, events in got.items():
        ids = [event["event_id"] for event in events]
        assert ids == list(range(ids[0], ids[0] + len(ids)))
        texts = {}
        for event in events:
            if event["type"] == "response.text.delta":
                texts[event["unit"]] = texts.get(event["unit"], "") + event["delta"]
        decisions = [(e["action"], texts.get(e["unit"], "")) for e in events if e["type"] == "unit.decision"]
        assert decisions == expected[i], i
    assert expected[0] != expected[1]  # speaking and listening sessions: cross-talk would show


def test_health_names_a_replica_and_bad_settings_are_typed_errors(ray_url):
    import json
    import urllib.request

    from minicpmo.serve.ray_app import RayServeError, build_application

    url, _ = ray_url
    health_url = url.replace("ws://", "http://").replace("/v1/realtime", "/health")
    with urllib.request.urlopen(health_url, timeout=60) as response:
        health = json.loads(response.read())
    assert health["status"] == "ok" and health["replica"]
    with pytest.raises(RayServeError, match="replicas must be >= 1"):
        build_application(None, replicas=0)
    with pytest.raises(RayServeError, match="cpus_per_replica > 0"):
        build_application(None, replicas=1, cpus_per_replica=0)
