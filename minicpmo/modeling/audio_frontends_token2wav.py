"""Audio front-ends of token2wav's reference voice: the 24 kHz prompt mel and the 16 kHz Kaldi fbank.

* ``prompt_mel_24k``: the flow decoder's prompt condition (official §7), the CosyVoice / Matcha
  ``mel_spectrogram``: resample to 24 kHz, reflect-pad (n_fft - hop) / 2 on both sides, STFT with
  n_fft = win = 1920, hop 480, periodic Hann window, center=False, magnitude sqrt(re^2 + im^2 + 1e-9)
  (not power), an 80-band mel filterbank over 0..8000 Hz, then log(clamp(x, 1e-5)). The filterbank is
  librosa's default (``htk=False``: Slaney mel scale, ``norm="slaney"``: area normalisation), built
  with ``torchaudio.functional.melscale_fbanks(norm="slaney", mel_scale="slaney")``. 480 samples per
  frame = 50 frames/s, twice the 25 Hz speech-token rate.
* ``fit_prompt_mel``: the flow needs exactly 2 mel frames per prompt token; pad (repeat last frame)
  or cut.
* ``kaldi_fbank_16k``: the CAMPPlus speaker-embedding input, torchaudio's Kaldi-compatible fbank
  (80 bins, 25 ms / 10 ms, dither 0) of 16 kHz float audio in [-1, 1].
"""

from __future__ import annotations

import functools

import numpy as np
import torch
import torch.nn.functional as F

from ..audio_utils import INPUT_SAMPLE_RATE, OUTPUT_SAMPLE_RATE, InvalidAudioError, mono_waveform

try:  # torchaudio is a pinned dependency; keep the import failure readable if it is missing.
    import torchaudio.compliance.kaldi as _kaldi
    import torchaudio.functional as _taf
except ImportError:  # pragma: no cover - exercised only on broken installs
    _kaldi = None
    _taf = None


PROMPT_MEL_SAMPLE_RATE = OUTPUT_SAMPLE_RATE
PROMPT_MEL_N_FFT = 1920
PROMPT_MEL_HOP = 480
PROMPT_MEL_WIN = 1920
PROMPT_MEL_BINS = 80
PROMPT_MEL_FMIN = 0.0
PROMPT_MEL_FMAX = 8000.0
FBANK_SAMPLE_RATE = INPUT_SAMPLE_RATE
FBANK_BINS = 80
FBANK_MIN_SAMPLES = 400  # one 25 ms Kaldi frame at 16 kHz


def _require_torchaudio() -> None:
    if _taf is None or _kaldi is None:
        raise ImportError("token2wav audio front-ends need torchaudio (pip install torchaudio)")


def _check_sample_rate(sample_rate) -> int:
    if isinstance(sample_rate, bool) or not isinstance(sample_rate, (int, np.integer)) or sample_rate <= 0:
        raise InvalidAudioError(f"sample_rate must be a positive integer, got {sample_rate!r}")
    return int(sample_rate)


@functools.lru_cache(maxsize=4)
def _prompt_mel_filterbank() -> torch.Tensor:
    """[n_fft/2 + 1, 80] Slaney-scale, Slaney-normalised (librosa default) filterbank, float32 on CPU."""
    _require_torchaudio()
    return _taf.melscale_fbanks(
        n_freqs=PROMPT_MEL_N_FFT // 2 + 1,
        f_min=PROMPT_MEL_FMIN,
        f_max=PROMPT_MEL_FMAX,
        n_mels=PROMPT_MEL_BINS,
        sample_rate=PROMPT_MEL_SAMPLE_RATE,
        norm="slaney",
        mel_scale="slaney",
    )


def prompt_mel_24k(wav, sample_rate: int) -> torch.Tensor:
    """Reference-voice log-mel for the flow prompt: audio at any rate -> Tensor [T, 80], T = N_24k // 480."""
    _require_torchaudio()
    sample_rate = _check_sample_rate(sample_rate)
    audio = mono_waveform(wav, "prompt audio")
    if sample_rate != PROMPT_MEL_SAMPLE_RATE:
        audio = _taf.resample(audio, sample_rate, PROMPT_MEL_SAMPLE_RATE)
    pad = (PROMPT_MEL_N_FFT - PROMPT_MEL_HOP) // 2
    if audio.numel() <= pad or audio.numel() < PROMPT_MEL_HOP:
        raise InvalidAudioError(
            f"prompt audio is too short for a 24 kHz mel frame: {audio.numel()} samples after resampling, "
            f"need at least {max(pad + 1, PROMPT_MEL_HOP)}"
        )
    padded = F.pad(audio[None, None], (pad, pad), mode="reflect")[0]
    spec = torch.stft(
        padded,
        PROMPT_MEL_N_FFT,
        hop_length=PROMPT_MEL_HOP,
        win_length=PROMPT_MEL_WIN,
        window=torch.hann_window(PROMPT_MEL_WIN, device=audio.device),
        center=False,
        return_complex=True,
    )[0]  # [n_fft/2 + 1, T]
    magnitude = torch.sqrt(spec.real.pow(2) + spec.imag.pow(2) + 1e-9)
    mel = _prompt_mel_filterbank().to(magnitude.device).T @ magnitude
    return torch.log(mel.clamp(min=1e-5)).T.contiguous()


def fit_prompt_mel(mel: torch.Tensor, n_prompt_tokens: int) -> torch.Tensor:
    """Make a prompt mel [T, 80] exactly 2 * n_prompt_tokens frames long (repeat the last frame or cut)."""
    if not isinstance(mel, torch.Tensor) or mel.dim() != 2 or mel.shape[-1] != PROMPT_MEL_BINS:
        shape = tuple(mel.shape) if isinstance(mel, torch.Tensor) else type(mel).__name__
        raise InvalidAudioError(f"prompt mel must be a Tensor [T, {PROMPT_MEL_BINS}], got {shape}")
    if mel.shape[0] == 0:
        raise InvalidAudioError("prompt mel has no frames")
    if isinstance(n_prompt_tokens, bool) or not isinstance(n_prompt_tokens, (int, np.integer)) or n_prompt_tokens <= 0:
        raise InvalidAudioError(f"n_prompt_tokens must be a positive integer, got {n_prompt_tokens!r}")
    target = 2 * int(n_prompt_tokens)
    if mel.shape[0] >= target:
        return mel[:target]
    return F.pad(mel.T[None], (0, target - mel.shape[0]), mode="replicate")[0].T.contiguous()


def kaldi_fbank_16k(wav, sample_rate: int = FBANK_SAMPLE_RATE) -> torch.Tensor:
    """Kaldi fbank of 16 kHz mono audio: Tensor [T, 80] (25 ms windows, 10 ms shift, dither 0)."""
    _require_torchaudio()
    sample_rate = _check_sample_rate(sample_rate)
    if sample_rate != FBANK_SAMPLE_RATE:
        raise InvalidAudioError(
            f"speaker-embedding audio must be sampled at {FBANK_SAMPLE_RATE} Hz, got {sample_rate} Hz; resample first"
        )
    audio = mono_waveform(wav, "speaker audio")
    if audio.numel() < FBANK_MIN_SAMPLES:
        raise InvalidAudioError(
            f"speaker audio is too short: {audio.numel()} samples, need at least {FBANK_MIN_SAMPLES} (25 ms)"
        )
    return _kaldi.fbank(audio[None], num_mel_bins=FBANK_BINS, dither=0.0, sample_frequency=FBANK_SAMPLE_RATE)


__all__ = [
    "InvalidAudioError",
    "fit_prompt_mel",
    "kaldi_fbank_16k",
    "prompt_mel_24k",
]
