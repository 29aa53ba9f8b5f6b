"""HiFT vocoder (24 kHz, 480 samples per mel frame) used by token2wav, with chunk streaming.

HiFT = neural source-filter + iSTFTNet: an F0 predictor reads the mel, a harmonic-plus-noise source
is synthesised from that F0, the source's STFT is injected at every upsampling stage of a HiFi-GAN
style generator, and the generator predicts a 16-point magnitude/phase spectrogram (hop 4) that an
inverse STFT turns into samples. Parameter names follow the official CosyVoice2 ``HiFTGenerator``
(checkpoint ``hift.pt``, prefix ``hift_original.`` in ``token2wav_state_dict.tsv``) so its state dict
loads unchanged; the code itself is written from the description in the spec (section 7).

Streaming follows minicpmo-utils 1.0.5: every chunk is re-vocoded together with the last 8 mel
frames of the previous chunk, the first 3840 source samples are replaced by the cached source so the
excitation is continuous, the overlap is Hamming cross-faded with the held-back tail of the previous
chunk, and the last 3840 samples are held back until the next chunk (or emitted on the final one).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.parametrizations import weight_norm

from ..configuration.configuration_token2wav import HiFTConfig
from ..errors import SpeechOutputError


class HiFTInputError(SpeechOutputError):
    """A mel spectrogram or stream state handed to the vocoder is unusable."""


def _same_padding(kernel_size: int, dilation: int = 1) -> int:
    return (kernel_size - 1) * dilation // 2


def _normal_conv(conv: nn.Module, std: float = 0.01) -> nn.Module:
    """HiFi-GAN initialisation (N(0, 0.01)), applied before the weight-norm split."""
    nn.init.normal_(conv.weight, 0.0, std)
    return conv


class Snake(nn.Module):
    """Snake activation x + sin^2(alpha x) / alpha with one learned alpha per channel."""

    def __init__(self, channels: int):
        super().__init__()
        self.alpha = nn.Parameter(torch.ones(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        alpha = self.alpha[None, :, None]
        return x + torch.sin(x * alpha).pow(2) / (alpha + 1e-9)


class SnakeResBlock(nn.Module):
    """HiFi-GAN residual block: per dilation, snake -> dilated conv -> snake -> conv, plus skip."""

    def __init__(self, channels: int, kernel_size: int, dilations: tuple[int, ...]):
        super().__init__()

        def conv(dilation: int) -> nn.Module:
            layer = nn.Conv1d(
                channels, channels, kernel_size, dilation=dilation, padding=_same_padding(kernel_size, dilation)
            )
            return weight_norm(_normal_conv(layer))

        self.convs1 = nn.ModuleList(conv(d) for d in dilations)
        self.convs2 = nn.ModuleList(conv(1) for _ in dilations)
        self.activations1 = nn.ModuleList(Snake(channels) for _ in dilations)
        self.activations2 = nn.ModuleList(Snake(channels) for _ in dilations)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for act1, conv1, act2, conv2 in zip(self.activations1, self.convs1, self.activations2, self.convs2):
            x = x + conv2(act2(conv1(act1(x))))
        return x


class F0Predictor(nn.Module):
    """Frame-rate F0 (Hz, non-negative) from the mel: a stack of k=3 convs with ELU, then a linear head."""

    def __init__(self, in_channels: int, channels: int, num_convs: int):
        super().__init__()
        layers: list[nn.Module] = []
        for index in range(num_convs):
            layers.append(weight_norm(nn.Conv1d(in_channels if index == 0 else channels, channels, 3, padding=1)))
            layers.append(nn.ELU())
        self.condnet = nn.Sequential(*layers)  # convs sit at even indices 0, 2, 4, ...
        self.classifier = nn.Linear(channels, 1)

    def forward(self, mel: torch.Tensor) -> torch.Tensor:
        """[B, 80, T] -> [B, T]."""
        hidden = self.condnet(mel).transpose(1, 2)
        return self.classifier(hidden).squeeze(-1).abs()


class HarmonicNoiseSource(nn.Module):
    """Harmonic-plus-noise excitation at the audio rate from a frame-rate F0.

    Harmonic k (k = 1..nb_harmonics+1) has instantaneous phase 2*pi*cumsum(k*f0/sr) integrated at the
    frame rate and linearly interpolated to the sample rate (as the official 24 kHz source does;
    its random initial phase is discarded by that decimation, so the harmonics start at phase 0).
    Unvoiced samples (F0 <= threshold) carry only noise of std alpha/3, voiced ones the sines plus
    noise of std sigma. A learned linear layer + tanh merges the harmonics into one channel.
    """

    def __init__(self, config: HiFTConfig):
        super().__init__()
        self.sampling_rate = config.sampling_rate
        self.samples_per_frame = config.samples_per_frame
        self.num_sines = config.nb_harmonics + 1
        self.sine_amp = config.nsf_alpha
        self.noise_std = config.nsf_sigma
        self.voiced_threshold = config.nsf_voiced_threshold
        self.l_linear = nn.Linear(self.num_sines, 1)

    def forward(self, f0: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """f0 [B, T] in Hz -> source [B, 1, T * samples_per_frame]."""
        hop = self.samples_per_frame
        f0 = f0.detach()  # like the official source, no gradient flows back into the F0 predictor
        # float64 keeps the running phase exact over long utterances (MPS has no float64).
        phase_dtype = torch.float32 if f0.device.type == "mps" else torch.float64
        harmonics = torch.arange(1, self.num_sines + 1, device=f0.device, dtype=phase_dtype)
        cycles_per_sample = (f0.to(phase_dtype)[:, None, :] * harmonics[None, :, None] / self.sampling_rate) % 1
        phase_at_frames = torch.cumsum(cycles_per_sample, dim=-1) * (2 * math.pi * hop)
        phase = F.interpolate(phase_at_frames, scale_factor=hop, mode="linear")
        sines = self.sine_amp * torch.sin(phase).to(f0.dtype)  # [B, H, N]

        voiced = (f0 > self.voiced_threshold).to(f0.dtype).repeat_interleave(hop, dim=-1)[:, None, :]
        noise_std = voiced * self.noise_std + (1 - voiced) * (self.sine_amp / 3)
        noise = torch.randn(sines.shape, generator=generator, device=f0.device, dtype=f0.dtype)
        excitation = sines * voiced + noise_std * noise
        return torch.tanh(self.l_linear(excitation.transpose(1, 2))).transpose(1, 2)


@dataclass(frozen=True)
class HiFTStreamState:
    """Everything the vocoder carries between chunks (1.0.5 scheme). Treat as immutable.

    mel_cache: last <= 8 mel frames [1, 80, m]; source_cache: their excitation [1, 1, m*480];
    speech_cache: the held-back tail [1, m*480] not yet emitted; seed/step make the noise
    reproducible per chunk; finished is set after the final chunk.
    """

    mel_cache: torch.Tensor | None = None
    source_cache: torch.Tensor | None = None
    speech_cache: torch.Tensor | None = None
    seed: int | None = None
    step: int = 0
    finished: bool = False
    samples_emitted: int = 0


class HiFTVocoder(nn.Module):
    """Mel [B, 80, T] -> 24 kHz waveform [B, T * 480]; state-dict compatible with ``hift.pt``."""

    def __init__(self, config: HiFTConfig | None = None):
        super().__init__()
        self.config = config = config or HiFTConfig()
        channels = [config.base_channels // (2**i) for i in range(len(config.upsample_rates) + 1)]
        spectrum_channels = config.istft_n_fft + 2  # real + imaginary parts of n_fft/2+1 bins

        self.m_source = HarmonicNoiseSource(config)
        self.conv_pre = weight_norm(nn.Conv1d(config.in_channels, channels[0], 7, padding=3))
        self.ups = nn.ModuleList(
            weight_norm(_normal_conv(nn.ConvTranspose1d(channels[i], channels[i + 1], k, u, padding=(k - u) // 2)))
            for i, (u, k) in enumerate(zip(config.upsample_rates, config.upsample_kernel_sizes))
        )

        # The source STFT (hop 4) is brought to each stage's rate: strides 15, 3, 1 for rates 8, 5, 3.
        stage_strides = [math.prod(config.upsample_rates[i + 1 :]) for i in range(len(config.upsample_rates))]
        self.source_downs = nn.ModuleList()
        self.source_resblocks = nn.ModuleList()
        for i, (stride, kernel, dilations) in enumerate(
            zip(stage_strides, config.source_resblock_kernel_sizes, config.source_resblock_dilation_sizes)
        ):
            if stride == 1:
                down = nn.Conv1d(spectrum_channels, channels[i + 1], 1)
            else:
                down = nn.Conv1d(spectrum_channels, channels[i + 1], 2 * stride, stride, padding=stride // 2)
            self.source_downs.append(down)
            self.source_resblocks.append(SnakeResBlock(channels[i + 1], kernel, tuple(dilations)))

        self.resblocks = nn.ModuleList(
            SnakeResBlock(channels[i + 1], kernel, tuple(dilations))
            for i in range(len(config.upsample_rates))
            for kernel, dilations in zip(config.resblock_kernel_sizes, config.resblock_dilation_sizes)
        )
        self.conv_post = weight_norm(_normal_conv(nn.Conv1d(channels[-1], spectrum_channels, 7, padding=3)))
        self.f0_predictor = F0Predictor(config.in_channels, config.f0_predictor_channels, config.f0_predictor_num_convs)

    # ------------------------------------------------------------------ spectral helpers
    def _window(self, reference: torch.Tensor) -> torch.Tensor:
        # Built per call (not a buffer) so meta-device construction never leaves it uninitialised.
        return torch.hann_window(self.config.istft_n_fft, periodic=True, device=reference.device, dtype=torch.float32)

    def _source_spectrum(self, source: torch.Tensor) -> torch.Tensor:
        """[B, 1, N] -> [B, n_fft + 2, N / hop + 1] (real bins then imaginary bins)."""
        n_fft, hop = self.config.istft_n_fft, self.config.istft_hop_length
        spec = torch.stft(
            source.squeeze(1).float(), n_fft, hop, n_fft, window=self._window(source), return_complex=True
        )
        return torch.cat([spec.real, spec.imag], dim=1)

    def _inverse_spectrum(self, log_magnitude: torch.Tensor, phase_logits: torch.Tensor) -> torch.Tensor:
        n_fft, hop = self.config.istft_n_fft, self.config.istft_hop_length
        magnitude = torch.exp(log_magnitude.float()).clamp(max=1e2)
        phase = torch.sin(phase_logits.float())  # the official head squashes the phase with sin
        spec = torch.polar(magnitude, phase)
        return torch.istft(spec, n_fft, hop, n_fft, window=self._window(log_magnitude))

    # ------------------------------------------------------------------ offline
    def _check_mel(self, mel: torch.Tensor, allow_empty: bool = False) -> None:
        if not isinstance(mel, torch.Tensor):
            raise HiFTInputError(
                f"mel must be a torch.Tensor [B, {self.config.in_channels}, T], got {type(mel).__name__}"
            )
        if mel.dim() != 3 or mel.shape[1] != self.config.in_channels:
            raise HiFTInputError(f"mel must have shape [B, {self.config.in_channels}, T], got {tuple(mel.shape)}")
        if not mel.is_floating_point():
            raise HiFTInputError(f"mel must be a floating point tensor, got {mel.dtype}")
        if mel.shape[-1] == 0 and not allow_empty:
            raise HiFTInputError("mel has no frames (T == 0)")
        if not torch.isfinite(mel).all():
            raise HiFTInputError("mel contains NaN or infinite values")

    def predict_source(self, mel: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Excitation [B, 1, T * 480] from the mel's predicted F0."""
        return self.m_source(self.f0_predictor(mel), generator=generator)

    def decode(self, mel: torch.Tensor, source: torch.Tensor) -> torch.Tensor:
        """Filter network: mel [B, 80, T] + excitation [B, 1, T*480] -> waveform [B, T*480]."""
        cfg = self.config
        source_spec = self._source_spectrum(source).to(mel.dtype)
        x = self.conv_pre(mel)
        num_kernels = len(cfg.resblock_kernel_sizes)
        for stage, upsample in enumerate(self.ups):
            x = upsample(F.leaky_relu(x, cfg.lrelu_slope))
            if stage == len(self.ups) - 1:
                x = F.pad(x, (1, 0), mode="reflect")  # match the N/hop + 1 STFT frames
            x = x + self.source_resblocks[stage](self.source_downs[stage](source_spec))
            blocks = self.resblocks[stage * num_kernels : (stage + 1) * num_kernels]
            x = sum(block(x) for block in blocks) / num_kernels
        x = self.conv_post(F.leaky_relu(x))  # default slope 0.01 here, as in the official model
        bins = cfg.istft_n_fft // 2 + 1
        wav = self._inverse_spectrum(x[:, :bins], x[:, bins:])
        return wav.clamp(-cfg.audio_limit, cfg.audio_limit).to(mel.dtype)

    def vocode(
        self,
        mel: torch.Tensor,
        cache_source: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(waveform [B, T*480], excitation [B, 1, T*480]); ``cache_source`` overrides the first samples."""
        self._check_mel(mel)
        source = self.predict_source(mel, generator=generator)
        if cache_source is not None and cache_source.shape[-1] > 0:
            if cache_source.shape[-1] > source.shape[-1]:
                raise HiFTInputError(
                    f"cache_source has {cache_source.shape[-1]} samples but the mel only covers {source.shape[-1]}"
                )
            source = torch.cat([cache_source.to(source), source[..., cache_source.shape[-1] :]], dim=-1)
        return self.decode(mel, source), source

    def forward(self, mel: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Offline vocoding: mel [B, 80, T] -> waveform [B, T * 480] in [-0.99, 0.99]."""
        return self.vocode(mel, generator=generator)[0]

    # ------------------------------------------------------------------ streaming
    def new_stream_state(self, seed: int | None = None) -> HiFTStreamState:
        """Fresh state; with a seed every chunk's noise is reproducible."""
        return HiFTStreamState(seed=seed)

    def _chunk_generator(self, state: HiFTStreamState, device: torch.device) -> torch.Generator | None:
        if state.seed is None:
            return None
        generator = torch.Generator(device=device)
        generator.manual_seed((state.seed * 1_000_003 + state.step) % (2**63))
        return generator

    def stream_step(
        self, mel_chunk: torch.Tensor, state: HiFTStreamState, last_chunk: bool = False
    ) -> tuple[torch.Tensor, HiFTStreamState]:
        """Vocode one mel chunk [1, 80, T] -> (new samples [1, N], next state). Does not mutate ``state``.

        Concatenating every returned chunk gives exactly (total frames) * 480 samples.
        """
        if not isinstance(state, HiFTStreamState):
            raise HiFTInputError(f"state must be a HiFTStreamState, got {type(state).__name__}")
        if state.finished:
            raise HiFTInputError("this stream already received its last chunk; start a new state")
        self._check_mel(mel_chunk, allow_empty=True)
        if mel_chunk.shape[0] != 1:
            raise HiFTInputError(f"streaming vocodes one utterance at a time, got batch size {mel_chunk.shape[0]}")

        if mel_chunk.shape[-1] == 0:
            if not last_chunk:
                return mel_chunk.new_zeros(1, 0), state
            tail = state.speech_cache if state.speech_cache is not None else mel_chunk.new_zeros(1, 0)
            emitted_total = state.samples_emitted + tail.shape[-1]
            return tail, replace(state, speech_cache=None, finished=True, samples_emitted=emitted_total)

        mel = mel_chunk if state.mel_cache is None else torch.cat([state.mel_cache.to(mel_chunk), mel_chunk], dim=-1)
        generator = self._chunk_generator(state, mel.device)
        speech, source = self.vocode(mel, cache_source=state.source_cache, generator=generator)

        if state.speech_cache is not None and state.speech_cache.shape[-1] > 0:
            overlap = state.speech_cache.shape[-1]
            # np.hamming(2 * overlap): rising half on the new audio, falling half on the held-back tail.
            window = torch.hamming_window(2 * overlap, periodic=False, device=speech.device, dtype=speech.dtype)
            faded = speech[:, :overlap] * window[:overlap] + state.speech_cache.to(speech) * window[overlap:]
            speech = torch.cat([faded, speech[:, overlap:]], dim=-1)

        keep_frames = min(self.config.stream_cache_mel_frames, mel.shape[-1])
        keep_samples = keep_frames * self.config.samples_per_frame
        next_state = replace(
            state,
            mel_cache=mel[..., mel.shape[-1] - keep_frames :].detach(),
            source_cache=source[..., source.shape[-1] - keep_samples :].detach(),
            speech_cache=None if last_chunk else speech[:, speech.shape[-1] - keep_samples :].detach(),
            step=state.step + 1,
            finished=last_chunk,
        )
        emitted = speech if last_chunk else speech[:, : speech.shape[-1] - keep_samples]
        next_state = replace(next_state, samples_emitted=state.samples_emitted + emitted.shape[-1])
        return emitted, next_state


__all__ = ["HiFTConfig", "HiFTInputError", "HiFTStreamState", "HiFTVocoder"]
