"""S3 speech tokenizer v2: 16 kHz speech -> 25 discrete codes per second (codebook 3^8 = 6561).

MiniCPM-o 4.5's speech decoder emits these codes (official §6) and token2wav turns them back into
audio (official §7). The official tokenizer ships only as ``speech_tokenizer_v2_25hz.onnx``
(CosyVoice2). This module rebuilds the same network in PyTorch. It is used to make speech-decoder
training targets and the token2wav prompt tokens. Architecture facts come from the public
reimplementation (the ``s3tokenizer`` PyPI package, ``S3TokenizerV2`` / ``AudioEncoderV2``) and its
``ModelConfig``. No code was copied.

Pipeline (shapes for one utterance of N samples at 16 kHz):

1. ``log_mel_128``: the Whisper front-end that CosyVoice feeds the ONNX model.
   ``torch.stft(n_fft=400, hop=160, periodic Hann(400), center=True, reflect)``, drop the last frame,
   power ``|X|^2``, 128-band Slaney mel filterbank over 0..8000 Hz (librosa's default, the
   ``mel_filters.npz`` table the package ships), ``log10(clamp(., 1e-10))``, floor at the
   utterance's global max - 8, then ``(x + 4) / 4``.
   Evidence: ``s3tokenizer.utils.log_mel_spectrogram`` is Whisper's ``audio.py`` with ``n_mels=128``.
   The tests check that the output equals transformers' ``WhisperFeatureExtractor(feature_size=128)``
   torch path. Frames: ``T = N // 160`` (100 per second).
2. Conv front-end: Conv1d(128 -> C, k3, stride 2, pad 1) -> GELU -> Conv1d(C -> C, k3, stride 2, pad 1)
   -> GELU, so the rate drops 4x to 25 Hz. C = ``n_state`` = 1280.
3. ``n_layer`` = 6 pre-LN blocks. Each block:
   ``x + Attn(LN_eps1e-6(x))``, then ``x + MLP(LN_eps1e-5(x))``, where the MLP is Linear(C, 4C) -> GELU(erf) -> Linear.
   Attention has 20 heads of 64. q, v and out have a bias; k has none. Rotary embedding is applied over the full head
   dim (theta 1e4, rotate-half layout, the same as Llama). Added to the attention output is an FSMN memory: a
   depthwise Conv1d (kernel 31, zero pad 15 + 15, no bias) over the value projection, plus that value (residual).
   There is no absolute position table and no final LayerNorm.
4. FSQ: Linear(C -> 8), ``tanh``, scale by 0.999, round, so each digit is in {-1, 0, 1}.
   ``code = sum_i (digit_i + 1) * 3**i`` (dimension 0 is least significant), giving 0..6560.
   Token 4218 is silence. The quantiser here is ``vector_quantize_pytorch.FSQ(levels=[3]*8, dim=C)``.
   That FSQ bounds with ``tanh * 1.001``. ``S3FSQ`` swaps in the official 0.999 (``eps=-1e-3``), so
   the rounding thresholds match too. The index layout (cumprod basis [1, 3, 9, ...]) is already the same.
   FSQ also brings ``project_out`` (8 -> C) and straight-through rounding. These are what make the
   module trainable. The official network has no up-projection.

Length: ``n_codes = ceil(ceil(T / 2) / 2) = (N // 160 + 3) // 4``. This equals ``ceil(25 * seconds)`` whenever N
is a multiple of 160 (1 s -> 25 codes). Batches are right-padded, and every padded position is masked before
each conv, the FSMN and the attention keys, so ``encode_batch`` gives exactly ``encode`` per item. The public
code falls back to 30 s windows with 4 s overlap above 3000 mel frames. Here longer inputs raise
``SpeechTokenizerAudioTooLongError``. The limit is ``2 * n_audio_ctx`` mel frames = 30 s.

Public checkpoint -> this module (``convert_public_s3tokenizer_v2_state_dict``). These are the names that
``s3tokenizer``'s ``onnx2torch`` writes for ``speech_tokenizer_v2_25hz``: 102 tensors, shapes for C = 1280.

================================================  ============================================  ===============
public (S3TokenizerV2)                            this module                                   shape
================================================  ============================================  ===============
encoder.conv1.{weight,bias}                       encoder.conv1.{weight,bias}                   [C,128,3], [C]
encoder.conv2.{weight,bias}                       encoder.conv2.{weight,bias}                   [C,C,3], [C]
encoder.blocks.{i}.attn.query.{weight,bias}       same name                                     [C,C], [C]
encoder.blocks.{i}.attn.key.weight                same name (no bias)                           [C,C]
encoder.blocks.{i}.attn.value.{weight,bias}       same name                                     [C,C], [C]
encoder.blocks.{i}.attn.out.{weight,bias}         same name                                     [C,C], [C]
encoder.blocks.{i}.attn.fsmn_block.weight         same name                                     [C,1,31]
encoder.blocks.{i}.attn_ln.{weight,bias}          same name                                     [C]
encoder.blocks.{i}.mlp.0.{weight,bias}            same name                                     [4C,C], [4C]
encoder.blocks.{i}.mlp.2.{weight,bias}            same name                                     [C,4C], [C]
encoder.blocks.{i}.mlp_ln.{weight,bias}           same name                                     [C]
quantizer._codebook.project_down.{weight,bias}    quantizer.project_in.{weight,bias}            [8,C], [8]
(none: the ONNX graph ends at the indices)        quantizer.project_out.{weight,bias}           [C,8], [C]
================================================  ============================================  ===============

``project_out`` is filled with the least-squares inverse of ``project_in`` (pseudo-inverse W+, bias -W+ b).
It never changes the codes, only ``codes_to_features`` and training. Pickled ``.pt`` checkpoints are not
read here. Convert them once with trusted code to safetensors, then pass the loaded dict.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from ..audio_utils import INPUT_SAMPLE_RATE
from ..audio_utils import (  # noqa: F401 (audio error types re-exported with the tokenizer)
    AudioDtypeError,
    EmptyAudioError,
    MultiChannelAudioError,
    NonFiniteAudioError,
    mono_waveform,
)
from ..configuration.configuration_token2wav import (  # noqa: F401 (config errors re-exported with the tokenizer)
    S3TokenizerCheckpointError,
    S3TokenizerConfig,
    S3TokenizerConfigError,
)
from ..errors import AudioInputError
from ..special_tokens import IGNORE_INDEX, SPEECH_CODEBOOK_SIZE

try:  # optional: the quantiser's library
    from vector_quantize_pytorch import FSQ as _FSQ
except ImportError:  # pragma: no cover - exercised only on installs without the extra
    _FSQ = None

try:  # pinned dependency, but keep a missing install readable
    import torchaudio.functional as _taf
except ImportError:  # pragma: no cover
    _taf = None


S3_SAMPLE_RATE = INPUT_SAMPLE_RATE
S3_N_FFT = 400
S3_HOP_LENGTH = 160
S3_TOKEN_RATE = 25
S3_CODEBOOK_SIZE = SPEECH_CODEBOOK_SIZE  # 3^8
S3_SILENCE_CODE = 4218
S3_MIN_SAMPLES = S3_N_FFT // 2 + 1  # the centred STFT reflect-pads n_fft // 2 samples
OFFICIAL_FSQ_SCALE = 0.999  # float32 0.9990000128746033 in the ONNX graph
DEFAULT_PADDING_CODE = IGNORE_INDEX  # the label ignore index of transformers / torch losses


class SpeechTokenizerInputError(AudioInputError):
    """Audio or features handed to the S3 speech tokenizer are unusable."""


class SampleRateError(SpeechTokenizerInputError):
    """The S3 tokenizer takes 16 kHz audio only; resample first."""


class AudioTooShortError(SpeechTokenizerInputError):
    """The waveform is shorter than one centred STFT window can reflect-pad."""


class SpeechTokenizerAudioTooLongError(SpeechTokenizerInputError):
    """The waveform is longer than one encoder window (30 s for v2)."""


def num_s3_codes(num_samples: int) -> int:
    """Codes for ``num_samples`` at 16 kHz: mel frames ``N // 160``, then two ceil-halvings."""
    return (int(num_samples) // S3_HOP_LENGTH + 3) // 4


def _halve_lengths(lengths: torch.Tensor) -> torch.Tensor:
    """Output length of Conv1d(k=3, stride=2, padding=1): ceil(L / 2)."""
    return (lengths + 1) // 2


def _valid_mask(lengths: torch.Tensor, max_len: int) -> torch.Tensor:
    """[B] lengths -> [B, max_len] bool, True on real positions."""
    return torch.arange(max_len, device=lengths.device)[None, :] < lengths[:, None]


def _require_library(module, what: str):
    if module is None:
        raise ImportError(f"the S3 speech tokenizer needs {what}")


def _as_mono_16k(wav, sample_rate: int, name: str = "audio") -> torch.Tensor:
    """Validate one waveform and return it as float32 Tensor [N] (int16 is scaled to [-1, 1))."""
    if int(sample_rate) != S3_SAMPLE_RATE:
        raise SampleRateError(
            f"{name}: the S3 tokenizer needs {S3_SAMPLE_RATE} Hz audio, got {sample_rate} Hz; "
            "resample first (torchaudio.functional.resample)"
        )
    tensor = mono_waveform(wav, name)
    if tensor.numel() < S3_MIN_SAMPLES:
        raise AudioTooShortError(
            f"{name} has {tensor.numel()} samples; the S3 tokenizer needs at least {S3_MIN_SAMPLES} (12.6 ms at 16 kHz)"
        )
    return tensor


@functools.lru_cache(maxsize=4)
def _mel_filterbank(n_mels: int = 128) -> torch.Tensor:
    """[n_mels, 201] Slaney-scale, Slaney-normalised triangles over 0..8000 Hz (= librosa.filters.mel defaults)."""
    _require_library(_taf, "torchaudio")
    fbank = _taf.melscale_fbanks(
        n_freqs=S3_N_FFT // 2 + 1, f_min=0.0, f_max=S3_SAMPLE_RATE / 2, n_mels=n_mels,
        sample_rate=S3_SAMPLE_RATE, norm="slaney", mel_scale="slaney",
    )
    return fbank.T.contiguous()


def log_mel_128(wav16k, sample_rate: int = S3_SAMPLE_RATE, device=None) -> torch.Tensor:
    """Whisper-style 128-bin log-mel of one 16 kHz mono waveform -> float32 [128, N // 160]."""
    audio = _as_mono_16k(wav16k, sample_rate)
    if device is not None:
        audio = audio.to(device)
    window = torch.hann_window(S3_N_FFT, device=audio.device)
    spectrum = torch.stft(audio, S3_N_FFT, S3_HOP_LENGTH, window=window, return_complex=True)
    power = spectrum[..., :-1].abs() ** 2
    mel = _mel_filterbank(128).to(audio.device) @ power
    log_mel = torch.clamp(mel, min=1e-10).log10()
    log_mel = torch.maximum(log_mel, log_mel.max() - 8.0)
    return (log_mel + 4.0) / 4.0


class S3FSQ(_FSQ if _FSQ is not None else nn.Module):
    """``vector_quantize_pytorch.FSQ`` with the official rounding thresholds (``tanh * 0.999``, not ``* 1.001``)."""

    def __init__(self, levels: list[int], dim: int):
        _require_library(_FSQ, "vector-quantize-pytorch (pip install vector-quantize-pytorch)")
        # FSQ's constructor calls `.item()`, which fails under transformers' meta-device init; its few parameters
        # (two small projections) are built on the CPU instead and loaded/initialised like any other.
        with torch.device("cpu"):
            super().__init__(levels=list(levels), dim=dim)
        self.level_values = [int(level) for level in levels]

    def bound(self, z, eps: float = OFFICIAL_FSQ_SCALE - 1.0, hard_clamp: bool = False):
        # FSQ scales tanh by (L - 1) * (1 + eps) / 2; eps = -1e-3 gives 0.999 for L = 3, the ONNX graph's constant.
        return super().bound(z, eps=eps, hard_clamp=hard_clamp)

    def recreate_buffers(self) -> None:
        """Rebuild the non-persistent lookup buffers (they are garbage after ``to_empty``)."""
        levels = self.level_values
        device = self.project_in.weight.device
        self._levels = torch.tensor(levels, dtype=torch.int32, device=device)
        self._basis = torch.cumprod(torch.tensor([1] + levels[:-1], device=device), dim=0, dtype=torch.int32)
        self.implicit_codebook = self._indices_to_codes(torch.arange(math.prod(levels), device=device))


@dataclass
class S3TokenizerOutput:
    """Everything one forward pass computes; ``quantized`` carries straight-through gradients."""

    features: torch.Tensor  # [B, n, n_state] encoder output before the quantiser
    quantized: torch.Tensor  # [B, n, n_state] project_out(FSQ digits): the features rebuilt from the codes
    codes: torch.Tensor  # [B, n] int64 in [0, 6561); padded positions hold padding_value
    lengths: torch.Tensor  # [B] int64 valid codes per item


class FSMNSelfAttention(nn.Module):
    """Rotary multi-head self-attention plus a depthwise-conv memory over the values (S3 v2 "FSMN" attention)."""

    def __init__(self, config: S3TokenizerConfig):
        super().__init__()
        width = config.n_state
        self.n_head = config.n_head
        self.head_dim = config.head_dim
        self.rope_theta = config.rope_theta
        self.query = nn.Linear(width, width)
        self.key = nn.Linear(width, width, bias=False)
        self.value = nn.Linear(width, width)
        self.out = nn.Linear(width, width)
        self.fsmn_block = nn.Conv1d(
            width, width, config.fsmn_kernel_size, padding=config.fsmn_kernel_size // 2, groups=width, bias=False
        )

    def rotary_cos_sin(self, length: int, device, dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """[1, length, head_dim] cos and sin (computed per call: no buffer to lose on meta-device init)."""
        exponents = torch.arange(0, self.head_dim, 2, device=device, dtype=torch.float32) / self.head_dim
        inv_freq = 1.0 / (self.rope_theta**exponents)
        angles = torch.outer(torch.arange(length, device=device, dtype=torch.float32), inv_freq)
        angles = torch.cat((angles, angles), dim=-1)[None]
        return angles.cos().to(dtype), angles.sin().to(dtype)

    def forward(self, hidden: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        batch, length, width = hidden.shape
        heads = (batch, length, self.n_head, self.head_dim)
        query = self.query(hidden).view(heads).transpose(1, 2)
        key = self.key(hidden).view(heads).transpose(1, 2)
        value = self.value(hidden)
        cos, sin = self.rotary_cos_sin(length, hidden.device, hidden.dtype)
        query, key = apply_rotary_pos_emb(query, key, cos, sin)

        keep = valid[:, None, None, :]
        attended = F.scaled_dot_product_attention(query, key, value.view(heads).transpose(1, 2), attn_mask=keep)
        attended = self.out(attended.transpose(1, 2).reshape(batch, length, width))

        masked_value = value * valid[..., None].to(value.dtype)
        memory = self.fsmn_block(masked_value.transpose(1, 2)).transpose(1, 2) + masked_value
        return attended + memory * valid[..., None].to(memory.dtype)


class S3EncoderBlock(nn.Module):
    """Pre-LN residual block: FSMN attention, then a 4x GELU MLP."""

    def __init__(self, config: S3TokenizerConfig):
        super().__init__()
        self.attn = FSMNSelfAttention(config)
        self.attn_ln = nn.LayerNorm(config.n_state, eps=config.attn_ln_eps)
        hidden = config.n_state * config.mlp_ratio
        self.mlp = nn.Sequential(nn.Linear(config.n_state, hidden), nn.GELU(), nn.Linear(hidden, config.n_state))
        self.mlp_ln = nn.LayerNorm(config.n_state, eps=config.mlp_ln_eps)

    def forward(self, hidden: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        hidden = hidden + self.attn(self.attn_ln(hidden), valid)
        return hidden + self.mlp(self.mlp_ln(hidden))


class S3AudioEncoder(nn.Module):
    """Log-mel [B, 128, T] -> features [B, ceil(T / 4), n_state]; padded frames never reach real ones."""

    def __init__(self, config: S3TokenizerConfig):
        super().__init__()
        self.conv1 = nn.Conv1d(config.n_mels, config.n_state, kernel_size=3, stride=2, padding=1)
        self.conv2 = nn.Conv1d(config.n_state, config.n_state, kernel_size=3, stride=2, padding=1)
        self.blocks = nn.ModuleList([S3EncoderBlock(config) for _ in range(config.n_layer)])

    def forward(self, mel: torch.Tensor, mel_lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        hidden = mel * _valid_mask(mel_lengths, mel.shape[-1])[:, None, :].to(mel.dtype)
        hidden = F.gelu(self.conv1(hidden))
        lengths = _halve_lengths(mel_lengths)
        hidden = hidden * _valid_mask(lengths, hidden.shape[-1])[:, None, :].to(hidden.dtype)
        hidden = F.gelu(self.conv2(hidden))
        lengths = _halve_lengths(lengths)
        valid = _valid_mask(lengths, hidden.shape[-1])
        hidden = hidden.transpose(1, 2)
        for block in self.blocks:
            hidden = block(hidden, valid)
        return hidden * valid[..., None].to(hidden.dtype), lengths


class S3SpeechTokenizer(nn.Module):
    """S3 tokenizer v2: ``encode(wav16k) -> LongTensor[n]`` codes in [0, 6561), 25 per second.

    ``forward(mel, mel_lengths)`` is the differentiable path (straight-through FSQ) for training or
    distillation; ``encode`` / ``encode_batch`` are the no-grad inference paths on raw 16 kHz audio.
    """

    def __init__(self, config: S3TokenizerConfig | None = None):
        super().__init__()
        _require_library(_FSQ, "vector-quantize-pytorch (pip install vector-quantize-pytorch)")
        self.config = config if config is not None else S3TokenizerConfig()
        self.encoder = S3AudioEncoder(self.config)
        self.quantizer = S3FSQ(levels=self.config.fsq_levels, dim=self.config.n_state)

    # ----------------------------------------------------------------------------------- loading
    @classmethod
    def from_public_state_dict(cls, state_dict: dict, config: S3TokenizerConfig | None = None) -> "S3SpeechTokenizer":
        """Build from public S3TokenizerV2 weights (names as ``onnx2torch`` writes them), strict loading."""
        config = config if config is not None else S3TokenizerConfig.from_public_state_dict(state_dict)
        model = cls(config)
        model.load_state_dict(convert_public_s3tokenizer_v2_state_dict(state_dict), strict=True)
        return model.eval()

    def recreate_buffers(self) -> None:
        """Rebuild FSQ's non-persistent lookup tables, e.g. after ``to_empty`` from the meta device."""
        self.quantizer.recreate_buffers()

    # ----------------------------------------------------------------------------------- core
    @property
    def device(self) -> torch.device:
        return self.quantizer.project_in.weight.device

    def forward(
        self, mel: torch.Tensor, mel_lengths: torch.Tensor | None = None, padding_value: int = DEFAULT_PADDING_CODE
    ) -> S3TokenizerOutput:
        """mel [B, 128, T] (right-padded), mel_lengths [B] -> features, quantized, codes [B, ceil(T/4)], lengths."""
        if mel.dim() != 3 or mel.shape[1] != self.config.n_mels:
            raise SpeechTokenizerInputError(f"mel must be [B, {self.config.n_mels}, T], got {tuple(mel.shape)}")
        if mel_lengths is None:
            mel_lengths = torch.full((mel.shape[0],), mel.shape[-1], dtype=torch.long, device=mel.device)
        mel_lengths = mel_lengths.to(device=mel.device, dtype=torch.long)
        if mel_lengths.shape != (mel.shape[0],) or (mel_lengths < 1).any() or (mel_lengths > mel.shape[-1]).any():
            raise SpeechTokenizerInputError(
                f"mel_lengths must be [B] in 1..{mel.shape[-1]}, got {mel_lengths.tolist()}"
            )
        if int(mel_lengths.max()) > self.config.max_mel_frames:
            raise SpeechTokenizerAudioTooLongError(
                f"{int(mel_lengths.max())} mel frames exceed one S3 window of {self.config.max_mel_frames} "
                f"({self.config.max_mel_frames / 100:.0f} s); split the audio first"
            )
        features, lengths = self.encoder(mel.to(self.quantizer.project_in.weight.dtype), mel_lengths)
        quantized, codes = self.quantizer(features)
        codes = codes.long()
        valid = _valid_mask(lengths, codes.shape[-1])
        codes = codes.masked_fill(~valid, padding_value)
        return S3TokenizerOutput(features=features, quantized=quantized, codes=codes, lengths=lengths)

    def codes_to_features(self, codes: torch.Tensor) -> torch.Tensor:
        """Codes [...] -> project_out(FSQ digits) [..., n_state]; the inverse map that training uses."""
        codes = torch.as_tensor(codes, device=self.device)
        if codes.is_floating_point() or ((codes < 0) | (codes >= self.config.codebook_size)).any():
            raise SpeechTokenizerInputError(f"codes must be integers in [0, {self.config.codebook_size})")
        return self.quantizer.indices_to_codes(codes.long())

    # ----------------------------------------------------------------------------------- audio API
    @staticmethod
    def num_codes(num_samples: int) -> int:
        return num_s3_codes(num_samples)

    def log_mel_128(self, wav16k, sample_rate: int = S3_SAMPLE_RATE) -> torch.Tensor:
        """[128, N // 160] log-mel of one waveform, on this module's device."""
        return log_mel_128(wav16k, sample_rate, device=self.device)

    @torch.no_grad()
    def encode(self, wav16k, sample_rate: int = S3_SAMPLE_RATE) -> torch.Tensor:
        """One 16 kHz mono waveform -> LongTensor[(N // 160 + 3) // 4] of codes in [0, 6561)."""
        mel = self.log_mel_128(wav16k, sample_rate)
        output = self.forward(mel[None], torch.tensor([mel.shape[-1]], device=mel.device))
        return output.codes[0].cpu()

    @torch.no_grad()
    def encode_batch(
        self, wavs, sample_rate: int = S3_SAMPLE_RATE, padding_value: int = DEFAULT_PADDING_CODE
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """List of waveforms -> (codes [B, Nmax], lengths [B]); row i is ``encode(wavs[i])`` then ``padding_value``.

        The default padding value -100 is the ignore index of transformers losses, handy for training targets.
        """
        if isinstance(wavs, (np.ndarray, torch.Tensor)) or len(wavs) == 0:
            raise SpeechTokenizerInputError("encode_batch takes a non-empty list of 1-D waveforms")
        mels = [self.log_mel_128(wav, sample_rate) for wav in wavs]
        mel_lengths = torch.tensor([mel.shape[-1] for mel in mels], device=self.device)
        padded = nn.utils.rnn.pad_sequence([mel.T for mel in mels], batch_first=True).transpose(1, 2)
        output = self.forward(padded, mel_lengths, padding_value=padding_value)
        return output.codes.cpu(), output.lengths.cpu()


def convert_public_s3tokenizer_v2_state_dict(state_dict: dict) -> dict:
    """Public ``S3TokenizerV2`` state dict -> this module's names (see the table in the module docstring)."""
    converted = {}
    unexpected = []
    for name, tensor in state_dict.items():
        if name.startswith(("encoder.conv1.", "encoder.conv2.", "encoder.blocks.")):
            converted[name] = tensor
        elif name == "quantizer._codebook.project_down.weight":
            converted["quantizer.project_in.weight"] = tensor
        elif name == "quantizer._codebook.project_down.bias":
            converted["quantizer.project_in.bias"] = tensor
        else:
            unexpected.append(name)
    if unexpected:
        raise S3TokenizerCheckpointError(f"keys outside the public S3 tokenizer v2 layout: {sorted(unexpected)}")
    if "quantizer.project_in.weight" not in converted or "quantizer.project_in.bias" not in converted:
        raise S3TokenizerCheckpointError("missing quantizer._codebook.project_down.{weight,bias}")
    weight = converted["quantizer.project_in.weight"].float()
    bias = converted["quantizer.project_in.bias"].float()
    inverse = torch.linalg.pinv(weight)  # [C, 8]
    dtype = converted["quantizer.project_in.weight"].dtype
    converted["quantizer.project_out.weight"] = inverse.to(dtype)
    converted["quantizer.project_out.bias"] = (-(inverse @ bias)).to(dtype)
    return converted
