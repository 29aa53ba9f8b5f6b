"""Configuration of token2wav (S3 speech codes -> 24 kHz audio) and of its parts.

``Token2WavConfig`` is the ``token2wav_config`` sub-config of :class:`MiniCPMOConfig`; its own sub-configs are
``flow`` (:class:`FlowConfig`), ``hift`` (:class:`HiFTConfig`), ``campplus`` (:class:`CAMPPlusConfig`) and
``speech_tokenizer`` (:class:`S3TokenizerConfig`). All are ``PreTrainedConfig`` subclasses, so they save and load
with ``save_pretrained`` / ``from_pretrained`` / ``from_dict`` like any transformers config.

What they write (``to_dict``) is the layout config.json files have held since token2wav was added: only the
fields below, tuples as lists, no transformers bookkeeping keys, so a nested ``token2wav_config`` saved today has
the keys and values older checkpoints carry, and those load unchanged. A standalone ``to_dict`` adds
``transformers_version`` (transformers drops it from nested configs). Keys that are neither a field nor one of
transformers' own loading keys are rejected, and list values of tuple fields (JSON has no tuples) become tuples.

Ready-made small sizes are module-level functions in :mod:`configuration_presets` (``tiny_token2wav_config``,
``demo_token2wav_config``, ``tiny_flow_config``, ...), the same idiom as ``tiny_config`` / ``demo_config``.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, ClassVar

from transformers import PreTrainedConfig
from transformers import __version__ as _TRANSFORMERS_VERSION

from ..errors import CheckpointError, ConfigError

# Values fixed by the token2wav front-ends; they equal the constants of the modeling code
# (`audio_frontends_token2wav.PROMPT_MEL_BINS` / `FBANK_BINS`, `modeling_speech_tokenizer.S3_*`), which the tests check.
# They are repeated here because configuration code does not import modeling code.
PROMPT_MEL_BINS = 80  # width of the 24 kHz prompt mel the flow is conditioned on
FBANK_BINS = 80  # Kaldi fbank bins CAMPPlus reads
S3_SAMPLE_RATE = 16000
S3_N_FFT = 400
S3_HOP_LENGTH = 160


class Token2WavConfigError(ConfigError):
    """Token2WavConfig values are inconsistent (e.g. flow and vocoder disagree on the mel width)."""


class FlowConfigError(ConfigError):
    """A FlowConfig value is inconsistent or out of range."""


class S3TokenizerConfigError(ConfigError):
    """Inconsistent S3TokenizerConfig values."""


class S3TokenizerCheckpointError(CheckpointError):
    """A state dict does not have the public S3 tokenizer v2 layout."""


# Keys that are not fields but that transformers itself passes when it loads a config (from_pretrained's kwargs)
# or writes in a full `PreTrainedConfig.to_dict`; accepted (and handled by PreTrainedConfig) besides the fields.
_TRANSFORMERS_KEYS = frozenset(
    {
        "model_type",
        "name_or_path",
        "_name_or_path",
        "_commit_hash",
        "torch_dtype",
        "num_labels",
        "output_attentions",
        "attn_implementation",
        "experts_implementation",
        "_attn_implementation_internal",
        "_experts_implementation_internal",
    }
)
_PRETRAINED_FIELDS = frozenset(f.name for f in dataclasses.fields(PreTrainedConfig))


def _tuples_like(value, default):
    """A list (from JSON) for a field whose default is a tuple -> a tuple of the default's nesting."""
    if isinstance(default, tuple) and isinstance(value, (list, tuple)):
        inner = default[0] if default else None
        return tuple(_tuples_like(item, inner) for item in value)
    return value


def _plain(value):
    """JSON types only: tuples -> lists, recursively."""
    if isinstance(value, (list, tuple)):
        return [_plain(item) for item in value]
    if isinstance(value, dict):
        return {key: _plain(item) for key, item in value.items()}
    return value


class _Token2WavPartConfig(PreTrainedConfig):
    """Shared behaviour: own-fields-only (de)serialisation, unknown-key errors, tuple fields, value equality."""

    # Error class and name used for keys that are not fields, e.g. "unknown hift keys: [...]".
    unknown_keys_error: ClassVar[type[ValueError]] = Token2WavConfigError
    unknown_keys_name: ClassVar[str] = ""

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)  # makes `cls` a dataclass, which writes a field-by-field __eq__
        cls.__eq__ = _Token2WavPartConfig.__eq__
        cls.__hash__ = None

    @classmethod
    def config_fields(cls) -> tuple[str, ...]:
        """Names of this config's own fields (those of PreTrainedConfig excluded), in declaration order."""
        return tuple(f.name for f in dataclasses.fields(cls) if f.name not in _PRETRAINED_FIELDS)

    def __post_init__(self, **kwargs):
        unknown = set(kwargs) - _TRANSFORMERS_KEYS
        if unknown:
            raise self.unknown_keys_error(f"unknown {self.unknown_keys_name} keys: {sorted(unknown)}")
        kwargs.pop("model_type", None)  # a class attribute; an instance copy would shadow it
        self._check_sub_config_types()
        super().__post_init__(**kwargs)
        defaults = {f.name: f.default for f in dataclasses.fields(self)}
        for name in self.config_fields():
            value = getattr(self, name)
            if isinstance(value, list) and isinstance(defaults[name], tuple):
                setattr(self, name, _tuples_like(value, defaults[name]))
        self._check_values()

    def _check_sub_config_types(self) -> None:
        for name, spec in self.sub_configs_defaults.items():
            value = getattr(self, name)
            if value is not None and not isinstance(value, (dict, spec.config_class)):
                raise Token2WavConfigError(
                    f"{type(self).__name__}.{name} must be a {spec.config_class.__name__}, got {type(value).__name__}"
                )

    def _check_values(self) -> None:
        """Raise a typed error for inconsistent values (subclasses)."""

    def to_dict(self) -> dict[str, Any]:
        """The own fields as plain JSON types (nested parts as dicts), plus ``transformers_version``."""
        values = {}
        for name in self.config_fields():
            value = getattr(self, name)
            if isinstance(value, PreTrainedConfig):
                value = value.to_dict()
                value.pop("transformers_version", None)
            values[name] = _plain(value)
        values["transformers_version"] = _TRANSFORMERS_VERSION
        return values

    def to_diff_dict(self) -> dict[str, Any]:
        """Always every field (what older files hold), so a saved config never depends on today's defaults."""
        return self.to_dict()

    @classmethod
    def from_dict(cls, config_dict: dict, **kwargs):
        if not isinstance(config_dict, dict):
            raise Token2WavConfigError(f"{cls.__name__}.from_dict needs a dict, got {type(config_dict).__name__}")
        return super().from_dict(dict(config_dict), **kwargs)

    def __eq__(self, other):
        """Equal when every field is (transformers' runtime attributes and the writing version do not count)."""
        if type(self) is not type(other):
            return NotImplemented
        mine, theirs = self.to_dict(), other.to_dict()
        mine.pop("transformers_version", None)
        theirs.pop("transformers_version", None)
        return mine == theirs


class FlowConfig(_Token2WavPartConfig):
    """Values of the official ``flow.yaml`` (CausalMaskedDiffWithXvec + UpsampleConformerEncoderV2 + DiT)."""

    model_type = "minicpmo_token2wav_flow"
    unknown_keys_error = FlowConfigError
    unknown_keys_name = "FlowConfig"

    vocab_size: int = 6561
    input_size: int = 512
    output_size: int = 80
    spk_embed_dim: int = 192
    # encoder (UpsampleConformerEncoderV2)
    encoder_output_size: int = 512
    encoder_attention_heads: int = 8
    encoder_linear_units: int = 2048
    encoder_num_blocks: int = 6
    encoder_num_up_blocks: int = 4
    pre_lookahead_len: int = 3
    up_stride: int = 2
    # estimator (DiT)
    dit_in_channels: int = 320
    dit_out_channels: int = 80
    dit_hidden_size: int = 512
    dit_depth: int = 16
    dit_num_heads: int = 8
    dit_head_dim: int = 64
    dit_mlp_ratio: float = 4.0
    dit_time_embed_dim: int = 256
    # sampling
    inference_cfg_rate: float = 0.7
    n_timesteps: int = 10
    noise_length: int = 30000
    noise_seed: int = 0
    # streaming
    silence_token_id: int = 4218
    stream_cache_frames: int = 100

    def _check_values(self) -> None:
        for name in self.config_fields():
            value = getattr(self, name)
            if name in ("inference_cfg_rate", "noise_seed"):
                continue
            if not isinstance(value, (int, float)) or isinstance(value, bool) or value <= 0:
                raise FlowConfigError(f"FlowConfig.{name} must be a positive number, got {value!r}")
        if self.input_size != self.encoder_output_size:
            raise FlowConfigError(
                f"input_size ({self.input_size}) must equal encoder_output_size ({self.encoder_output_size}): "
                "up_embed maps encoder states with an input_size-wide Linear"
            )
        if self.encoder_output_size % self.encoder_attention_heads:
            raise FlowConfigError("encoder_output_size must be divisible by encoder_attention_heads")
        if self.dit_in_channels != 4 * self.output_size or self.dit_out_channels != self.output_size:
            raise FlowConfigError(
                f"dit_in_channels must be 4*output_size (= {4 * self.output_size}) and dit_out_channels "
                f"= output_size (= {self.output_size}); got {self.dit_in_channels}, {self.dit_out_channels}"
            )
        if not 0 <= self.inference_cfg_rate:
            raise FlowConfigError(f"inference_cfg_rate must be >= 0, got {self.inference_cfg_rate}")
        if self.silence_token_id >= self.vocab_size:
            raise FlowConfigError(f"silence_token_id {self.silence_token_id} is outside vocab_size {self.vocab_size}")
        if self.stream_cache_frames % self.up_stride:
            raise FlowConfigError("stream_cache_frames must be a multiple of up_stride")


class HiFTConfig(_Token2WavPartConfig):
    """Hyper-parameters of the CosyVoice2 HiFT generator (defaults = the shipped ``hift.pt``)."""

    model_type = "minicpmo_token2wav_hift"
    unknown_keys_name = "hift"

    in_channels: int = 80
    base_channels: int = 512
    nb_harmonics: int = 8
    sampling_rate: int = 24000
    nsf_alpha: float = 0.1  # sine amplitude of the harmonic source
    nsf_sigma: float = 0.003  # noise std in voiced regions
    nsf_voiced_threshold: float = 10.0  # Hz; F0 above this counts as voiced
    upsample_rates: tuple[int, ...] = (8, 5, 3)
    upsample_kernel_sizes: tuple[int, ...] = (16, 11, 7)
    istft_n_fft: int = 16
    istft_hop_length: int = 4
    resblock_kernel_sizes: tuple[int, ...] = (3, 7, 11)
    resblock_dilation_sizes: tuple[tuple[int, ...], ...] = ((1, 3, 5), (1, 3, 5), (1, 3, 5))
    source_resblock_kernel_sizes: tuple[int, ...] = (7, 7, 11)
    source_resblock_dilation_sizes: tuple[tuple[int, ...], ...] = ((1, 3, 5), (1, 3, 5), (1, 3, 5))
    lrelu_slope: float = 0.1
    audio_limit: float = 0.99
    f0_predictor_channels: int = 512
    f0_predictor_num_convs: int = 5
    # 1.0.5 streaming: mel frames re-vocoded from the previous chunk (8 frames = 3840 samples).
    stream_cache_mel_frames: int = 8

    @property
    def samples_per_frame(self) -> int:
        return math.prod(self.upsample_rates) * self.istft_hop_length

    @property
    def stream_cache_samples(self) -> int:
        return self.stream_cache_mel_frames * self.samples_per_frame


class CAMPPlusConfig(_Token2WavPartConfig):
    """CAM++ widths; defaults are the published model (the one shipped as campplus.onnx, 192-d)."""

    model_type = "minicpmo_token2wav_campplus"
    unknown_keys_name = "campplus"

    feat_dim: int = FBANK_BINS
    embedding_size: int = 192
    head_channels: int = 32  # FCM width
    head_blocks: tuple[int, int] = (2, 2)  # residual blocks per FCM stage
    init_channels: int = 128
    growth_rate: int = 32
    bottleneck_scale: int = 4  # dense-layer bottleneck = bottleneck_scale * growth_rate
    block_layers: tuple[int, ...] = (12, 24, 16)
    block_kernel_sizes: tuple[int, ...] = (3, 3, 3)
    block_dilations: tuple[int, ...] = (1, 2, 2)
    cam_reduction: int = 2
    cam_segment_frames: int = 100
    min_frames: int = 8  # fbank frames (80 ms) below which std pooling is meaningless


class S3TokenizerConfig(_Token2WavPartConfig):
    """Sizes of S3 tokenizer v2 (defaults = ``speech_tokenizer_v2_25hz``, the public ``ModelConfig``)."""

    model_type = "minicpmo_token2wav_s3tokenizer"
    unknown_keys_name = "speech_tokenizer"

    n_mels: int = 128
    # Encoder positions after the first stride-2 conv for one window: 1500 = 30 s at 50 Hz (Whisper's meaning).
    # The public v2 code switches to sliding windows beyond 2 * 1500 = 3000 mel frames; here they are rejected.
    n_audio_ctx: int = 1500
    n_state: int = 1280
    n_head: int = 20
    n_layer: int = 6
    fsmn_kernel_size: int = 31
    mlp_ratio: int = 4
    rope_theta: float = 10000.0
    attn_ln_eps: float = 1e-6
    mlp_ln_eps: float = 1e-5
    fsq_levels: list[int] = dataclasses.field(default_factory=lambda: [3] * 8)
    sample_rate: int = S3_SAMPLE_RATE
    n_fft: int = S3_N_FFT
    hop_length: int = S3_HOP_LENGTH

    def _check_values(self) -> None:
        self.fsq_levels = [int(level) for level in self.fsq_levels]
        if self.n_state % self.n_head:
            raise S3TokenizerConfigError(f"n_state={self.n_state} is not divisible by n_head={self.n_head}")
        if self.head_dim % 2:
            raise S3TokenizerConfigError(f"rotary embedding needs an even head_dim, got {self.head_dim}")
        if self.fsmn_kernel_size < 1 or self.fsmn_kernel_size % 2 == 0:
            raise S3TokenizerConfigError(f"fsmn_kernel_size must be odd and positive, got {self.fsmn_kernel_size}")
        if any(level < 3 for level in self.fsq_levels):
            raise S3TokenizerConfigError(f"FSQ levels must all be >= 3, got {self.fsq_levels}")
        if (
            self.n_mels != 128
            or self.sample_rate != S3_SAMPLE_RATE
            or self.n_fft != S3_N_FFT
            or self.hop_length != S3_HOP_LENGTH
        ):
            raise S3TokenizerConfigError("the S3 v2 front-end is fixed: 128 mels, 16 kHz, n_fft 400, hop 160")

    @property
    def head_dim(self) -> int:
        return self.n_state // self.n_head

    @property
    def codebook_size(self) -> int:
        return math.prod(self.fsq_levels)

    @property
    def max_mel_frames(self) -> int:
        return 2 * self.n_audio_ctx

    @classmethod
    def from_public_state_dict(cls, state_dict: dict, n_head: int = 20, **overrides) -> S3TokenizerConfig:
        """Read widths, depth and FSMN kernel from public weights; the head count is not in the shapes."""
        try:
            n_state, n_mels, _ = state_dict["encoder.conv1.weight"].shape
            kernel = state_dict["encoder.blocks.0.attn.fsmn_block.weight"].shape[-1]
            n_fsq_dims = state_dict["quantizer._codebook.project_down.weight"].shape[0]
        except KeyError as missing:
            raise S3TokenizerCheckpointError(f"not a public S3 tokenizer v2 state dict: missing {missing}") from None
        n_layer = len({key.split(".")[2] for key in state_dict if key.startswith("encoder.blocks.")})
        values = dict(n_mels=n_mels, n_state=n_state, n_head=n_head, n_layer=n_layer, fsmn_kernel_size=kernel,
                      fsq_levels=[3] * n_fsq_dims)
        values.update(overrides)
        return cls(**values)


class Token2WavConfig(_Token2WavPartConfig):
    """Everything needed to build ``MiniCPMOToken2Wav``; the ``token2wav_config`` sub-config of MiniCPMOConfig.

    n_timesteps: Euler steps of the flow ODE (official default 10; the demo uses 5).
    stream_chunk_tokens: new codes per regular streaming window (25; the window adds 3 lookahead codes).
    force_flush / force_flush_min_tokens: the unified-model rule, see ``modeling_token2wav``.
    voice_encoders: build ``campplus`` and ``speech_tokenizer`` (needed by ``prepare_voice``).
    """

    model_type = "minicpmo_token2wav"
    unknown_keys_name = "Token2WavConfig"
    sub_configs_defaults = {
        "flow": FlowConfig,
        "hift": HiFTConfig,
        "campplus": CAMPPlusConfig,
        "speech_tokenizer": S3TokenizerConfig,
    }

    # None (or a missing key) means that part's defaults, the official sizes.
    flow: dict | FlowConfig | None = None
    hift: dict | HiFTConfig | None = None
    campplus: dict | CAMPPlusConfig | None = None
    speech_tokenizer: dict | S3TokenizerConfig | None = None
    n_timesteps: int = 10
    stream_chunk_tokens: int = 25
    force_flush: bool = True
    force_flush_min_tokens: int = 8
    voice_encoders: bool = True

    def _check_values(self) -> None:
        for name in ("n_timesteps", "stream_chunk_tokens", "force_flush_min_tokens"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise Token2WavConfigError(f"Token2WavConfig.{name} must be a positive int, got {value!r}")
        if self.force_flush_min_tokens <= self.lookahead_tokens:
            raise Token2WavConfigError(
                f"force_flush_min_tokens ({self.force_flush_min_tokens}) must exceed the "
                f"{self.lookahead_tokens} lookahead codes, or a flush would stream no new code"
            )
        if self.flow.output_size != self.hift.in_channels:
            raise Token2WavConfigError(
                f"flow.output_size ({self.flow.output_size}) must equal hift.in_channels ({self.hift.in_channels})"
            )
        if self.voice_encoders:
            if self.flow.output_size != PROMPT_MEL_BINS:
                raise Token2WavConfigError(
                    f"flow.output_size must be {PROMPT_MEL_BINS} (the prompt mel width) to prepare voices from audio"
                )
            if self.flow.spk_embed_dim != self.campplus.embedding_size:
                raise Token2WavConfigError(
                    f"flow.spk_embed_dim ({self.flow.spk_embed_dim}) must equal campplus.embedding_size "
                    f"({self.campplus.embedding_size})"
                )
            if self.flow.vocab_size != self.speech_tokenizer.codebook_size:
                raise Token2WavConfigError(
                    f"flow.vocab_size ({self.flow.vocab_size}) must equal the S3 codebook size "
                    f"({self.speech_tokenizer.codebook_size})"
                )

    # ------------------------------------------------------------------ derived values
    @property
    def sample_rate(self) -> int:
        return self.hift.sampling_rate

    @property
    def samples_per_code(self) -> int:
        """960 for the official sizes: 2 mel frames per code, 480 samples per frame."""
        return self.flow.up_stride * self.hift.samples_per_frame

    @property
    def lookahead_tokens(self) -> int:
        return self.flow.pre_lookahead_len

    @property
    def silence_token_id(self) -> int:
        return self.flow.silence_token_id


__all__ = [
    "CAMPPlusConfig",
    "FlowConfig",
    "FlowConfigError",
    "HiFTConfig",
    "S3TokenizerCheckpointError",
    "S3TokenizerConfig",
    "S3TokenizerConfigError",
    "Token2WavConfig",
    "Token2WavConfigError",
]
