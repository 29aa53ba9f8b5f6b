"""The exception tree of minicpmo/ and finetune/: one root, `MiniCPMOError`, and a dozen families under it.

Every exception class the two packages define derives from exactly one family below (plus, where callers rely on
it, `TypeError` or `RuntimeError`), so `except MiniCPMOError` catches all of them and `except AudioInputError`
catches every kind of unusable audio, wherever it was detected. The concrete classes live next to the code that
raises them; their messages name the bad value and the fix. This module is a leaf: it imports nothing from minicpmo.
"""

from __future__ import annotations


class MiniCPMOError(ValueError):
    """Root of every error raised on purpose by minicpmo/ and finetune/ (a ValueError, as they all were)."""


class AudioInputError(MiniCPMOError):
    """Unusable audio: a bad waveform (dtype, channels, rate, length, NaN), audio features or stream state."""


class ImageInputError(MiniCPMOError):
    """Unusable images: a bad image type or size, pixel slices or target sizes that do not form a batch."""


class PromptError(MiniCPMOError):
    """A prompt that does not fit its media or tokenizer: placeholder counts, content types, media loading."""


class ContextLengthError(MiniCPMOError):
    """The prompt (plus the cache) does not fit into the context, or a requested length or cache span is off."""


class DuplexError(MiniCPMOError):
    """Duplex (listen/speak) streaming: unit layout, session controls and state, duplex metrics and evaluation."""


class DataFormatError(MiniCPMOError):
    """A training row, sample, label mask or speech clip that does not follow its data format."""


class SyntheticDataError(MiniCPMOError):
    """The synthetic data generators: bad scenes, episodes, speech synthesis, alignments or datasets."""


class ConfigError(MiniCPMOError):
    """A configuration, recipe, preset or collator option that cannot describe a working model or run."""


class CheckpointError(MiniCPMOError):
    """Weights, tokenizer or official files that are missing, unreadable, or not in the expected layout."""


class SpeechOutputError(MiniCPMOError):
    """Speech cannot be produced: no speech modules or voice, or bad inputs to the decoder, flow or vocoder."""


class TrainingError(MiniCPMOError):
    """A model, batch, budget or demo setting that a finetune recipe cannot train with."""


class SpaceError(MiniCPMOError):
    """The Gradio Space: unusable settings, uploads or microphone chunks, busy or closed live sessions."""


FAMILIES = (
    AudioInputError,
    ImageInputError,
    PromptError,
    ContextLengthError,
    DuplexError,
    DataFormatError,
    SyntheticDataError,
    ConfigError,
    CheckpointError,
    SpeechOutputError,
    TrainingError,
    SpaceError,
)

__all__ = [
    "FAMILIES",
    "AudioInputError",
    "CheckpointError",
    "ConfigError",
    "ContextLengthError",
    "DataFormatError",
    "DuplexError",
    "ImageInputError",
    "MiniCPMOError",
    "PromptError",
    "SpaceError",
    "SpeechOutputError",
    "SyntheticDataError",
    "TrainingError",
]
