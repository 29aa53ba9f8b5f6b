"""python -m minicpmo.duplex.replay: events.jsonl + a time-synchronous output.wav of the input's length."""

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
import soundfile
from helpers import tone


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    out = tmp_path_factory.mktemp("replay") / "tiny"
    subprocess.run([sys.executable, "-m", "minicpmo.export", "--tiny", str(out)], check=True)
    return out


def test_replay_wav_writes_events_and_synchronous_output(exported, tmp_path):
    wav_path = tmp_path / "input.wav"
    audio = np.concatenate([tone(2.0, 300), np.zeros(8000, np.float32), tone(1.0, 500)])  # 3.5 s
    soundfile.write(wav_path, audio, 16000)
    out = tmp_path / "out"
    subprocess.run([sys.executable, "-m", "minicpmo.duplex.replay", str(wav_path), "--model", str(exported),
                    "--out", str(out), "--force-listen-count", "1"], check=True)
    events = [json.loads(line) for line in (out / "events.jsonl").read_text().splitlines()]
    assert [e["unit"] for e in events] == [0, 1, 2, 3]  # ceil(3.5 s) units
    assert events[0]["action"] == "listen" and {e["action"] for e in events} <= {"listen", "speak"}
    assert all(set(e["timings"]) >= {"audio", "prefill", "decode"} for e in events)
    info = soundfile.info(out / "output.wav")
    assert info.samplerate == 24000 and info.frames == int(round(3.5 * 24000))


@pytest.mark.skipif(shutil.which("ffmpeg") is None, reason="needs the ffmpeg binary")
def test_replay_reads_video_frames_and_audio(exported, tmp_path):
    from minicpmo.duplex.replay import read_recording

    video = tmp_path / "clip.mp4"
    subprocess.run(["ffmpeg", "-v", "error", "-f", "lavfi", "-i", "testsrc=size=160x120:rate=10:duration=3",
                    "-f", "lavfi", "-i", "sine=frequency=440:duration=3:sample_rate=16000", "-shortest",
                    "-pix_fmt", "yuv420p", str(video)], check=True)
    audio, frames = read_recording(video)
    assert len(frames) == 3 and all(f is not None for f in frames)
    assert abs(audio.shape[0] - 48000) < 1600
