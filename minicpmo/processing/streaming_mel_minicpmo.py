"""Exact streaming log-mel front end of MiniCPM-o 4.5's duplex mode (official `StreamingMelProcessorExact`,
mode "exact"), as a pure `step(samples, state) -> (mel chunk or None, state)`.

Why recompute instead of framing incrementally: the official processor appends every chunk to a sample buffer and
recomputes the Whisper log-mel over the whole buffer, then emits only *stable* frames, i.e. frames whose 400-sample
STFT window lies inside the buffer: stable = (len - n_fft//2) // hop + 1. What that guarantees:

* the raw log10 mel of an emitted frame never changes when more audio arrives (its window is complete), so before
  the floor it equals the offline mel of the whole audio;
* the floor is the fixed -10 while the buffer is under 5 s, which is pointwise, so emitted frames equal the offline
  fixed-floor mel of the whole audio; from 5 s on it is the dynamic max-8 floor over the *current buffer* (the
  buffer max can still grow), so an emitted frame equals the mel of the buffer it was cut from, and equals the
  offline (chat-path) features only where no floor is active. Each chunk is therefore "offline over the same buffer".

Per call it emits the next `chunk_ms` of core frames (100) plus `cnn_redundancy_ms` (2 frames) on each side, no left
redundancy on the first chunk: 102 frames first, 104 afterwards; those extra frames are the conv context the duplex
encoder crops off again (modeling_duplex_audio.py). The first chunk is `first_chunk_ms` = 1035 ms aligned down to
the hop, 16480 samples (1030 ms), which is what makes 102 frames stable. The duplex session left-pads its first 1-s
unit with zeros to round(1035 ms) = 16560 samples and keeps the 80 samples beyond 16480 for the next unit; with
`pad_first_chunk=True` this module does that too, so feeding 16000 samples per call emits one chunk per call.
A sliding buffer bounds the cost: once it holds 30 s, its oldest 10 s are dropped (frame indices stay global).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from ..errors import AudioInputError
from .feature_extraction_minicpmo import (
    HOP_LENGTH,
    SAMPLING_RATE,
    InvalidAudioError,
    MiniCPMOFeatureExtractor,
    UnsupportedSamplingRateError,
    validate_waveform,
)


N_FFT = 400
FIXED_LOG_FLOOR = -10.0  # log10 floor while the buffer is short: a dynamic max over < 5 s would be unstable
DYNAMIC_RANGE = 8.0  # Whisper's floor: max(x, max(x) - 8) over the buffer
DYNAMIC_FLOOR_FROM_SECONDS = 5
CHUNK_MS = 1000
FIRST_CHUNK_MS = 1035
DUPLEX_CNN_REDUNDANCY_MS = 20  # 2 mel frames per side; 0 on a bare turn-based model
SLIDE_TRIGGER_SECONDS = 30.0
SLIDE_STRIDE_SECONDS = 10.0
MIN_KEEP_SECONDS = 1.0  # a slide always leaves at least this much audio (official guard)


class StreamingMelError(AudioInputError):
    """A streaming mel configuration or state that cannot work (bad sizes, a state from another stream layout)."""


def log_mel_spectrogram(
    samples: torch.Tensor,
    mel_filters: torch.Tensor,
    dynamic_floor: bool,
    n_fft: int = N_FFT,
    hop_length: int = HOP_LENGTH,
) -> torch.Tensor:
    """Whisper log-mel [n_mels, len // hop] of a 1-D float32 waveform, with no padding to 30 s.

    Same operations as transformers' `WhisperFeatureExtractor._torch_extract_fbank_features` (centred reflect-padded
    STFT, last frame dropped, power, mel, log10 clamped at 1e-10), then the dynamic max-8 floor or the fixed -10
    floor, then (x + 4) / 4. `mel_filters` is the extractor's [1 + n_fft // 2, n_mels] matrix.
    """
    if samples.ndim != 1 or samples.shape[0] <= n_fft // 2:
        raise InvalidAudioError(
            f"log-mel needs a 1-D waveform longer than {n_fft // 2} samples, got shape {tuple(samples.shape)}"
        )
    window = torch.hann_window(n_fft, device=samples.device)
    stft = torch.stft(samples, n_fft, hop_length, window=window, return_complex=True)
    power = (stft[..., :-1].abs() ** 2).contiguous()
    log_spec = torch.clamp(mel_filters.T @ power, min=1e-10).log10()
    if dynamic_floor:
        log_spec = torch.maximum(log_spec, log_spec.max() - DYNAMIC_RANGE)
    else:
        log_spec = torch.maximum(log_spec, torch.tensor(FIXED_LOG_FLOOR, dtype=log_spec.dtype))
    return (log_spec + 4.0) / 4.0


def _empty_samples() -> torch.Tensor:
    return torch.zeros(0, dtype=torch.float32)


@dataclass(frozen=True, eq=False)
class StreamingMelState:
    """Everything `StreamingMelProcessor.step` needs between calls; never mutated (step returns a new one).
    (eq=False: it holds tensors, compare fields explicitly.)

    buffer: samples the mel is recomputed over (the sliding window), float32 [n].
    pending: samples received but not yet a full chunk (handed to `buffer` chunk by chunk).
    samples_consumed: samples moved into the buffer since the stream began (first-chunk zero padding included).
    samples_dropped: samples slid out of the buffer's left end; buffer[0] is global frame samples_dropped // hop.
    frames_emitted: global index of the next core frame to emit (= core frames emitted so far).
    is_first_chunk: True until the first chunk has been processed (it has its own size and no left redundancy).
    """

    buffer: torch.Tensor = field(default_factory=_empty_samples)
    pending: torch.Tensor = field(default_factory=_empty_samples)
    samples_consumed: int = 0
    samples_dropped: int = 0
    frames_emitted: int = 0
    is_first_chunk: bool = True


class StreamingMelProcessor:
    """Exact streaming log-mel (official mode "exact"); configuration only, all stream data lives in the state.

    Defaults are the duplex settings: chunk_ms 1000, first_chunk_ms 1035 (-> 16480 samples), cnn_redundancy_ms 20
    (2 frames each side; use 0 for the bare turn-based model), sliding buffer trigger 30 s / stride 10 s.
    """

    def __init__(
        self,
        chunk_ms: int = CHUNK_MS,
        first_chunk_ms: int = FIRST_CHUNK_MS,
        cnn_redundancy_ms: int = DUPLEX_CNN_REDUNDANCY_MS,
        enable_sliding_window: bool = True,
        slide_trigger_seconds: float = SLIDE_TRIGGER_SECONDS,
        slide_stride_seconds: float = SLIDE_STRIDE_SECONDS,
        pad_first_chunk: bool = True,
        feature_extractor: MiniCPMOFeatureExtractor | None = None,
    ):
        extractor = feature_extractor if feature_extractor is not None else MiniCPMOFeatureExtractor()
        self.sampling_rate = int(extractor.sampling_rate)
        self.hop_length = int(extractor.hop_length)
        self.n_fft = int(extractor.n_fft)
        self.mel_filters = torch.from_numpy(np.asarray(extractor.mel_filters)).to(torch.float32)
        self.num_mel_bins = int(self.mel_filters.shape[1])
        if self.sampling_rate != SAMPLING_RATE:
            raise StreamingMelError(
                f"the streaming mel runs at {SAMPLING_RATE} Hz, the extractor at {self.sampling_rate} Hz"
            )

        hop = self.hop_length
        self.chunk_samples = int(round(chunk_ms * self.sampling_rate / 1000))
        self.chunk_frames = self.chunk_samples // hop
        # The session pads its first unit to the unaligned 1035 ms; the processor takes it aligned down to the hop.
        self.first_chunk_pad_samples = int(first_chunk_ms * self.sampling_rate / 1000)
        self.first_chunk_samples = max(hop, (int(round(first_chunk_ms * self.sampling_rate / 1000)) // hop) * hop)
        self.redundancy_frames = max(0, int(cnn_redundancy_ms * self.sampling_rate / 1000) // hop)
        self.enable_sliding_window = bool(enable_sliding_window)
        self.slide_trigger_samples = int(slide_trigger_seconds * self.sampling_rate)
        self.slide_stride_samples = (int(slide_stride_seconds * self.sampling_rate) // hop) * hop
        self.pad_first_chunk = bool(pad_first_chunk)
        self.dynamic_floor_from_samples = DYNAMIC_FLOOR_FROM_SECONDS * self.sampling_rate

        if self.chunk_frames <= 0 or self.chunk_samples % hop:
            raise StreamingMelError(f"chunk_ms={chunk_ms} must be a positive multiple of the {hop}-sample hop")
        if self.first_chunk_samples < self.n_fft:
            raise StreamingMelError(f"first_chunk_ms={first_chunk_ms} is shorter than one {self.n_fft}-sample window")
        if cnn_redundancy_ms < 0 or self.redundancy_frames > self.chunk_frames:
            raise StreamingMelError(f"cnn_redundancy_ms={cnn_redundancy_ms} must be in [0, chunk_ms]")
        if self.enable_sliding_window and not 0 < self.slide_stride_samples < self.slide_trigger_samples:
            raise StreamingMelError(
                f"slide stride ({slide_stride_seconds} s) must be positive and shorter than the trigger "
                f"({slide_trigger_seconds} s)"
            )

    # --- helpers ---------------------------------------------------------------------------------------------
    def initial_state(self) -> StreamingMelState:
        """State of a new (or reset) stream."""
        return StreamingMelState()

    def next_chunk_samples(self, state: StreamingMelState) -> int:
        """Samples the buffer takes on the next processed chunk: 16480 for the first, 16000 afterwards."""
        return self.first_chunk_samples if state.is_first_chunk else self.chunk_samples

    def _as_samples(self, samples: Any, sampling_rate: int) -> torch.Tensor:
        if int(sampling_rate) != self.sampling_rate:
            raise UnsupportedSamplingRateError(
                f"audio chunk is at {sampling_rate} Hz but the streaming mel needs {self.sampling_rate} Hz; resample it"
            )
        if isinstance(samples, torch.Tensor) and samples.is_floating_point():
            samples = samples.detach().to("cpu", torch.float32)
        if getattr(samples, "ndim", None) == 1 and getattr(samples, "shape", (1,))[0] == 0:
            return _empty_samples()  # no new audio: lets a caller drain pending samples
        return torch.from_numpy(validate_waveform(samples, name="audio chunk"))

    def _mel(self, buffer: torch.Tensor) -> torch.Tensor:
        return log_mel_spectrogram(
            buffer,
            self.mel_filters,
            dynamic_floor=buffer.shape[0] >= self.dynamic_floor_from_samples,
            n_fft=self.n_fft,
            hop_length=self.hop_length,
        )

    def _stable_frames(self, buffer_samples: int) -> int:
        """Frames whose STFT window ends inside the buffer: (len - n_fft//2) // hop + 1."""
        if buffer_samples < self.n_fft // 2:
            return 0
        return (buffer_samples - self.n_fft // 2) // self.hop_length + 1

    def _slide(self, buffer: torch.Tensor, dropped: int, frames_emitted: int) -> tuple[torch.Tensor, int]:
        """Drop the oldest `stride` samples once the buffer reaches the trigger, keeping >= 1 s and every frame
        (with its STFT context) that the next emission still needs."""
        length = buffer.shape[0]
        if not self.enable_sliding_window or length < self.slide_trigger_samples:
            return buffer, dropped
        hop = self.hop_length
        keep = min(int(MIN_KEEP_SECONDS * self.sampling_rate), length - self.slide_stride_samples)
        drop = min(self.slide_stride_samples, max(0, length - keep))
        first_needed_frame = max(0, frames_emitted - self.redundancy_frames) - (self.n_fft // 2 + hop - 1) // hop
        drop = min(drop, max(0, first_needed_frame * hop - dropped))
        drop = (drop // hop) * hop
        if drop <= 0:
            return buffer, dropped
        return buffer[drop:], dropped + drop

    # --- streaming -------------------------------------------------------------------------------------------
    def step(
        self,
        samples_16k: Any,
        state: StreamingMelState | None = None,
        sampling_rate: int = SAMPLING_RATE,
        checked: bool = False,
    ) -> tuple[torch.Tensor | None, StreamingMelState]:
        """Take new 16 kHz mono samples (any length; empty = none) -> ([1, n_mels, frames] float32 or None, state).

        At most one chunk is processed per call (the duplex cadence: one call per 1-s unit); samples beyond it stay
        in `state.pending` for the next call. Returns None while the buffer lacks the next chunk or its stable
        frames. Bad audio raises InvalidAudioError / MultiChannelAudioError / UnsupportedSamplingRateError.
        `checked=True`: the caller passes a float32 1-D CPU tensor it has already validated (the processor's
        `duplex_unit`), so the waveform is checked once.
        """
        state = self.initial_state() if state is None else state
        new_samples = samples_16k if checked else self._as_samples(samples_16k, sampling_rate)
        pending = torch.cat([state.pending, new_samples])
        if state.is_first_chunk and self.pad_first_chunk and new_samples.numel() > 0:
            missing = self.first_chunk_pad_samples - pending.shape[0]
            if missing > 0:  # official duplex: left-pad the first unit with zeros to 1035 ms
                pending = torch.cat([torch.zeros(missing, dtype=torch.float32), pending])
        need = self.next_chunk_samples(state)
        if pending.shape[0] < need:
            return None, dataclasses.replace(state, pending=pending)

        buffer = torch.cat([state.buffer, pending[:need]])
        buffer, dropped = self._slide(buffer, state.samples_dropped, state.frames_emitted)
        mel_full = self._mel(buffer)
        base_frame = dropped // self.hop_length
        stable_end = base_frame + min(mel_full.shape[-1], self._stable_frames(buffer.shape[0]))

        core_start = state.frames_emitted
        core_end = core_start + self.chunk_frames
        new_state = StreamingMelState(
            buffer=buffer,
            pending=pending[need:],
            samples_consumed=state.samples_consumed + need,
            samples_dropped=dropped,
            frames_emitted=state.frames_emitted,
            is_first_chunk=False,
        )
        if stable_end < core_end + self.redundancy_frames:
            return None, new_state
        start = max(0, max(0, core_start - self.redundancy_frames) - base_frame)
        end = min(mel_full.shape[-1], core_end + self.redundancy_frames - base_frame)
        mel_chunk = mel_full[:, start:end].unsqueeze(0)
        return mel_chunk, dataclasses.replace(new_state, frames_emitted=core_end)

    def flush(self, state: StreamingMelState) -> tuple[torch.Tensor | None, StreamingMelState]:
        """End of stream: pending samples join the buffer and every frame not yet emitted as core comes out
        ([1, n_mels, frames], no left redundancy, the last frames use the STFT's reflect padding), or None if nothing
        is left or the buffer is shorter than one STFT window. The returned state has nothing left to emit."""
        buffer = torch.cat([state.buffer, state.pending])
        new_state = dataclasses.replace(
            state,
            buffer=buffer,
            pending=_empty_samples(),
            samples_consumed=state.samples_consumed + state.pending.shape[0],
            is_first_chunk=False,
        )
        if buffer.shape[0] < self.n_fft:
            return None, new_state
        mel_full = self._mel(buffer)
        base_frame = state.samples_dropped // self.hop_length
        total_frames = base_frame + mel_full.shape[-1]
        if state.frames_emitted >= total_frames:
            return None, new_state
        tail = mel_full[:, max(0, state.frames_emitted - base_frame) :].unsqueeze(0)
        return tail, dataclasses.replace(new_state, frames_emitted=total_frames)
