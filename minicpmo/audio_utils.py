"""What processing/ and modeling/ both need about audio, in one leaf module (it imports neither).

* One check for every waveform the package takes in (features, streaming mel, duplex units, token2wav voice
  prompts, the S3 speech tokenizer), so the same bad input gets the same typed error and message everywhere.
* The sample rates and the frame / token-count formulas that tie a waveform to its audio slots: the processor
  uses them to lay out placeholders, the encoder to produce exactly that many embeddings.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from .errors import AudioInputError


INPUT_SAMPLE_RATE = 16000  # what the audio encoder, the S3 tokenizer and duplex units take
OUTPUT_SAMPLE_RATE = 24000  # what token2wav speaks
MEL_HOP_LENGTH = 160  # 100 mel frames per second at 16 kHz
AUDIO_POOL_STEP = 5  # encoder frames averaged into one LLM audio token

# One duplex unit of mel (official duplex mode, cnn_redundancy_ms 20)
UNIT_CORE_MEL_FRAMES = 100  # 1 s of mel
UNIT_REDUNDANCY_MEL_FRAMES = 2  # per side; none on the left of the first unit
UNIT_ENCODER_FRAMES = 50


class InvalidAudioError(AudioInputError):
    """Audio that cannot be used: wrong container or dtype, not mono, empty, NaN/inf, too short or too long."""


class AudioDtypeError(InvalidAudioError, TypeError):
    """Not an array of samples, or samples of a dtype that is not float or int16/int32 PCM."""


class MultiChannelAudioError(InvalidAudioError):
    """A multi-channel waveform where a mono one is required; average the channels first."""


class EmptyAudioError(InvalidAudioError):
    """The waveform has no samples."""


class NonFiniteAudioError(InvalidAudioError):
    """The waveform holds NaN or infinite samples."""


def mono_waveform(waveform: Any, name: str = "audio") -> torch.Tensor:
    """A float32 1-D tensor (a copy for integer input) of one mono waveform, or a typed error naming the problem.

    Takes numpy arrays, torch tensors (any device) and lists of samples, shaped [N], [1, N] or [N, 1]; float
    samples, or int16 / int32 PCM (scaled to [-1, 1))."""
    if isinstance(waveform, (list, tuple)):
        waveform = np.asarray(waveform)
    if isinstance(waveform, np.ndarray):
        tensor = _tensor_from_numpy(waveform, name)
    elif isinstance(waveform, torch.Tensor):
        tensor = _float_samples(waveform.detach(), name)
    else:
        raise AudioDtypeError(f"{name} must be a numpy array or torch tensor of samples, got {type(waveform).__name__}")
    if tensor.dim() == 2 and 1 in tensor.shape:
        tensor = tensor.reshape(-1)
    if tensor.dim() == 2:
        raise MultiChannelAudioError(
            f"{name} has shape {tuple(tensor.shape)}: multi-channel audio is not supported, pass mono (1-D) audio "
            "(mix the channels down)"
        )
    if tensor.dim() != 1:
        raise InvalidAudioError(f"{name} must be a 1-D mono waveform, got shape {tuple(tensor.shape)}")
    if tensor.numel() == 0:
        raise EmptyAudioError(f"{name} is empty (0 samples)")
    if not torch.isfinite(tensor).all():
        raise NonFiniteAudioError(f"{name} contains NaN or infinite samples")
    return tensor


def validate_waveform(waveform: Any, name: str = "audio") -> np.ndarray:
    """Return a float32 mono 1-D numpy copy of `waveform` or raise a typed error that names the problem."""
    return mono_waveform(waveform, name).cpu().numpy().copy()


def encoder_frames_from_mel_frames(mel_frames):
    """Encoder frames after the stride-2 conv: T' = (T - 1) // 2 + 1 (works on ints and integer tensors)."""
    return (mel_frames - 1) // 2 + 1


def frames_to_token_count(mel_frames, pool_step: int = AUDIO_POOL_STEP):
    """LLM audio tokens for `mel_frames` mel frames: ((T' - pool) // pool) + 1 with T' = (T - 1) // 2 + 1, at least 0.

    Works on ints and integer tensors; 1 s (100 frames) -> 10 tokens."""
    count = (encoder_frames_from_mel_frames(mel_frames) - pool_step) // pool_step + 1
    return count.clamp(min=0) if isinstance(count, torch.Tensor) else max(count, 0)


def expected_unit_mel_frames(is_first_unit: bool) -> int:
    """Mel frames of a duplex unit: 100 core + 2 right redundancy, + 2 left redundancy after the first unit."""
    left = 0 if is_first_unit else UNIT_REDUNDANCY_MEL_FRAMES
    return left + UNIT_CORE_MEL_FRAMES + UNIT_REDUNDANCY_MEL_FRAMES


def needs_cache_reset(cached_frames: int, unit_mel_frames: int, max_source_positions: int) -> bool:
    """Official rule: empty a non-empty cache when cache + the unit's pre-crop conv frames reaches the table size."""
    return cached_frames > 0 and cached_frames + encoder_frames_from_mel_frames(unit_mel_frames) >= max_source_positions


def read_audio_file(source) -> tuple[np.ndarray, int]:
    """The one audio-file reader: (float32 mono samples at the file's rate, channels averaged, and that rate).

    `source` is a path or a binary file object (e.g. `io.BytesIO` of a wav); soundfile's errors pass through.
    `processing.media_loading_minicpmo.load_audio` adds the path checks, validation and resampling to 16 kHz."""
    import soundfile

    data, rate = soundfile.read(source, dtype="float32", always_2d=True)
    return np.ascontiguousarray(data.mean(axis=1), dtype=np.float32), int(rate)


def pcm_to_float32(samples: np.ndarray, name: str = "audio") -> np.ndarray:
    """The one PCM normaliser: float samples as float32, int16 / int32 PCM scaled to [-1, 1) (any shape)."""
    return _tensor_from_numpy(np.asarray(samples), name).numpy()


def _tensor_from_numpy(array: np.ndarray, name: str) -> torch.Tensor:
    if array.dtype.kind == "f":
        return torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32))
    if array.dtype not in (np.int16, np.int32):
        raise _dtype_error(str(array.dtype), name)
    return _float_samples(torch.from_numpy(np.ascontiguousarray(array)), name)


def _float_samples(tensor: torch.Tensor, name: str) -> torch.Tensor:
    if tensor.is_floating_point():
        return tensor.float()
    if tensor.dtype == torch.int16:
        return tensor.float() / 32768.0
    if tensor.dtype == torch.int32:
        return tensor.double().div(2147483648.0).float()
    raise _dtype_error(str(tensor.dtype).removeprefix("torch."), name)


def _dtype_error(dtype_name: str, name: str) -> AudioDtypeError:
    return AudioDtypeError(f"{name} has unsupported dtype {dtype_name}: use float samples or int16/int32 PCM")


__all__ = [
    "AUDIO_POOL_STEP",
    "INPUT_SAMPLE_RATE",
    "MEL_HOP_LENGTH",
    "OUTPUT_SAMPLE_RATE",
    "UNIT_CORE_MEL_FRAMES",
    "UNIT_ENCODER_FRAMES",
    "UNIT_REDUNDANCY_MEL_FRAMES",
    "AudioDtypeError",
    "EmptyAudioError",
    "InvalidAudioError",
    "MultiChannelAudioError",
    "NonFiniteAudioError",
    "encoder_frames_from_mel_frames",
    "expected_unit_mel_frames",
    "frames_to_token_count",
    "mono_waveform",
    "needs_cache_reset",
    "pcm_to_float32",
    "read_audio_file",
    "validate_waveform",
]
