"""Bundled reference voices for speech output and voice cloning (16 kHz mono float32)."""

from pathlib import Path

import numpy as np

from .errors import SpeechOutputError
from .processing.media_loading_minicpmo import load_audio

VOICES_DIR = Path(__file__).resolve().parent / "assets" / "voices"
BUNDLED_VOICES = {
    "en_dlc": VOICES_DIR / "ref_en_dlc_1.wav",
    "minicpm_signature": VOICES_DIR / "ref_minicpm_signature.wav",
}
DEFAULT_VOICE = "en_dlc"
MODEL_VOICE_FILE = "voice.wav"  # a model folder's own voice reference (the demo model ships one; the Space uses it)


class UnknownVoiceError(SpeechOutputError):
    """Neither a bundled voice name nor a readable audio file."""


def read_audio_16k(path: str | Path) -> np.ndarray:
    """Any soundfile-readable file -> mono float32 at 16 kHz (the processor's one audio-file reader)."""
    return load_audio(str(path))


def load_voice(name_or_path: str | Path = DEFAULT_VOICE) -> np.ndarray:
    """A bundled voice by name (see BUNDLED_VOICES) or an audio file path -> 16 kHz mono float32."""
    path = BUNDLED_VOICES.get(str(name_or_path), Path(name_or_path))
    if not Path(path).is_file():
        raise UnknownVoiceError(
            f"unknown voice {name_or_path!r}: use one of {sorted(BUNDLED_VOICES)} or a path to an audio file"
        )
    return read_audio_16k(path)
