"""espeak-ng speech at 16 kHz with exact word timings.

espeak-ng's command line reports no timings, so an utterance is synthesised word by word (each word once, cached)
and the words are joined with short gaps: a plain gap between words and a longer one after `,;:` and `.?!`.
That gives exact word boundaries (the prosody is per word, which matters little for espeak's robotic voice)
and makes a small template vocabulary very cheap to synthesise. Each word's leading and trailing silence is
trimmed so word spans cover voiced audio only.
"""

from __future__ import annotations

import functools
import io
import re
import shutil
import subprocess
from dataclasses import dataclass

import numpy as np

from ..audio_utils import INPUT_SAMPLE_RATE, read_audio_file
from minicpmo.errors import SyntheticDataError


SAMPLE_RATE = INPUT_SAMPLE_RATE
WORD_GAP_S = 0.06  # at 175 words per minute; scaled by 175 / speed
COMMA_PAUSE_S = 0.18
SENTENCE_PAUSE_S = 0.32
DEFAULT_SPEED = 175
SILENCE_FRACTION = 0.02  # samples below this fraction of the word's peak count as silence when trimming
TARGET_PEAK = 0.5


class EspeakNotFoundError(SyntheticDataError, RuntimeError):
    """espeak-ng is not installed (or not on PATH); synthetic speech cannot be generated."""


class SpeechSynthesisError(SyntheticDataError):
    """Bad synthesis input (empty text, unknown voice, speed out of range) or espeak-ng failed on it."""


@dataclass(frozen=True)
class Voice:
    """An espeak-ng voice name (language[+variant]) and a speed in words per minute."""

    name: str
    speed: int = DEFAULT_SPEED


@dataclass(frozen=True)
class WordTiming:
    """One word of the text: its character span [char_start, char_end) and time span (seconds from utterance start)."""

    word: str
    char_start: int
    char_end: int
    start_s: float
    end_s: float


@dataclass
class Utterance:
    """Synthesised speech: float32 mono `audio` at 16 kHz ([n_samples]) and one `WordTiming` per word."""

    text: str
    voice: Voice
    audio: np.ndarray
    words: list[WordTiming]

    @property
    def duration_s(self) -> float:
        return self.audio.shape[0] / SAMPLE_RATE


def espeak_path() -> str:
    """Path of the espeak-ng binary; raises EspeakNotFoundError with an install hint when it is missing."""
    path = shutil.which("espeak-ng")
    if path is None:
        raise EspeakNotFoundError(
            "espeak-ng was not found on PATH; install it (e.g. `apt-get install espeak-ng`) to generate "
            "synthetic speech"
        )
    return path


def espeak_available() -> bool:
    return shutil.which("espeak-ng") is not None


def _read_wav(data: bytes) -> tuple[np.ndarray, int]:
    return read_audio_file(io.BytesIO(data))


@functools.lru_cache(maxsize=4)
def _resampler(rate: int):
    """torchaudio's sinc resampler with its kernel built once (building it dominates the cost of short words)."""
    import torchaudio.transforms

    return torchaudio.transforms.Resample(rate, SAMPLE_RATE)


def _resample(audio: np.ndarray, rate: int) -> np.ndarray:
    if rate == SAMPLE_RATE:
        return audio.astype(np.float32)
    import torch

    with torch.no_grad():
        return _resampler(rate)(torch.from_numpy(np.ascontiguousarray(audio))).numpy().astype(np.float32)


def _trim(audio: np.ndarray) -> np.ndarray:
    """Cut leading/trailing silence (relative threshold), keeping 5 ms around the voiced part."""
    if audio.size == 0:
        return audio
    loud = np.flatnonzero(np.abs(audio) > SILENCE_FRACTION * float(np.abs(audio).max()))
    if loud.size == 0:
        return audio[:0]
    margin = SAMPLE_RATE // 200
    return audio[max(0, loud[0] - margin) : loud[-1] + 1 + margin]


@functools.lru_cache(maxsize=4096)
def _word_audio(word: str, voice_name: str, speed: int) -> np.ndarray:
    result = subprocess.run(
        [espeak_path(), "--stdout", "-v", voice_name, "-s", str(speed), word], capture_output=True, check=False
    )
    if result.returncode != 0 or not result.stdout:
        message = result.stderr.decode(errors="replace").strip()
        raise SpeechSynthesisError(f"espeak-ng failed for voice {voice_name!r} on {word!r}: {message or 'no output'}")
    audio, rate = _read_wav(result.stdout)
    trimmed = _trim(_resample(audio, rate))
    trimmed.setflags(write=False)
    return trimmed


def check_voice(voice: Voice) -> None:
    if not isinstance(voice, Voice):
        raise SpeechSynthesisError(f"voice must be a Voice, got {type(voice).__name__}")
    if not re.fullmatch(r"[A-Za-z0-9_\-]+(\+[A-Za-z0-9_\-]+)?", voice.name):
        raise SpeechSynthesisError(f"voice name {voice.name!r} is not an espeak-ng voice name like 'en-us+f3'")
    if not 80 <= int(voice.speed) <= 450:
        raise SpeechSynthesisError(f"speed must be 80..450 words per minute, got {voice.speed}")


def synthesize(text: str, voice: Voice, gain: float = 1.0) -> Utterance:
    """Speak `text` with `voice`; the result peaks at TARGET_PEAK * gain and carries exact word timings."""
    if not isinstance(text, str) or not text.strip():
        raise SpeechSynthesisError(f"text to synthesise must be a non-empty string, got {text!r}")
    check_voice(voice)
    espeak_path()
    scale = DEFAULT_SPEED / float(voice.speed)
    pieces, words, cursor = [], [], 0
    for match in re.finditer(r"\S+", text):
        word = match.group(0)
        spoken = re.sub(r"[^\w']", "", word)
        if not spoken:  # bare punctuation: only a pause
            cursor += int(round(COMMA_PAUSE_S * scale * SAMPLE_RATE))
            pieces.append(np.zeros(int(round(COMMA_PAUSE_S * scale * SAMPLE_RATE)), np.float32))
            continue
        audio = _word_audio(spoken.lower(), voice.name, int(voice.speed))
        if words or pieces:
            gap = int(round(WORD_GAP_S * scale * SAMPLE_RATE))
            pieces.append(np.zeros(gap, np.float32))
            cursor += gap
        start = cursor
        pieces.append(audio)
        cursor += audio.shape[0]
        words.append(WordTiming(word, match.start(), match.end(), start / SAMPLE_RATE, cursor / SAMPLE_RATE))
        pause = SENTENCE_PAUSE_S if word[-1] in ".?!" else COMMA_PAUSE_S if word[-1] in ",;:" else 0.0
        if pause and match.end() < len(text.rstrip()):
            extra = int(round(pause * scale * SAMPLE_RATE))
            pieces.append(np.zeros(extra, np.float32))
            cursor += extra
    if not words:
        raise SpeechSynthesisError(f"text {text!r} holds no speakable word")
    audio = np.concatenate(pieces).astype(np.float32)
    peak = float(np.abs(audio).max())
    if peak > 0:
        audio *= TARGET_PEAK * float(gain) / peak
    return Utterance(text, voice, audio, words)
