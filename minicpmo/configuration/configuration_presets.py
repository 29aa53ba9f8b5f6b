"""Ready-made configurations: the full-size MiniCPM-o 4.5 layout, the shipped demo one and a tiny one for tests.

Every preset is a module-level function taking field overrides: `official_config` / `demo_config` / `tiny_config`
for the whole model, `demo_<part>_config` / `tiny_<part>_config` for token2wav and its parts (the full, official
sizes of those are the classes' defaults: `Token2WavConfig()`, `FlowConfig()`, ...).
"""

from .configuration_minicpmo import MiniCPMOConfig, official_config_values
from .configuration_token2wav import CAMPPlusConfig, FlowConfig, HiFTConfig, S3TokenizerConfig, Token2WavConfig

def official_config(**overrides) -> MiniCPMOConfig:
    """The full-size 4.5 config (reconstructed from the official code and shape checks on the real weights)."""
    values = official_config_values()
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
        token2wav_config=tiny_token2wav_config(),
    )


def demo_config(**overrides) -> MiniCPMOConfig:
    """The layout of the model trained here on the synthetic world (`python -m finetune.demo`) and shipped as the
    app's default: the real vocabulary with tied input/output embeddings, a 4-layer 64-wide LLM, 16 resampler
    queries per image, a small vision tower, an audio tower of Whisper tiny.en's shape (d_model 384, 4 layers,
    6 heads: the pipeline starts it from those weights, as MiniCPM-o starts from Whisper-medium), and a small
    speech decoder and token2wav, so the bf16 checkpoint stays below 64 MiB."""
    values = _tiny_values()
    values.update(
        hidden_size=64,
        intermediate_size=256,
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
        values["audio_config"], d_model=384, encoder_layers=4, encoder_attention_heads=6, encoder_ffn_dim=1536,
    )
    values["tts_config"] = dict(
        values["tts_config"], llm_dim=64, hidden_size=32, intermediate_size=128, num_attention_heads=2,
        num_key_value_heads=2, num_hidden_layers=2, backbone_vocab_size=1,
    )
    values["token2wav_config"] = demo_token2wav_config()
    values.update(overrides)
    return MiniCPMOConfig(**values)


# ---------------------------------------------------------------------------------------------- token2wav


def tiny_token2wav_config(**overrides) -> Token2WavConfig:
    """Every part small (same rates, 80 mel bins, 192-d speaker): 1 s of audio in a fraction of a second on CPU."""
    values = dict(
        flow=tiny_flow_config(output_size=80, spk_embed_dim=192, dit_in_channels=320, dit_out_channels=80),
        hift=tiny_hift_config(),
        campplus=tiny_campplus_config(),
        speech_tokenizer=tiny_s3tokenizer_config(),
    )
    values.update(overrides)
    return Token2WavConfig(**values)


def demo_token2wav_config(**overrides) -> Token2WavConfig:
    """The shipped demo token2wav (< 2.0 M parameters in all, official rates: 16 kHz tokenizer input,
    25 codes/s from 6561 FSQ codes, 80-bin mel at 50 Hz, 192-d speaker vector, 24 kHz out), 5 Euler steps."""
    values = dict(
        flow=demo_flow_config(),
        hift=demo_hift_config(),
        campplus=demo_campplus_config(),
        speech_tokenizer=demo_s3tokenizer_config(),
        n_timesteps=5,
    )
    values.update(overrides)
    return Token2WavConfig(**values)


def tiny_flow_config(**overrides) -> FlowConfig:
    """A few-thousand-parameter flow with the same structure, for tests (16 mel bins, 24-d speaker)."""
    values = dict(
        input_size=32,
        output_size=16,
        spk_embed_dim=24,
        encoder_output_size=32,
        encoder_attention_heads=2,
        encoder_linear_units=64,
        encoder_num_blocks=2,
        encoder_num_up_blocks=1,
        dit_in_channels=64,
        dit_out_channels=16,
        dit_hidden_size=32,
        dit_depth=2,
        dit_num_heads=2,
        dit_head_dim=16,
        dit_time_embed_dim=32,
        n_timesteps=4,
    )
    values.update(overrides)
    return FlowConfig(**values)


def demo_flow_config(**overrides) -> FlowConfig:
    """The shipped demo flow (~1.1 M parameters, most in the 6561-code embedding): 80 mel bins, 192-d
    speaker, 25 -> 50 Hz as official; 48-wide conformer (2 + 2 blocks), 96-wide DiT of depth 3, 5 Euler steps."""
    values = dict(
        input_size=48,
        encoder_output_size=48,
        encoder_attention_heads=4,
        encoder_linear_units=128,
        encoder_num_blocks=2,
        encoder_num_up_blocks=2,
        dit_hidden_size=96,
        dit_depth=3,
        dit_num_heads=4,
        dit_head_dim=24,
        dit_mlp_ratio=2.0,
        dit_time_embed_dim=64,
        n_timesteps=5,
    )
    values.update(overrides)
    return FlowConfig(**values)


def tiny_hift_config(**overrides) -> HiFTConfig:
    """Same rates and kernels (so still 480 samples per frame), far fewer channels."""
    return HiFTConfig(**{**dict(base_channels=32, f0_predictor_channels=32), **overrides})


def demo_hift_config(**overrides) -> HiFTConfig:
    """The shipped demo vocoder (~0.37 M parameters): same rates and kernels, 64 base channels."""
    return HiFTConfig(**{**dict(base_channels=64, f0_predictor_channels=64, f0_predictor_num_convs=3), **overrides})


def tiny_campplus_config(**overrides) -> CAMPPlusConfig:
    return CAMPPlusConfig(**{**dict(head_channels=8, init_channels=32, growth_rate=8, block_layers=(2, 2, 2)),
                             **overrides})


def demo_campplus_config(**overrides) -> CAMPPlusConfig:
    """The shipped demo speaker encoder (~0.09 M parameters); still 80-bin fbank in, 192-d out."""
    values = dict(head_channels=8, init_channels=32, growth_rate=16, bottleneck_scale=2, block_layers=(3, 3, 3))
    return CAMPPlusConfig(**{**values, **overrides})


def tiny_s3tokenizer_config(**overrides) -> S3TokenizerConfig:
    """A ~43k-parameter random tokenizer for tests (same front-end, same FSQ, narrow and shallow encoder)."""
    return S3TokenizerConfig(**{**dict(n_state=32, n_head=2, n_layer=2), **overrides})


def demo_s3tokenizer_config(**overrides) -> S3TokenizerConfig:
    """The shipped demo tokenizer (~0.3 M parameters): same front-end, rates and FSQ, 96 wide, 2 blocks."""
    return S3TokenizerConfig(**{**dict(n_state=96, n_head=4, n_layer=2), **overrides})


__all__ = [
    "demo_campplus_config",
    "demo_config",
    "demo_flow_config",
    "demo_hift_config",
    "demo_s3tokenizer_config",
    "demo_token2wav_config",
    "official_config",
    "tiny_campplus_config",
    "tiny_config",
    "tiny_flow_config",
    "tiny_hift_config",
    "tiny_s3tokenizer_config",
    "tiny_token2wav_config",
]
