"""The Live tab in a real headless Chromium (Playwright) with a fake microphone (a wav) and a fake webcam (a .y4m):
start a session, stream both devices, see listen/speak cells and transcript arrive, hear audio, reset, stop."""

import os
import shutil
import socket
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
import soundfile

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

CHROMIUM = Path("/usr/bin/chromium")
pytestmark = pytest.mark.skipif(not CHROMIUM.exists(), reason="needs Debian's /usr/bin/chromium (CI installs it)")

SCREENSHOT_COPY = Path("/tmp/app_live.png")
STATUS_JS = "() => document.querySelector('#live-status textarea, #live-status input').value"
TIMELINE_JS = """() => { const d = document.querySelector('#live-timeline .mc-live');
  return d ? {units: +d.dataset.units, speak: +d.dataset.speak,
              text: d.querySelector('.mc-transcript').innerText} : null }"""
SPEECH_JS = """() => Array.from(document.querySelectorAll('#live-speech audio'))
  .map(a => ({src: a.currentSrc, duration: isFinite(a.duration) ? a.duration : 0, ready: a.readyState}))"""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def fake_devices(folder: Path) -> tuple[Path, Path]:
    """A speech wav for the microphone (espeak-ng, else a warbling tone) and a 2-s test pattern .y4m webcam."""
    mic = folder / "mic.wav"
    if shutil.which("espeak-ng") and subprocess.run(
            ["espeak-ng", "-v", "en-us", "-w", str(mic), "Hello! What do you see on my camera right now?"],
            capture_output=True, check=False).returncode == 0:
        pass
    else:
        t = np.arange(3 * 48000) / 48000
        soundfile.write(mic, (0.3 * np.sin(2 * np.pi * (300 + 100 * np.sin(t)) * t)).astype(np.float32), 48000)
    cam = folder / "cam.y4m"
    if not shutil.which("ffmpeg"):
        pytest.skip("ffmpeg is needed for the fake webcam and for streaming audio output")
    subprocess.run(["ffmpeg", "-nostdin", "-v", "error", "-y", "-f", "lavfi", "-i", "testsrc=size=160x120:rate=10",
                    "-t", "2", "-pix_fmt", "yuv420p", str(cam)], check=True)
    return mic, cam


def poll(page, script: str, done, timeout_s: float):
    deadline = time.monotonic() + timeout_s
    value = None
    while time.monotonic() < deadline:
        value = page.evaluate(script)
        if done(value):
            return value
        time.sleep(0.5)
    raise AssertionError(f"timed out after {timeout_s} s; last value {value!r}")


@pytest.fixture(scope="module")
def app():
    from minicpmo.space import SpaceSettings, build_demo
    from minicpmo.space.model_loading import load_tiny_model  # talks for any input: wiring, not behaviour

    settings = SpaceSettings(max_live_sessions=1, live_force_listen_count=0, live_listen_bias=-1e9,
                             live_max_speak_tokens=4, chat_max_new_tokens=8, chat_max_speech_codes=25)
    demo = build_demo(load_tiny_model(), settings)
    port = free_port()
    demo.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True, show_error=True)
    yield demo, f"http://127.0.0.1:{port}/"
    demo.close()
    demo.minicpmo_live.close_all()


def test_live_tab_streams_webcam_and_microphone_and_speaks(app, tmp_path):
    from playwright.sync_api import sync_playwright

    demo, url = app
    manager = demo.minicpmo_live
    mic, cam = fake_devices(tmp_path)
    args = ["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-quic", "--no-first-run",
            "--disable-background-networking", "--disable-component-update", "--disable-sync",
            "--use-fake-ui-for-media-stream", "--use-fake-device-for-media-stream",
            f"--use-file-for-fake-audio-capture={mic}", f"--use-file-for-fake-video-capture={cam}",
            "--autoplay-policy=no-user-gesture-required"]
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=args)
        try:
            context = browser.new_context(permissions=["microphone", "camera"],
                                          viewport={"width": 1280, "height": 1400})
            page = context.new_page()
            page.goto(url)
            page.get_by_role("tab", name="Live").click()
            page.click("#live-start")
            poll(page, STATUS_JS, lambda s: "started" in (s or "") or "listening" in (s or ""), 60)
            assert manager.active_count() == 1
            key, live = next(iter(manager.sessions.items()))

            page.get_by_text("Click to Access Webcam").click()
            page.get_by_role("button", name="capture photo").click()  # starts streaming frames
            page.get_by_role("button", name="Record", exact=True).click()  # the microphone

            timeline = poll(page, TIMELINE_JS, lambda t: t is not None and t["speak"] >= 3, 90)
            assert timeline["units"] >= 3 and timeline["text"] != "(no speech yet)"
            assert page.locator("#live-timeline .mc-speak").count() >= 3
            speech = poll(page, SPEECH_JS, lambda a: bool(a) and a[0]["duration"] > 0.5, 60)
            assert speech[0]["src"].startswith("blob:")  # the HLS stream feeds the <audio> element
            assert live.latest_frame is not None and live.latest_frame.size[0] > 0  # webcam frames arrived
            assert live.stats.speech_s >= 1.0 and live.stats.units_done >= 3
            assert all(event.action == "speak" for event in live.events)

            shot = tmp_path / "app_live.png"
            page.screenshot(path=str(shot), full_page=True)
            shutil.copy(shot, SCREENSHOT_COPY)

            before = page.evaluate(TIMELINE_JS)["units"]
            page.click("#live-reset")  # fresh caches: the timeline starts again
            poll(page, TIMELINE_JS, lambda t: t is not None and t["units"] < before, 30)
            assert manager.get(key) is live and not live.closed.is_set()

            page.click("#live-stop")
            poll(page, STATUS_JS, lambda s: (s or "").startswith("stopped"), 30)
            assert manager.active_count() == 0 and live.closed.is_set()

            page.click("#live-start")  # a new session, then the tab goes away: unload frees the slot
            poll(page, STATUS_JS, lambda s: "started" in (s or "") or "listening" in (s or ""), 60)
            assert manager.active_count() == 1
            page.close()
            deadline = time.monotonic() + 30
            while manager.active_count() and time.monotonic() < deadline:
                time.sleep(0.5)
            assert manager.active_count() == 0
        finally:
            browser.close()


def test_chat_tab_streams_text_and_speech_then_retries_and_clears(app):
    from playwright.sync_api import sync_playwright

    _, url = app
    bubbles_js = "() => Array.from(document.querySelectorAll('#chatbot .message-row')).map(m => m.innerText.trim())"
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), headless=True,
                                             args=["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                                                   "--autoplay-policy=no-user-gesture-required"])
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 1400})
            page.goto(url)
            page.get_by_label("Message").fill("Say hello.")
            page.click("#chat-send")
            poll(page, "() => document.querySelector('textarea').value", lambda v: v == "", 60)  # sent + cleared
            rows = poll(page, bubbles_js, lambda r: any("Say hello." in text for text in r) and len(r) >= 2, 30)
            answer = rows[-1]
            assert answer and answer != "…"
            speech_js = "() => Array.from(document.querySelectorAll('#chat-speech audio')).map(a => a.currentSrc)"
            first = poll(page, speech_js, lambda srcs: any(src.startswith("blob:") for src in srcs), 60)
            page.click("#chat-retry")
            poll(page, speech_js, lambda srcs: bool(srcs) and srcs != first and srcs[0].startswith("blob:"), 60)
            # The retried turn replaces the last one (greedy decoding: the same answer again).
            rows = poll(page, bubbles_js, lambda r: len(r) == 2 and r[-1] == answer, 30)
            assert rows[0].endswith("Say hello.")
            page.click("#chat-clear")
            poll(page, bubbles_js, lambda r: not any("Say hello." in text for text in r), 30)
        finally:
            browser.close()


def test_chat_example_is_answered_and_spoken_in_one_click(app):
    from playwright.sync_api import sync_playwright

    from minicpmo.space.chat_examples import chat_examples

    _, url = app
    first = chat_examples()[0]
    bubbles_js = "() => Array.from(document.querySelectorAll('#chatbot .message-row')).map(m => m.innerText.trim())"
    speech_js = "() => Array.from(document.querySelectorAll('#chat-speech audio')).map(a => a.currentSrc)"
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), headless=True,
                                             args=["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                                                   "--autoplay-policy=no-user-gesture-required"])
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 1600})
            page.goto(url)
            page.locator("#chat-examples").get_by_text(first.question).first.click()
            rows = poll(page, bubbles_js, lambda r: any(first.question in text for text in r) and len(r) >= 2
                        and r[-1] not in ("", "…"), 60)
            assert first.question in rows[0]
            poll(page, speech_js, lambda srcs: any(src.startswith("blob:") for src in srcs), 60)
        finally:
            browser.close()


def test_live_tab_plays_a_demo_episode_without_webcam_or_microphone(app):
    from playwright.sync_api import sync_playwright

    _, url = app
    view_js = "() => { const i = document.querySelector('#live-episode-view img'); return i ? i.src : null }"
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), headless=True,
                                             args=["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                                                   "--autoplay-policy=no-user-gesture-required"])
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 1600})
            page.goto(url)
            page.get_by_role("tab", name="Live").click()
            page.click("#live-play")
            said = poll(page, "() => document.querySelector('#live-episode-said').innerText", lambda v: "“" in v, 60)
            assert "question" in said
            poll(page, view_js, lambda src: bool(src), 30)  # the scene the model is shown
            timeline = poll(page, TIMELINE_JS, lambda v: v is not None and v["units"] >= 3, 90)
            assert timeline["speak"] >= 1 and timeline["text"].strip()  # the tiny model talks for any input
            page.click("#live-stop")
        finally:
            browser.close()
