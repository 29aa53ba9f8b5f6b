"""Ready-made configurations: the full-size MiniCPM-o 4.5 layout and a tiny one for tests and smoke runs."""

import json
from pathlib import Path

from .configuration_minicpmo import MiniCPMOConfig

OFFICIAL_CONFIG_FILE = Path(__file__).with_name("official_config_reconstructed.json")


def official_config(**overrides) -> MiniCPMOConfig:
    """The full-size 4.5 config (reconstructed from the official code and shape checks on the real weights)."""
    values = json.loads(OFFICIAL_CONFIG_FILE.read_text())
    values.pop("_comment", None)
    values.pop("auto_map", None)
    values.update(overrides)
    return MiniCPMOConfig(**values)


def tiny_config(**overrides) -> MiniCPMOConfig:
    """A few-MB random model with every official component and the real vocabulary (151,748 tokens)."""
    return MiniCPMOConfig(**{**_tiny_values(), **overrides})


def _tiny_values() -> dict:
    return dict(
        vocab_size=151748,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=4096,
        rope_theta=1000000.0,
        tie_word_embeddings=False,
        bos_token_id=151643,
        eos_token_id=151645,
        pad_token_id=151643,
        query_num=64,
        vision_batch_size=16,
        vision_config=dict(
            model_type="siglip_vision_model",
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            image_size=980,
            patch_size=14,
            hidden_act="gelu_pytorch_tanh",
            layer_norm_eps=1e-6,
        ),
        audio_config=dict(
            model_type="whisper",
            d_model=32,
            encoder_layers=2,
            encoder_attention_heads=2,
            encoder_ffn_dim=128,
            decoder_layers=1,
            decoder_attention_heads=2,
            decoder_ffn_dim=128,
            num_mel_bins=80,
            max_source_positions=1500,
            max_target_positions=64,
            vocab_size=128,
            pad_token_id=0,
            bos_token_id=1,
            eos_token_id=2,
            decoder_start_token_id=3,
        ),
        tts_config=dict(
            llm_dim=64,
            hidden_size=32,
            intermediate_size=64,
            num_attention_heads=2,
            num_key_value_heads=2,
            num_hidden_layers=2,
            max_position_embeddings=4096,
            num_audio_tokens=6562,
            num_text_tokens=151748,
            num_vq=1,
            audio_bos_token_id=151687,
            text_eos_token_id=151692,
            condition_type="hidden_text_merge",
            audio_tokenizer_type="s3tokenizer",
            audio_tokenizer_sample_rate=16000,
            normalize_projected_hidden=True,
            attention_type="full_attention",
        ),
        init_tts=True,
        token2wav_config=_tiny_token2wav_config(),
    )


def demo_config(**overrides) -> MiniCPMOConfig:
    """The layout of the model trained here on the synthetic world (`python -m finetune.demo`) and shipped as the
    app's default: the real vocabulary with tied input/output embeddings, a 4-layer 48-wide LLM, 16 resampler
    queries per image, and small encoders, speech decoder and token2wav, so the bf16 checkpoint stays below 30 MB."""
    values = _tiny_values()
    values.update(
        hidden_size=48,
        intermediate_size=192,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        tie_word_embeddings=True,
        query_num=16,
    )
    values["vision_config"] = dict(
        model_type="siglip_vision_model", hidden_size=48, intermediate_size=96, num_hidden_layers=2,
        num_attention_heads=2, image_size=980, patch_size=14, hidden_act="gelu_pytorch_tanh", layer_norm_eps=1e-6,
    )
    values["audio_config"] = dict(
        values["audio_config"], d_model=48, encoder_layers=2, encoder_attention_heads=2, encoder_ffn_dim=192,
    )
    values["tts_config"] = dict(
        values["tts_config"], llm_dim=48, hidden_size=24, intermediate_size=96, num_attention_heads=2,
        num_key_value_heads=2, num_hidden_layers=2, backbone_vocab_size=1,
    )
    values["token2wav_config"] = _demo_token2wav_config()
    values.update(overrides)
    return MiniCPMOConfig(**values)


def _demo_token2wav_config() -> dict:
    from ..modeling.modeling_token2wav import Token2WavConfig

    return Token2WavConfig.demo().to_dict()


def _tiny_token2wav_config() -> dict:
    from ..modeling.modeling_token2wav import Token2WavConfig

    return Token2WavConfig.tiny().to_dict()
