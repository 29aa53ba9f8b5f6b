"""16 kHz 80-bin log-mel features of MiniCPM-o 4.5 (official `MiniCPMAAudioProcessor`, a Whisper extractor).

Each waveform is cut into 30 s pieces; each piece is zero-padded to 30 s, turned into a Whisper log-mel
(dynamic floor max-8 over the padded piece, then (x+4)/4) and cut back to its real length of
ceil(samples/160) frames. Pieces of all waveforms are stacked, zero padded to the longest, with a frame mask.
"""

from __future__ import annotations

import math

import numpy as np
from transformers import WhisperFeatureExtractor
from transformers.feature_extraction_utils import BatchFeature

from ..audio_utils import (  # noqa: F401 (re-exported: the processor's audio errors and formulas)
    AUDIO_POOL_STEP,
    INPUT_SAMPLE_RATE,
    MEL_HOP_LENGTH,
    InvalidAudioError,
    MultiChannelAudioError,
    frames_to_token_count,
    mono_waveform,
    validate_waveform,
)
from ..errors import AudioInputError


SAMPLING_RATE = INPUT_SAMPLE_RATE
HOP_LENGTH = MEL_HOP_LENGTH
PIECE_SECONDS = 30


class UnsupportedSamplingRateError(AudioInputError):
    """Audio given at a rate other than 16 kHz; resample it first (e.g. torchaudio.functional.resample)."""


def split_into_pieces(num_samples: int, piece_samples: int = PIECE_SECONDS * SAMPLING_RATE) -> list[tuple[int, int]]:
    """(start, end) of the 30 s pieces; a tail too short to yield one audio token is dropped."""
    spans = [(start, min(start + piece_samples, num_samples)) for start in range(0, num_samples, piece_samples)]
    if len(spans) > 1 and frames_to_token_count(math.ceil((spans[-1][1] - spans[-1][0]) / HOP_LENGTH)) == 0:
        spans.pop()
    return spans


def audio_token_count(num_samples: int, pool_step: int = AUDIO_POOL_STEP) -> int:
    """Number of `<unk>` slots of a 16 kHz waveform with `num_samples` samples (10 per second), over 30 s pieces."""
    return sum(
        frames_to_token_count(math.ceil((end - start) / HOP_LENGTH), pool_step)
        for start, end in split_into_pieces(int(num_samples))
    )


class MiniCPMOFeatureExtractor(WhisperFeatureExtractor):
    """Whisper log-mel features with MiniCPM-o's 30 s piece splitting, real-length cut and frame mask."""

    model_input_names = ["input_features", "input_features_mask"]

    def __init__(
        self,
        feature_size: int = 80,
        sampling_rate: int = SAMPLING_RATE,
        hop_length: int = HOP_LENGTH,
        chunk_length: int = PIECE_SECONDS,
        n_fft: int = 400,
        padding_value: float = 0.0,
        audio_pool_step: int = AUDIO_POOL_STEP,
        **kwargs,
    ):
        for key in ("feature_extractor_type", "dither", "return_attention_mask", "n_samples", "nb_max_frames"):
            kwargs.pop(key, None)  # derived or fixed values found in saved configs
        super().__init__(
            feature_size=feature_size,
            sampling_rate=sampling_rate,
            hop_length=hop_length,
            chunk_length=chunk_length,
            n_fft=n_fft,
            padding_value=padding_value,
            dither=0.0,
            return_attention_mask=False,
            **kwargs,
        )
        self.audio_pool_step = int(audio_pool_step)

    def token_count(self, num_samples: int) -> int:
        """Audio placeholder length for a waveform of `num_samples` samples."""
        pieces = split_into_pieces(int(num_samples), self.n_samples)
        return sum(
            frames_to_token_count(math.ceil((end - start) / self.hop_length), self.audio_pool_step)
            for start, end in pieces
        )

    def pieces_features(self, pieces: list[np.ndarray]) -> list[np.ndarray]:
        """Log-mel [80, ceil(len/160)] of pieces of at most 30 s, each floored over its 30 s zero-padded copy.

        Uses Whisper's torch STFT path, as the official processor does when torch is installed.
        """
        padded = np.zeros((len(pieces), self.n_samples), dtype=np.float32)
        for row, piece in enumerate(pieces):
            padded[row, : piece.shape[0]] = piece
        features = self._torch_extract_fbank_features(padded, "cpu")
        return [
            np.asarray(features[row, :, : math.ceil(piece.shape[0] / self.hop_length)], dtype=np.float32)
            for row, piece in enumerate(pieces)
        ]

    def __call__(self, raw_speech, sampling_rate: int | None = None, return_tensors=None, **kwargs) -> BatchFeature:
        """Features of one waveform or a list of waveforms (16 kHz mono).

        Returns `input_features` [N_pieces, 80, T_max] (zero padded) and `input_features_mask` [N_pieces, T_max]
        (1 = real frame), plus `num_pieces` (pieces per waveform, in order).
        """
        if kwargs:
            raise TypeError(f"unexpected arguments for MiniCPMOFeatureExtractor: {sorted(kwargs)}")
        if sampling_rate is not None and int(sampling_rate) != self.sampling_rate:
            raise UnsupportedSamplingRateError(
                f"audio sampling rate is {sampling_rate} Hz but MiniCPM-o needs {self.sampling_rate} Hz; resample it"
            )
        is_batch = isinstance(raw_speech, (list, tuple)) and len(raw_speech) > 0 and not np.isscalar(raw_speech[0])
        waveforms = list(raw_speech) if is_batch else [raw_speech]
        pieces, num_pieces = [], []
        for index, waveform in enumerate(waveforms):
            samples = validate_waveform(waveform, name=f"audio[{index}]" if is_batch else "audio")
            if self.token_count(samples.shape[0]) == 0:
                min_samples = (2 * self.audio_pool_step - 2) * self.hop_length + 1
                raise InvalidAudioError(
                    f"audio of {samples.shape[0]} samples is too short: one audio token needs at least "
                    f"{min_samples} samples ({1000 * min_samples / self.sampling_rate:.0f} ms at 16 kHz)"
                )
            spans = split_into_pieces(samples.shape[0], self.n_samples)
            pieces.extend(samples[start:end] for start, end in spans)
            num_pieces.append(len(spans))
        pieces = self.pieces_features(pieces)
        max_frames = max(piece.shape[1] for piece in pieces)
        features = np.zeros((len(pieces), self.feature_size, max_frames), dtype=np.float32)
        mask = np.zeros((len(pieces), max_frames), dtype=np.int64)
        for row, piece in enumerate(pieces):
            features[row, :, : piece.shape[1]] = piece
            mask[row, : piece.shape[1]] = 1
        return BatchFeature(
            data={"input_features": features, "input_features_mask": mask, "num_pieces": num_pieces},
            tensor_type=return_tensors,
        )
