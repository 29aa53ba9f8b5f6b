"""The Gradio Space (app.py + minicpmo/space): server-side live sessions, and the running app driven through
gradio_client (named endpoints, chat with text + image + audio (+ video), replay, errors isolated per caller)."""

import concurrent.futures
import importlib.util
import os
import shutil
import socket
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
import soundfile
from PIL import Image

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

from minicpmo.space import SpaceSettings, build_demo  # noqa: E402
from minicpmo.space.model_loading import load_tiny_model  # noqa: E402
from minicpmo.space.audio_io import UnitAssembler, browser_chunk_to_mono, to_int16  # noqa: E402
from minicpmo.space.live_sessions import LiveOptions, LiveSessionManager, LiveSessionsBusy  # noqa: E402
from minicpmo.space.live_view import render_timeline  # noqa: E402
from minicpmo.space.settings import SpaceSettingsError  # noqa: E402
from minicpmo.voices import load_voice  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[1]
# Short answers so the tiny random model keeps the suite fast; the live model always speaks.
FAST = SpaceSettings(max_live_sessions=2, chat_max_new_tokens=8, chat_max_speech_codes=25, live_force_listen_count=0,
                     live_listen_bias=-1e9, live_max_speak_tokens=4, live_idle_timeout_s=60.0)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def speech_wav(path: Path, text: str = "Hello, can you see the red square?", seconds: float | None = None) -> Path:
    """espeak-ng speech when available, else a two-tone signal; written at 16 kHz mono."""
    audio = None
    if shutil.which("espeak-ng"):
        raw = path.with_suffix(".espeak.wav")
        result = subprocess.run(["espeak-ng", "-v", "en-us", "-w", str(raw), text], capture_output=True, check=False)
        if result.returncode == 0 and raw.is_file():
            from minicpmo.voices import read_audio_16k

            audio = read_audio_16k(raw)
    if audio is None:
        t = np.arange(int(2.0 * 16000)) / 16000
        audio = (0.2 * np.sin(2 * np.pi * 220 * t) + 0.1 * np.sin(2 * np.pi * 660 * t)).astype(np.float32)
    if seconds is not None:
        fixed = np.zeros(int(round(seconds * 16000)), dtype=np.float32)
        fixed[: min(fixed.size, audio.size)] = audio[: fixed.size]
        audio = fixed
    soundfile.write(path, audio, 16000)
    return path


@pytest.fixture(scope="module")
def loaded():
    # Wiring checks: the random tiny model talks (text and speech) for any input, so every endpoint's output can be
    # checked for content; the trained default model's behaviour is tested in test_demo_model.py.
    return load_tiny_model()


@pytest.fixture(scope="module")
def media(tmp_path_factory):
    folder = tmp_path_factory.mktemp("app_media")
    image = folder / "square.png"
    canvas = np.full((96, 128, 3), 255, dtype=np.uint8)
    canvas[20:70, 30:90] = (220, 20, 20)
    Image.fromarray(canvas).save(image)
    corrupt = folder / "corrupt.wav"
    corrupt.write_bytes(b"RIFF\x10\x00\x00\x00WAVEfmt garbage that is not audio" * 3)
    video = folder / "clip.mp4"
    if shutil.which("ffmpeg"):
        subprocess.run(["ffmpeg", "-nostdin", "-v", "error", "-y", "-f", "lavfi", "-i", "testsrc=size=96x64:rate=10",
                        "-f", "lavfi", "-i", "sine=frequency=330:sample_rate=16000", "-t", "2", "-pix_fmt",
                        "yuv420p", "-c:v", "libx264", "-c:a", "aac", "-shortest", str(video)], check=True)
    return {"image": image, "speech": speech_wav(folder / "speech.wav", seconds=2.5), "corrupt": corrupt,
            "video": video if video.is_file() else None}


@pytest.fixture(scope="module")
def app(loaded):
    demo = build_demo(loaded, FAST)
    port = free_port()
    demo.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True, show_error=True)
    yield demo, f"http://127.0.0.1:{port}/"
    demo.close()
    demo.minicpmo_live.close_all()


@pytest.fixture(scope="module")
def client(app):
    from gradio_client import Client

    return Client(app[1], verbose=False, analytics_enabled=False)


# --- pieces without a server ---------------------------------------------------------------------------------------
def test_unit_assembler_cuts_exact_one_second_units_from_browser_chunks():
    rate = 48000
    t = np.arange(int(2.6 * rate)) / rate
    stereo = np.stack([np.sin(2 * np.pi * 440 * t)] * 2, axis=1) * 0.5
    chunks = np.array_split(to_int16(stereo), 7)  # uneven browser chunks
    assembler = UnitAssembler()
    units = [unit for chunk in chunks for unit in assembler.push(rate, chunk)]
    assert len(units) == 2 and all(u.shape == (16000,) and u.dtype == np.float32 for u in units)
    spectrum = np.abs(np.fft.rfft(units[1]))
    assert abs(int(spectrum.argmax()) - 440) <= 1  # 1 Hz bins: the tone survives resampling
    assert np.isclose(np.abs(units[1]).max(), 0.5, atol=0.02)
    assert assembler.pending.shape[0] == int(0.6 * rate)
    assert np.allclose(browser_chunk_to_mono(np.array([16384, -16384], np.int16)), [0.5, -0.5])


def test_settings_from_env_and_typed_errors(monkeypatch):
    monkeypatch.setenv("MAX_LIVE_SESSIONS", "3")
    monkeypatch.setenv("MINICPMO_LIVE_LISTEN_BIAS", "-7.5")
    settings = SpaceSettings.from_env()
    assert settings.max_live_sessions == 3 and settings.live_listen_bias == -7.5
    monkeypatch.setenv("MAX_LIVE_SESSIONS", "two")
    with pytest.raises(SpaceSettingsError, match="MAX_LIVE_SESSIONS"):
        SpaceSettings.from_env()
    with pytest.raises(SpaceSettingsError, match="must be >= 1"):
        SpaceSettings(max_live_sessions=0)


def test_app_cli_arguments():
    spec = importlib.util.spec_from_file_location("space_app", REPO_ROOT / "app.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    args = module.parse_args(["--model", "some/folder", "--host", "127.0.0.1", "--port", "7999"])
    assert (args.model, args.host, args.port) == ("some/folder", "127.0.0.1", 7999)
    assert module.parse_args([]).model is None


def test_live_sessions_are_bounded_stepped_in_units_and_cleaned_up(loaded):
    manager = LiveSessionManager(loaded, FAST)
    try:
        options = LiveOptions(system_prompt="Remind me to drink water.", ref_audio=load_voice("en_dlc"))
        live, created = manager.start("browser-a", options)
        assert created and manager.start("browser-a", options) == (live, False)  # a second Start reuses it
        manager.start("browser-b", LiveOptions("Streaming Omni Conversation.", None, generate_audio=False,
                                               audio_only=True))
        with pytest.raises(LiveSessionsBusy, match="all 2 live slots"):
            manager.start("browser-c", options)

        claim = live.claim_output()
        rate = 48000
        mic = to_int16(0.1 * np.random.default_rng(0).standard_normal(int(2.25 * rate)))
        for chunk in np.array_split(mic, 9):
            live.push_audio(rate, chunk)
        live.set_frame(Image.new("RGB", (64, 48), "red"))
        updates = []
        for update in live.updates(claim, poll_s=0.2):
            updates.append(update)
            if len(updates) == 2:
                break
        assert [u.event.unit for u in updates] == [0, 1]
        assert all(u.event.action == "speak" for u in updates)  # listen bias -1e9: the tiny model talks
        assert all(u.audio is not None and u.audio.dtype == np.float32 and u.audio.size > 0 for u in updates)
        html = render_timeline(live.events)
        assert 'data-units="2"' in html and 'data-speak="2"' in html and html.count("mc-speak") == 2

        live.reset()
        assert live.events == [] and next(live.updates(claim, poll_s=0.2)).reset

        assert manager.close_idle(now=time.monotonic() + 3600) == ["browser-a", "browser-b"]
        assert manager.active_count() == 0 and live.closed.is_set() and live.session is None
        assert "no microphone input" in live.error
        assert list(live.updates(claim, poll_s=0.1)) == []  # the output stream ends
        manager.start("browser-c", options)  # the slots are free again
    finally:
        manager.close_all()


def test_two_browser_sessions_are_stepped_in_one_batch_and_each_gets_its_own_outputs(loaded):
    manager = LiveSessionManager(loaded, FAST)
    options = {"a": LiveOptions("Remind me to drink water.", load_voice("en_dlc")),
               "b": LiveOptions("Streaming Omni Conversation.", None, generate_audio=False)}
    rng = np.random.default_rng(4)
    mics = {key: to_int16(0.1 * rng.standard_normal(2 * 48000)) for key in options}
    frames = {"a": Image.new("RGB", (64, 48), "red"), "b": Image.new("RGB", (40, 40), "blue")}
    try:
        lives = {key: manager.start(key, option)[0] for key, option in options.items()}
        claims = {key: live.claim_output() for key, live in lives.items()}
        with loaded.lock:  # the ticker takes units under the model lock: both sessions' units are queued first
            for key, live in lives.items():
                live.set_frame(frames[key])
                assert live.push_audio(48000, mics[key]) == 2
        updates = {}
        for key, live in lives.items():
            stream = live.updates(claims[key], poll_s=0.2)
            updates[key] = [next(stream), next(stream)]
        assert [set(batch) for batch in list(manager.ticker.batches)[:2]] == [{"a", "b"}, {"a", "b"}]
    finally:
        manager.close_all()
    assert manager.ticker.engine.sessions == {}
    for key, option in options.items():  # each browser session gets what its session stepped alone gives
        alone = loaded.model.duplex_session(
            loaded.processor, system_prompt=option.system_prompt, ref_audio=option.ref_audio,
            generate_audio=option.generate_audio, force_listen_count=FAST.live_force_listen_count,
            listen_bias=FAST.live_listen_bias, max_speak_tokens_per_unit=FAST.live_max_speak_tokens)
        for unit, update in zip(UnitAssembler().push(48000, mics[key]), updates[key], strict=True):
            out = alone.step(unit, frames[key])
            assert {k: v for k, v in vars(update.event).items() if k != "step_s"} == out.as_event(timings=False)
            if option.generate_audio:
                np.testing.assert_allclose(update.audio, out.audio, atol=1e-4)
            else:
                assert update.audio is None and out.audio is None
        alone.close()


# --- the running app through gradio_client ---------------------------------------------------------------------------
def test_named_endpoints(client):
    info = client.view_api(print_info=False, return_format="dict")
    assert set(info["named_endpoints"]) == {"/chat", "/replay"}
    names = [p["parameter_name"] for p in info["named_endpoints"]["/chat"]["parameters"]]
    assert names == ["text", "image", "audio", "video", "voice", "voice_upload", "thinking", "speak"]
    assert not info["unnamed_endpoints"]


def test_chat_endpoint_with_text_image_and_audio(client, media):
    from gradio_client import handle_file

    text, speech = client.predict("What do you see and hear?", handle_file(str(media["image"])),
                                  handle_file(str(media["speech"])), None, "minicpm_signature", None, False, True,
                                  api_name="/chat")
    assert isinstance(text, str) and text.strip()
    info = soundfile.info(speech)
    assert info.samplerate == 24000 and info.frames > 0
    wav, _ = soundfile.read(speech, dtype="float32")
    assert np.isfinite(wav).all() and np.abs(wav).max() > 0


def test_chat_endpoint_with_video_and_voice_cloning_text_only(client, media):
    if media["video"] is None:
        pytest.skip("ffmpeg is needed to make the test video")
    from gradio_client import handle_file

    text, speech = client.predict("Describe the clip.", None, None, handle_file(str(media["video"])),
                                  "en_dlc", handle_file(str(media["speech"])), True, False, api_name="/chat")
    assert isinstance(text, str) and text.strip() and speech is None  # speech off -> no audio file


def test_replay_endpoint_keeps_the_input_duration(client, media):
    from gradio_client import handle_file

    events, output, summary = client.predict(handle_file(str(media["speech"])), "Streaming Omni Conversation.",
                                             "en_dlc", None, True, api_name="/replay")
    rows = events["data"]
    assert [row[0] for row in rows] == [0, 1, 2] and [row[1] for row in rows] == [0.0, 1.0, 2.0]
    assert {row[2] for row in rows} == {"speak"}
    info = soundfile.info(output)
    assert info.samplerate == 24000 and info.frames == int(2.5 * 24000)  # == input duration (2.5 s)
    assert "3 units" in summary


def test_a_corrupt_upload_fails_only_for_its_caller(client, media):
    from gradio_client import handle_file
    from gradio_client.exceptions import AppError

    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        bad = pool.submit(client.predict, "hi", None, handle_file(str(media["corrupt"])), None, "en_dlc", None,
                          False, False, api_name="/chat")
        good = pool.submit(client.predict, "hello", None, None, None, "en_dlc", None, False, False,
                           api_name="/chat")
        with pytest.raises(AppError, match="cannot read the audio file"):
            bad.result(timeout=120)
        text, speech = good.result(timeout=120)
    assert isinstance(text, str) and text.strip() and speech is None
    with pytest.raises(AppError, match="message is empty"):
        client.predict("", None, None, None, "en_dlc", None, False, False, api_name="/chat")
    with pytest.raises(AppError, match="no_such_voice"):
        client.predict("hi", None, None, None, "no_such_voice", None, False, True, api_name="/chat")


def test_model_choice_flag_env_var_and_deterministic_default(loaded, tmp_path, monkeypatch):
    from minicpmo.space import load_model

    again = load_tiny_model()
    first_name, first = next(iter(loaded.model.state_dict().items()))
    assert again.model.state_dict()[first_name].equal(first)  # the fallback default is reproducible
    folder = tmp_path / "checkpoint"
    loaded.model.save_pretrained(folder)
    loaded.processor.save_pretrained(folder)
    monkeypatch.setenv("MINICPMO_MODEL", str(folder))
    from_env = load_model(None)
    assert from_env.name == str(folder) and from_env.model.state_dict()[first_name].equal(first)
    monkeypatch.setenv("MINICPMO_MODEL", str(tmp_path / "missing"))
    assert load_model(str(folder)).name == str(folder)  # --model wins over the environment


def test_replay_endpoint_accepts_a_video(client, media):
    if media["video"] is None:
        pytest.skip("ffmpeg is needed to make the test video")
    from gradio_client import handle_file

    events, output, summary = client.predict(handle_file(str(media["video"])), "Describe what you see.", "en_dlc",
                                             None, False, api_name="/replay")
    from minicpmo.duplex.replay import read_recording

    audio, frames = read_recording(media["video"])  # the mp4's own audio track (AAC pads it a little)
    assert len(frames) == len(events["data"]) >= 2 and f"{len(frames)} units" in summary
    info = soundfile.info(output)
    assert info.samplerate == 24000 and info.frames == round(audio.shape[0] / 16000 * 24000)
