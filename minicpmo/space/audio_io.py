"""Audio conversions between the browser, the model and files.

Browser microphone chunks arrive as int16 at the browser rate (usually 48 kHz), in pieces of about
`stream_every` seconds; the duplex model wants exact 1-s units of 16 kHz float32. Gradio's streaming audio
output wants int16 (float chunks would be peak-normalised one by one, which makes loudness jump).
"""

import numpy as np
import soundfile

from minicpmo.audio_utils import INPUT_SAMPLE_RATE, AudioDtypeError, pcm_to_float32
from minicpmo.errors import SpaceError
from minicpmo.processing.media_loading_minicpmo import resample_audio

MODEL_INPUT_RATE = INPUT_SAMPLE_RATE


class BrowserAudioError(SpaceError):
    """A microphone chunk has an unusable rate, shape or dtype."""


def to_int16(audio: np.ndarray) -> np.ndarray:
    """float [-1, 1] -> int16 (clipped)."""
    return (np.clip(np.asarray(audio, dtype=np.float32), -1.0, 1.0) * 32767.0).astype(np.int16)


def browser_chunk_to_mono(data: np.ndarray) -> np.ndarray:
    """(samples,) or (samples, channels) int16/int32/float -> mono float32 in [-1, 1]."""
    data = np.asarray(data)
    if data.ndim not in (1, 2):
        raise BrowserAudioError(f"microphone chunk must be 1-D or (samples, channels), got shape {data.shape}")
    try:
        mono = pcm_to_float32(data, name="microphone chunk")
    except AudioDtypeError:
        raise BrowserAudioError(f"microphone chunk has unsupported dtype {data.dtype}") from None
    if mono.ndim == 2:
        mono = mono.mean(axis=1)
    if not np.isfinite(mono).all():
        raise BrowserAudioError("microphone chunk contains NaN or infinite samples")
    return mono.astype(np.float32)


class UnitAssembler:
    """Collects browser-rate samples and hands out complete 1-s units at 16 kHz (exactly 16000 samples each).

    Each unit is cut at the source rate first and then resampled, so no sample is lost or repeated at unit
    boundaries whatever the chunk size.
    """

    def __init__(self):
        self.rate: int | None = None
        self.pending = np.zeros(0, dtype=np.float32)

    def reset(self) -> None:
        self.rate, self.pending = None, np.zeros(0, dtype=np.float32)

    def push(self, rate: int, data: np.ndarray) -> list[np.ndarray]:
        rate = int(rate)
        if rate < 8000 or rate > 192000:
            raise BrowserAudioError(f"microphone sample rate {rate} Hz is outside 8-192 kHz")
        if rate != self.rate:  # a new device: start over rather than mixing rates
            self.reset()
            self.rate = rate
        self.pending = np.concatenate([self.pending, browser_chunk_to_mono(data)])
        units = []
        while self.pending.shape[0] >= rate:
            block, self.pending = self.pending[:rate], self.pending[rate:]
            unit = resample_audio(block, rate, MODEL_INPUT_RATE)
            fixed = np.zeros(MODEL_INPUT_RATE, dtype=np.float32)
            fixed[: min(unit.shape[0], MODEL_INPUT_RATE)] = unit[:MODEL_INPUT_RATE]
            units.append(fixed)
        return units


def write_wav(path, audio: np.ndarray, rate: int) -> str:
    soundfile.write(str(path), np.asarray(audio, dtype=np.float32), rate, subtype="PCM_16")
    return str(path)
