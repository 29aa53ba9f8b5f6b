"""Loading of chat media for MiniCPM-o: images, 16 kHz mono audio, and videos as 1-fps frames plus audio.

Paths are read locally (PIL, soundfile, the `ffmpeg` binary for videos); URLs are never fetched. Videos are
expanded the official way: frames at 1 fps (at most 64, uniformly subsampled beyond that), each followed by
the audio of its second, and the conversation is rendered in omni mode (items joined with "").
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from typing import Any

import numpy as np
from PIL import Image

from ..audio_utils import read_audio_file
from ..errors import PromptError
from .feature_extraction_minicpmo import SAMPLING_RATE, validate_waveform


MAX_NUM_FRAMES = 64
FRAME_GRID_FPS = 10


class MediaLoadingError(PromptError):
    """A media item that cannot be loaded: missing or corrupt file, URL, unsupported value."""


def _is_url(value: str) -> bool:
    return value.startswith(("http://", "https://", "ftp://", "data:"))


def _check_local_path(value: Any, kind: str) -> str:
    path = os.fspath(value)
    if _is_url(path):
        raise MediaLoadingError(f"{kind} {path!r} is a URL: MiniCPM-o does not download media, pass a local file")
    if not os.path.isfile(path):
        raise MediaLoadingError(f"{kind} file not found: {path!r}")
    return path


def load_image(value: Any) -> Any:
    """PIL image from a local path; PIL images, numpy arrays and tensors pass through unchanged."""
    if isinstance(value, (str, os.PathLike)):
        path = _check_local_path(value, "image")
        try:
            with Image.open(path) as handle:
                return handle.convert("RGB")
        except (OSError, Image.DecompressionBombError) as error:
            raise MediaLoadingError(f"cannot read image file {path!r}: {error}") from error
    return value


def resample_audio(waveform: np.ndarray, orig_rate: int, target_rate: int = SAMPLING_RATE) -> np.ndarray:
    """Resample a mono float32 waveform with torchaudio (band-limited sinc interpolation)."""
    if int(orig_rate) == int(target_rate):
        return waveform
    import torch
    import torchaudio.functional as audio_functional

    tensor = torch.from_numpy(np.ascontiguousarray(waveform, dtype=np.float32))
    return audio_functional.resample(tensor, int(orig_rate), int(target_rate)).numpy()


def load_audio(value: Any, sampling_rate: int | None = None) -> np.ndarray:
    """16 kHz mono float32 waveform from a local audio file (channels averaged) or an array at `sampling_rate`."""
    if isinstance(value, (str, os.PathLike)):
        import soundfile

        path = _check_local_path(value, "audio")
        try:
            mono, file_rate = read_audio_file(path)
        except (RuntimeError, soundfile.LibsndfileError) as error:
            raise MediaLoadingError(f"cannot read audio file {path!r}: {error}") from error
        waveform = validate_waveform(mono, name=f"audio file {path!r}")
        return resample_audio(waveform, file_rate)
    waveform = validate_waveform(value)
    return resample_audio(waveform, sampling_rate or SAMPLING_RATE)


def _run_ffmpeg(arguments: list[str], what: str) -> bytes:
    binary = shutil.which("ffmpeg")
    if binary is None:
        raise MediaLoadingError(f"reading {what} needs the `ffmpeg` binary on PATH (e.g. apt-get install ffmpeg)")
    result = subprocess.run([binary, "-nostdin", "-v", "error", *arguments], capture_output=True, check=False)
    if result.returncode != 0:
        raise MediaLoadingError(f"ffmpeg failed on {what}: {result.stderr.decode(errors='replace').strip()}")
    return result.stdout


def read_video_file(path: Any) -> tuple[list[Image.Image], np.ndarray | None, float]:
    """Frames on a 10-fps grid, the 16 kHz mono audio track (None if there is none) and the fps of the frames."""
    path = _check_local_path(path, "video")
    with tempfile.TemporaryDirectory() as folder:
        _run_ffmpeg(["-i", path, "-vf", f"fps={FRAME_GRID_FPS}", os.path.join(folder, "%06d.png")], f"video {path!r}")
        names = sorted(name for name in os.listdir(folder) if name.endswith(".png"))
        frames = []
        for name in names:
            with Image.open(os.path.join(folder, name)) as handle:
                frames.append(handle.convert("RGB"))
    if not frames:
        raise MediaLoadingError(f"video {path!r} has no frames")
    probe = subprocess.run(
        [shutil.which("ffmpeg"), "-nostdin", "-v", "error", "-i", path, "-map", "0:a:0", "-ac", "1",
         "-ar", str(SAMPLING_RATE), "-f", "f32le", "pipe:1"],
        capture_output=True, check=False,
    )
    audio = np.frombuffer(probe.stdout, dtype=np.float32).copy() if probe.returncode == 0 else None
    return frames, (audio if audio is not None and audio.size else None), float(FRAME_GRID_FPS)


def video_units(
    frames: list[Any], audio: np.ndarray | None, fps: float = 1.0, max_num_frames: int = MAX_NUM_FRAMES
) -> list[tuple[Any, np.ndarray | None]]:
    """(frame, audio segment) pairs: one frame per second (uniformly subsampled to `max_num_frames`), each with
    the audio from its time stamp to the next frame's (the last one takes the rest of the audio)."""
    if not frames:
        raise MediaLoadingError("video has no frames")
    duration = len(frames) / fps
    num_seconds = max(int(np.ceil(duration - 1e-6)), 1)
    if num_seconds <= max_num_frames:
        times = [float(second) for second in range(num_seconds)]
    else:
        times = list(np.linspace(0.0, duration, max_num_frames, endpoint=False))
    picks = [min(int(round(t * fps)), len(frames) - 1) for t in times]
    units = []
    for index, (time_s, pick) in enumerate(zip(times, picks)):
        segment = None
        if audio is not None:
            start = int(round(time_s * SAMPLING_RATE))
            end = int(round(times[index + 1] * SAMPLING_RATE)) if index + 1 < len(times) else audio.shape[0]
            segment = audio[start:end] if end > start else None
            if segment is not None and segment.shape[0] < 1281:  # too short for one audio token
                segment = None
        units.append((frames[pick], segment))
    return units


def load_video(item: dict) -> list[tuple[Any, np.ndarray | None]]:
    """Units of a `{"type": "video", "video": path | list of frames, "audio"?: 16 kHz array}` content item."""
    source = item.get("video", item.get("path"))
    if source is None:
        raise MediaLoadingError("video item needs a 'video' (local path or list of frames) entry")
    audio = item.get("audio")
    if isinstance(source, (str, os.PathLike)):
        frames, file_audio, fps = read_video_file(source)
        audio = file_audio if audio is None else audio
    elif isinstance(source, (list, tuple)):
        frames, fps = list(source), float(item.get("fps", 1.0))
    else:
        raise MediaLoadingError(f"video must be a local path or a list of frames, got {type(source).__name__}")
    if audio is not None:
        audio = load_audio(audio, item.get("sampling_rate"))
    return video_units(frames, audio, fps)


def expand_video_items(conversation: list[dict]) -> tuple[list[dict], bool]:
    """Copy of `conversation` where each video item is replaced by interleaved image/audio items.

    Returns (new conversation, whether any video was present); videos imply omni mode (items joined by "").
    """
    has_video = False
    expanded = []
    for message in conversation:
        content = message.get("content")
        if not isinstance(content, (list, tuple)) or not any(
            isinstance(item, dict) and item.get("type") == "video" for item in content
        ):
            expanded.append(message)
            continue
        has_video = True
        new_message = {key: value for key, value in message.items() if key != "content"}
        new_content = []
        for item in content:
            if not (isinstance(item, dict) and item.get("type") == "video"):
                new_content.append(item)
                continue
            for frame, segment in load_video(item):
                new_content.append({"type": "image", "image": frame})
                if segment is not None:
                    new_content.append({"type": "audio", "audio": segment})
        new_message["content"] = new_content
        expanded.append(new_message)
    return expanded, has_video
