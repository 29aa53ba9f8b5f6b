"""One check for every waveform the package takes in (features, streaming mel, duplex units, token2wav voice
prompts, the S3 speech tokenizer), so the same bad input gets the same typed error and message everywhere."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch


class InvalidAudioError(ValueError):
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
    "AudioDtypeError",
    "EmptyAudioError",
    "InvalidAudioError",
    "MultiChannelAudioError",
    "NonFiniteAudioError",
    "mono_waveform",
]
