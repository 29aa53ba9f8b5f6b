"""Configuration of MiniCPM-o 4.5.

The layout is the official one: the top level holds the Qwen3 LLM keys, and the towers have their own
sub-configs (`vision_config`, `audio_config`, `tts_config`, `slice_config`). A config.json written by
the official code loads here, and the one we save is readable by the official code (it still carries
`rope_theta`, which transformers 5 otherwise folds into `rope_parameters`). Saved configs also carry the official
`"architectures": ["MiniCPMO"]` and `torch_dtype`, the fields serving engines route on.
"""

import json
from pathlib import Path
from typing import ClassVar

from huggingface_hub.dataclasses import strict
from transformers import PreTrainedConfig, Qwen3Config, SiglipVisionConfig, WhisperConfig
from transformers.configuration_utils import SubConfigSpec

from ..errors import ConfigError
from .configuration_token2wav import Token2WavConfig

# The official checkpoint's `architectures` entry (the name of the official remote-code class). Engines that serve
# MiniCPM-o 4.5 route on it; transformers would write our class name instead.
OFFICIAL_ARCHITECTURE = "MiniCPMO"
_OUR_ARCHITECTURE = "MiniCPMOForConditionalGeneration"
# The full-size 4.5 config (reconstructed from the official code and shape checks on the real weights): the values
# of `official_config()` and of the sub-configs a bare `MiniCPMOConfig()` gets.
OFFICIAL_CONFIG_FILE = Path(__file__).with_name("official_config_reconstructed.json")


class MiniCPMOConfigError(ConfigError):
    """A configuration value that cannot describe a working model."""


def _require(condition, message: str) -> None:
    """Raise a typed error for a bad value; values of the wrong type are left to the strict field validation."""
    try:
        ok = bool(condition() if callable(condition) else condition)
    except TypeError:
        return
    if not ok:
        raise MiniCPMOConfigError(message)


@strict
class MiniCPMVSliceConfig(PreTrainedConfig):
    """LLaVA-UHD slicing settings (official `slice_config`)."""

    model_type = "minicpmv"

    patch_size: int = 14
    max_slice_nums: int = 9
    scale_resolution: int = 448

    def __post_init__(self, **kwargs):
        _require(lambda: self.patch_size > 0, f"slice_config.patch_size must be positive, got {self.patch_size}")
        _require(lambda: self.max_slice_nums >= 1, f"slice_config.max_slice_nums must be >= 1, got {self.max_slice_nums}")
        _require(
            lambda: self.scale_resolution >= self.patch_size,
            f"slice_config.scale_resolution ({self.scale_resolution}) must be >= patch_size ({self.patch_size})",
        )
        super().__post_init__(**kwargs)


@strict
class MiniCPMTTSConfig(PreTrainedConfig):
    """Speech-token decoder settings (official `tts_config`, Llama backbone)."""

    model_type = "minicpmtts"

    llm_dim: int = 2560
    llm_intermediate_size: int = 768
    llm_down_scale: bool = False
    llm_dim_model_base: int = 256
    projector_type: str = "mlp"
    hidden_act: str = "silu"
    hidden_size: int = 768
    intermediate_size: int = 3072
    num_attention_heads: int = 12
    num_hidden_layers: int = 20
    num_key_value_heads: int = 12
    max_position_embeddings: int = 4096
    num_audio_tokens: int = 4097
    num_text_tokens: int = 21178
    num_mel_bins: int = 100
    num_vq: int = 1
    use_llm_hidden_state: bool = False
    audio_bos_token_id: int = 21132
    text_eos_token_id: int = 21133
    use_text: bool = True
    streaming: bool = False
    streaming_text_chunk_min: int = 3
    streaming_text_chunk_max: int = 7
    streaming_text_reserved_len: int = 300
    streaming_audio_chunk_size: int = 50
    condition_type: str = "llm_hidden"
    backbone_model: str = "llama"
    audio_tokenizer_type: str = "wavtokenizer"
    audio_tokenizer_sample_rate: int = 24000
    normalize_projected_hidden: bool = False
    interleaved: bool = False
    attention_type: str = "sliding_recompute"
    recomputed_chunks: int = 1
    window_size: int = 2
    # Sampling defaults the official code reads from this config.
    top_p: float = 0.85
    top_k: int = 25
    repetition_penalty: float = 1.05
    temperature: float = 0.8
    s3_stream_chunk_size: int = 25
    s3_stream_generate: bool = False
    # The official backbone keeps Llama's default 32000-row `model.embed_tokens`, which nothing reads (inputs come
    # in as embeddings); small models may shrink it to save space.
    backbone_vocab_size: int = 32000
    s3_stream_n_timesteps: int = 10
    s3_stream_prelook_size: int = 3
    # In the official config.json though not read by the official class; kept so saved configs carry it.
    streaming_sliding_window_text_window_size: int = 50

    attribute_map: ClassVar[dict[str, str]] = {"llm_hidden_size": "llm_dim"}

    def __post_init__(self, **kwargs):
        _require(lambda: self.hidden_size > 0 and self.num_attention_heads > 0, "tts_config sizes must be positive")
        _require(
            lambda: self.hidden_size % self.num_attention_heads == 0,
            f"tts_config.hidden_size ({self.hidden_size}) must be divisible by "
            f"num_attention_heads ({self.num_attention_heads})",
        )
        _require(lambda: self.num_audio_tokens >= 2, f"tts_config.num_audio_tokens must be >= 2, got {self.num_audio_tokens}")
        _require(lambda: self.num_vq >= 1, f"tts_config.num_vq must be >= 1, got {self.num_vq}")
        super().__post_init__(**kwargs)


@strict
class MiniCPMOConfig(Qwen3Config):
    """MiniCPM-o 4.5: Qwen3 LLM keys at the top level plus vision, audio, speech and slicing sub-configs."""

    model_type = "minicpmo"
    # With no arguments the config is the full-size 4.5 (as transformers configs default to their checkpoint):
    # the Qwen3-8B LLM fields below, and the vision / audio / speech-decoder sub-configs of OFFICIAL_CONFIG_FILE.
    default_theta = 1_000_000.0
    sub_configs_defaults = {
        "vision_config": SiglipVisionConfig,
        "audio_config": WhisperConfig,
        "tts_config": MiniCPMTTSConfig,
        "slice_config": MiniCPMVSliceConfig,
        # Optional: None stays None (the official sizes, see the field below).
        "token2wav_config": SubConfigSpec(Token2WavConfig, optional=True),
    }

    vocab_size: int = 151748
    intermediate_size: int = 12288
    num_hidden_layers: int = 36
    num_key_value_heads: int | None = 8
    max_position_embeddings: int = 40960
    max_window_layers: int = 36
    bos_token_id: int | None = 151643
    eos_token_id: int | list[int] | None = 151645
    vision_config: dict | SiglipVisionConfig | None = None
    audio_config: dict | WhisperConfig | None = None
    tts_config: dict | MiniCPMTTSConfig | None = None
    slice_config: dict | MiniCPMVSliceConfig | None = None
    query_num: int = 64
    image_size: int = 448
    drop_vision_last_layer: bool = False
    batch_vision_input: bool = True
    use_image_id: bool = True
    vision_batch_size: int = 16
    audio_pool_step: int = 5
    audio_chunk_length: float = 1.0
    stream_input: bool = False
    listen_speak_type: str = "asr"
    init_vision: bool = True
    init_audio: bool = True
    init_tts: bool = True
    # Our addition (the official token2wav ships as separate files): settings of the speech-code -> 24 kHz decoder.
    # None means the full-size official flow + HiFT; its weights live in the `token2wav/` subfolder of a checkpoint.
    # Saved as the plain dict of `Token2WavConfig.to_dict` (no model_type), as config.json files always held it.
    token2wav_config: dict | Token2WavConfig | None = None
    version: str | float | None = "4.5"
    # Placeholder and span token ids of the official tokenizer; the model finds multimodal slots from these.
    unk_token_id: int = 128244
    image_start_token_id: int = 151669
    image_end_token_id: int = 151670
    slice_start_token_id: int = 151679
    slice_end_token_id: int = 151680
    audio_start_token_id: int = 151697
    audio_end_token_id: int = 151699
    unit_start_token_id: int = 151683
    unit_end_token_id: int = 151684

    def __post_init__(self, **kwargs):
        if self.vision_config is None:
            self.vision_config = SiglipVisionConfig(**_official_sub_config("vision_config"))
        if self.audio_config is None:
            self.audio_config = WhisperConfig(**_official_sub_config("audio_config"))
        if self.tts_config is None:
            self.tts_config = MiniCPMTTSConfig(**_official_sub_config("tts_config"))
        super().__post_init__(**kwargs)
        _require(lambda: self.query_num >= 1, f"query_num must be >= 1, got {self.query_num}")
        _require(lambda: self.audio_pool_step >= 1, f"audio_pool_step must be >= 1, got {self.audio_pool_step}")
        _require(lambda: self.audio_chunk_length > 0, f"audio_chunk_length must be > 0, got {self.audio_chunk_length}")
        _require(lambda: self.vision_batch_size >= 1, f"vision_batch_size must be >= 1, got {self.vision_batch_size}")
        _require(
            lambda: self.hidden_size % self.num_attention_heads == 0 or self.head_dim is not None,
            "hidden_size must be divisible by num_attention_heads when head_dim is unset",
        )
        _require(
            lambda: self.hidden_size % 128 == 0 or self.hidden_size < 128,
            f"hidden_size ({self.hidden_size}) must be a multiple of 128: the resampler uses hidden_size // 128 heads",
        )
        _require(
            lambda: self.slice_config.patch_size == self.vision_config.patch_size,
            f"slice_config.patch_size ({self.slice_config.patch_size}) must equal "
            f"vision_config.patch_size ({self.vision_config.patch_size})",
        )
        _require(
            lambda: not self.init_tts or self.tts_config.llm_dim == self.hidden_size,
            f"tts_config.llm_dim ({self.tts_config.llm_dim}) must equal hidden_size ({self.hidden_size}): the speech "
            "decoder reads the LLM's hidden states",
        )
        # Official attributes derived from the sub-configs.
        self.slice_mode = True
        self.patch_size = self.vision_config.patch_size

    @property
    def resampler_num_heads(self) -> int:
        """The official resampler uses 128-wide heads (a single head for tiny test models)."""
        return max(self.hidden_size // 128, 1)

    @property
    def audio_projector_input_size(self) -> int:
        """The audio tower's output width, `audio_config.d_model`. (The official code writes `encoder_ffn_dim // 4`,
        which is the same number for Whisper's 4x feed-forward and would break any other ratio.)"""
        return self.audio_config.d_model

    def to_dict(self):
        output = super().to_dict()
        # The official (transformers 4.x) code reads rope_theta; keep it next to rope_parameters.
        rope = output.get("rope_parameters") or {}
        if "rope_theta" in rope:
            output["rope_theta"] = rope["rope_theta"]
        output.setdefault("rope_scaling", None)
        # What the official (transformers 4.x written) config.json holds and engines read.
        architectures = output.get("architectures")
        if not architectures or list(architectures) == [_OUR_ARCHITECTURE]:
            output["architectures"] = [OFFICIAL_ARCHITECTURE]
        return output

    def to_diff_dict(self):
        output = super().to_diff_dict()
        # The official config.json names the dtype `torch_dtype` (transformers 4.x); transformers 5 reads either.
        # Added here, not in to_dict, whose keys the diff reads back with getattr (deprecated `torch_dtype` property).
        if output.get("dtype") is not None:
            output["torch_dtype"] = output["dtype"]
        return output


def official_config_values() -> dict:
    """The reconstructed full-size config.json of 4.5 (`OFFICIAL_CONFIG_FILE`) as a fresh dict."""
    return json.loads(OFFICIAL_CONFIG_FILE.read_text())


def _official_sub_config(key: str) -> dict:
    """A sub-config's values in the official file, for the sub-configs a bare `MiniCPMOConfig()` gets."""
    values = dict(official_config_values()[key])
    values.pop("model_type", None)
    return values


__all__ = [
    "OFFICIAL_ARCHITECTURE",
    "MiniCPMOConfig",
    "MiniCPMOConfigError",
    "MiniCPMTTSConfig",
    "MiniCPMVSliceConfig",
]
