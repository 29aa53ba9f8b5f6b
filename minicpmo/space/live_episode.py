"""A generated demo episode (scene video + user speech) played into a live session in real time, so the Live tab
can be tried without a webcam or a microphone: the same path the browser's devices take (0.5-s microphone
chunks, the latest frame per unit), fed from the synthetic world instead."""

from __future__ import annotations

import functools
import time
from collections.abc import Iterator

import numpy as np

from minicpmo.audio_utils import INPUT_SAMPLE_RATE

CHUNK_S = 0.5
EPISODE_TYPES = ("question", "watch", "interruption")


@functools.lru_cache(maxsize=4)
def demo_episode(index: int = 0):
    """Held-out episode number `index` (a question, a watch request or an interruption, in turn)."""
    from minicpmo.synthetic import generate_episodes

    kind = EPISODE_TYPES[index % len(EPISODE_TYPES)]
    return generate_episodes(1, seed=100 + index, split="heldout", types=(kind,))[0]


def episode_chunks(episode, chunk_s: float = CHUNK_S) -> Iterator[tuple[float, np.ndarray, object]]:
    """(start time, int16 microphone chunk at 16 kHz, the scene frame shown at that time) in order."""
    step = int(chunk_s * INPUT_SAMPLE_RATE)
    audio = np.clip(np.asarray(episode.user_audio, dtype=np.float32), -1.0, 1.0)
    pcm = (audio * 32767).astype(np.int16)
    frames = dict((int(t), image) for t, image in episode.frames)
    for start in range(0, pcm.shape[0], step):
        second = start // INPUT_SAMPLE_RATE
        yield start / INPUT_SAMPLE_RATE, pcm[start : start + step], frames.get(second, frames[max(frames)])


def play_episode(live, episode, chunk_s: float = CHUNK_S, realtime: bool = True) -> Iterator[object]:
    """Feed `episode` into the live session chunk by chunk (paced to real time); yields each frame as shown."""
    started = time.monotonic()
    for start, chunk, frame in episode_chunks(episode, chunk_s):
        if live.closed.is_set():
            return
        live.set_frame(frame)
        live.push_audio(INPUT_SAMPLE_RATE, chunk)
        yield frame
        if realtime:
            time.sleep(max(0.0, started + start + chunk_s - time.monotonic()))


__all__ = ["CHUNK_S", "demo_episode", "episode_chunks", "play_episode"]
