"""Token2WavConfig and its parts are PreTrainedConfig sub-configs of MiniCPMOConfig; saved files keep loading."""

import ast
import json
from pathlib import Path

import pytest
from transformers import PreTrainedConfig

import minicpmo
from minicpmo import MiniCPMOConfig, demo_config, official_config, tiny_config
from minicpmo.configuration import configuration_presets as presets
from minicpmo.configuration import configuration_token2wav as t2w
from minicpmo.configuration.configuration_token2wav import (
    CAMPPlusConfig,
    FlowConfig,
    FlowConfigError,
    HiFTConfig,
    S3TokenizerConfig,
    S3TokenizerConfigError,
    Token2WavConfig,
    Token2WavConfigError,
)

PACKAGE = Path(minicpmo.__file__).resolve().parent
DEMO_MODEL = PACKAGE / "assets" / "demo_model"
PARTS = {"flow": FlowConfig, "hift": HiFTConfig, "campplus": CAMPPlusConfig, "speech_tokenizer": S3TokenizerConfig}
ALL_CONFIGS = (Token2WavConfig, *PARTS.values())

# What a config.json held for `token2wav_config` before these were PreTrainedConfigs (the tiny preset then).
OLD_TINY_TOKEN2WAV = {
    "campplus": {
        "block_dilations": [1, 2, 2], "block_kernel_sizes": [3, 3, 3], "block_layers": [2, 2, 2],
        "bottleneck_scale": 4, "cam_reduction": 2, "cam_segment_frames": 100, "embedding_size": 192,
        "feat_dim": 80, "growth_rate": 8, "head_blocks": [2, 2], "head_channels": 8, "init_channels": 32,
        "min_frames": 8,
    },
    "flow": {
        "dit_depth": 2, "dit_head_dim": 16, "dit_hidden_size": 32, "dit_in_channels": 320, "dit_mlp_ratio": 4.0,
        "dit_num_heads": 2, "dit_out_channels": 80, "dit_time_embed_dim": 32, "encoder_attention_heads": 2,
        "encoder_linear_units": 64, "encoder_num_blocks": 2, "encoder_num_up_blocks": 1, "encoder_output_size": 32,
        "inference_cfg_rate": 0.7, "input_size": 32, "n_timesteps": 4, "noise_length": 30000, "noise_seed": 0,
        "output_size": 80, "pre_lookahead_len": 3, "silence_token_id": 4218, "spk_embed_dim": 192,
        "stream_cache_frames": 100, "up_stride": 2, "vocab_size": 6561,
    },
    "force_flush": True,
    "force_flush_min_tokens": 8,
    "hift": {
        "audio_limit": 0.99, "base_channels": 32, "f0_predictor_channels": 32, "f0_predictor_num_convs": 5,
        "in_channels": 80, "istft_hop_length": 4, "istft_n_fft": 16, "lrelu_slope": 0.1, "nb_harmonics": 8,
        "nsf_alpha": 0.1, "nsf_sigma": 0.003, "nsf_voiced_threshold": 10.0,
        "resblock_dilation_sizes": [[1, 3, 5], [1, 3, 5], [1, 3, 5]], "resblock_kernel_sizes": [3, 7, 11],
        "sampling_rate": 24000, "source_resblock_dilation_sizes": [[1, 3, 5], [1, 3, 5], [1, 3, 5]],
        "source_resblock_kernel_sizes": [7, 7, 11], "stream_cache_mel_frames": 8, "upsample_kernel_sizes": [16, 11, 7],
        "upsample_rates": [8, 5, 3],
    },
    "n_timesteps": 10,
    "speech_tokenizer": {
        "attn_ln_eps": 1e-06, "fsmn_kernel_size": 31, "fsq_levels": [3, 3, 3, 3, 3, 3, 3, 3], "hop_length": 160,
        "mlp_ln_eps": 1e-05, "mlp_ratio": 4, "n_audio_ctx": 1500, "n_fft": 400, "n_head": 2, "n_layer": 2,
        "n_mels": 128, "n_state": 32, "rope_theta": 10000.0, "sample_rate": 16000,
    },
    "stream_chunk_tokens": 25,
    "voice_encoders": True,
}


def saved_layout(config: Token2WavConfig) -> dict:
    """What a nested token2wav_config looks like in config.json (transformers drops the version there)."""
    values = config.to_dict()
    values.pop("transformers_version")
    return values


# ---------------------------------------------------------------------------------------------- structure


def test_every_config_is_a_pretrained_config_and_token2wav_is_a_sub_config():
    for cls in ALL_CONFIGS:
        assert issubclass(cls, PreTrainedConfig) and cls.model_type
    assert Token2WavConfig.sub_configs == PARTS
    assert MiniCPMOConfig.sub_configs["token2wav_config"] is Token2WavConfig
    config = Token2WavConfig()
    for name, cls in PARTS.items():
        assert type(getattr(config, name)) is cls and getattr(config, name) == cls()


def test_one_preset_idiom_module_level_functions():
    for cls in ALL_CONFIGS:
        assert not hasattr(cls, "tiny") and not hasattr(cls, "demo") and not hasattr(cls, "official")
    assert isinstance(presets.tiny_token2wav_config(), Token2WavConfig)
    assert isinstance(presets.demo_token2wav_config(), Token2WavConfig)
    for part, cls in (("flow", FlowConfig), ("hift", HiFTConfig), ("campplus", CAMPPlusConfig),
                      ("s3tokenizer", S3TokenizerConfig)):
        for size in ("tiny", "demo"):
            assert type(getattr(presets, f"{size}_{part}_config")()) is cls
    assert presets.tiny_flow_config(n_timesteps=2).n_timesteps == 2  # presets take overrides
    assert presets.tiny_s3tokenizer_config(n_layer=1).n_layer == 1
    assert tiny_config().token2wav_config == presets.tiny_token2wav_config()
    assert demo_config().token2wav_config == presets.demo_token2wav_config()
    assert official_config().token2wav_config is None


def test_configuration_imports_nothing_from_modeling():
    def imported_modules(node) -> list[str]:
        if isinstance(node, ast.Import):
            return [alias.name for alias in node.names]
        if isinstance(node, ast.ImportFrom):
            if node.level == 0:
                return [node.module]
            # `from .x import y` is a sibling in configuration/; `from ..x import y` / `from .. import x` leave it
            if node.module:
                return [node.module]
            return [alias.name for alias in node.names]
        return []

    checked = 0
    for path in sorted((PACKAGE / "configuration").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            for module in imported_modules(node):
                checked += 1
                assert not module.startswith(("minicpmo.modeling", "modeling")), (path.name, ast.unparse(node))
    assert checked > 5


def test_repeated_constants_equal_the_modeling_ones():
    from minicpmo.modeling import audio_frontends_token2wav as frontends
    from minicpmo.modeling import modeling_speech_tokenizer as s3

    assert t2w.PROMPT_MEL_BINS == frontends.PROMPT_MEL_BINS and t2w.FBANK_BINS == frontends.FBANK_BINS
    assert (t2w.S3_SAMPLE_RATE, t2w.S3_N_FFT, t2w.S3_HOP_LENGTH) == (s3.S3_SAMPLE_RATE, s3.S3_N_FFT, s3.S3_HOP_LENGTH)


def test_old_import_locations_still_work():
    from minicpmo.modeling.modeling_campplus import CAMPPlusConfig as campplus
    from minicpmo.modeling.modeling_flow import FlowConfig as flow
    from minicpmo.modeling.modeling_flow import FlowConfigError as flow_error
    from minicpmo.modeling.modeling_hift import HiFTConfig as hift
    from minicpmo.modeling.modeling_speech_tokenizer import S3TokenizerConfig as s3
    from minicpmo.modeling.modeling_token2wav import Token2WavConfig as token2wav
    from minicpmo.modeling.modeling_token2wav import Token2WavConfigError as token2wav_error

    assert (token2wav, flow, hift, campplus, s3) == ALL_CONFIGS
    assert token2wav_error is Token2WavConfigError and flow_error is FlowConfigError


# ---------------------------------------------------------------------------------------------- round trips


@pytest.mark.parametrize("make", [Token2WavConfig, presets.tiny_token2wav_config, presets.demo_token2wav_config])
def test_to_dict_from_dict_round_trip(make):
    config = make()
    values = json.loads(json.dumps(config.to_dict()))
    again = Token2WavConfig.from_dict(values)
    assert again == config and again.to_dict() == config.to_dict()
    assert isinstance(again.hift.resblock_dilation_sizes[0], tuple) and isinstance(again.campplus.head_blocks, tuple)
    assert (again.sample_rate, again.samples_per_code, again.lookahead_tokens, again.silence_token_id) == (
        24000, 960, 3, 4218,
    )
    assert again != Token2WavConfig.from_dict({**values, "n_timesteps": 3})
    for name, cls in PARTS.items():
        assert cls.from_dict(values[name]) == getattr(config, name)


def test_to_dict_writes_only_the_fields_as_plain_json():
    values = presets.tiny_token2wav_config().to_dict()
    assert saved_layout(presets.tiny_token2wav_config()) == OLD_TINY_TOKEN2WAV
    assert set(values) == set(OLD_TINY_TOKEN2WAV) | {"transformers_version"}
    assert json.loads(json.dumps(values)) == values  # tuples already lists


def test_list_values_of_tuple_fields_are_accepted():
    hift = HiFTConfig(upsample_rates=[8, 5, 3], resblock_dilation_sizes=[[1, 3, 5], [1, 3, 5], [1, 3, 5]])
    assert hift.upsample_rates == (8, 5, 3) and hift.resblock_dilation_sizes == HiFTConfig().resblock_dilation_sizes
    assert hift == HiFTConfig()
    assert CAMPPlusConfig(block_layers=[2, 2, 2]).block_layers == (2, 2, 2)
    assert S3TokenizerConfig(fsq_levels=(3,) * 8).fsq_levels == [3] * 8  # this one is a list field


def test_standalone_save_pretrained_round_trip(tmp_path):
    config = presets.demo_token2wav_config(voice_encoders=False)
    config.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert {k: v for k, v in saved.items() if k != "transformers_version"} == saved_layout(config)
    assert Token2WavConfig.from_pretrained(tmp_path) == config
    hift = presets.tiny_hift_config()
    hift.save_pretrained(tmp_path / "hift")
    assert HiFTConfig.from_pretrained(tmp_path / "hift") == hift


def test_minicpmo_config_save_pretrained_round_trip(tmp_path):
    config = tiny_config(token2wav_config=presets.tiny_token2wav_config(n_timesteps=3, force_flush=False))
    config.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["token2wav_config"] == saved_layout(config.token2wav_config)  # the layout of older files
    assert config.to_dict()["token2wav_config"] == saved_layout(config.token2wav_config)
    loaded = MiniCPMOConfig.from_pretrained(tmp_path)
    assert type(loaded.token2wav_config) is Token2WavConfig and loaded.token2wav_config == config.token2wav_config
    assert loaded.to_dict() == config.to_dict()
    again = MiniCPMOConfig.from_dict(config.to_dict())
    assert again.token2wav_config == config.token2wav_config


def test_a_dict_builds_the_sub_config_and_none_stays_none(tmp_path):
    config = tiny_config(token2wav_config=OLD_TINY_TOKEN2WAV)
    assert type(config.token2wav_config) is Token2WavConfig
    assert config.token2wav_config == presets.tiny_token2wav_config()
    official = tiny_config(token2wav_config=None)
    assert official.token2wav_config is None
    official.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["token2wav_config"] is None
    assert MiniCPMOConfig.from_pretrained(tmp_path).token2wav_config is None


def test_runtime_attributes_do_not_change_equality():
    config = tiny_config()
    config._attn_implementation = "sdpa"  # transformers sets these on every sub-config
    config.token2wav_config.dtype = "bfloat16"
    assert config.token2wav_config == presets.tiny_token2wav_config()
    assert config.to_dict()["token2wav_config"] == OLD_TINY_TOKEN2WAV


# ---------------------------------------------------------------------------------------------- saved files


def test_old_style_dict_loads_to_an_equal_config():
    assert Token2WavConfig.from_dict(OLD_TINY_TOKEN2WAV) == presets.tiny_token2wav_config()
    assert MiniCPMOConfig.from_dict({**tiny_config().to_dict(), "token2wav_config": OLD_TINY_TOKEN2WAV}) \
        .token2wav_config == presets.tiny_token2wav_config()


def test_the_shipped_demo_model_config_loads_unchanged(tmp_path):
    shipped = json.loads((DEMO_MODEL / "config.json").read_text())
    old = shipped["token2wav_config"]
    assert "model_type" not in old  # written by the dataclass version
    assert Token2WavConfig.from_dict(old) == presets.demo_token2wav_config()
    standalone = json.loads((DEMO_MODEL / "token2wav" / "config.json").read_text())
    assert Token2WavConfig.from_dict(standalone) == presets.demo_token2wav_config()

    config = MiniCPMOConfig.from_pretrained(DEMO_MODEL)
    assert config.token2wav_config == demo_config().token2wav_config
    assert config.to_dict()["token2wav_config"] == old
    config.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["token2wav_config"] == old


# ---------------------------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    "values, error, message",
    [
        ({"n_steps": 3}, Token2WavConfigError, r"unknown Token2WavConfig keys: \['n_steps'\]"),
        ({"hift": {"channels": 3}}, Token2WavConfigError, r"unknown hift keys: \['channels'\]"),
        ({"campplus": {"width": 3}}, Token2WavConfigError, r"unknown campplus keys: \['width'\]"),
        ({"speech_tokenizer": {"layers": 3}}, Token2WavConfigError, r"unknown speech_tokenizer keys: \['layers'\]"),
        ({"flow": {"steps": 3}}, FlowConfigError, r"unknown FlowConfig keys: \['steps'\]"),
        ({"flow": 3}, Token2WavConfigError, "Token2WavConfig.flow must be a FlowConfig, got int"),
        ({"n_timesteps": 0}, Token2WavConfigError, "Token2WavConfig.n_timesteps must be a positive int, got 0"),
        ({"force_flush_min_tokens": True}, Token2WavConfigError, "force_flush_min_tokens must be a positive int"),
        ({"force_flush_min_tokens": 3}, Token2WavConfigError, r"force_flush_min_tokens \(3\) must exceed the 3"),
        ({"hift": {"in_channels": 64}}, Token2WavConfigError,
         r"flow.output_size \(80\) must equal hift.in_channels \(64\)"),
        ({"campplus": {"embedding_size": 128}}, Token2WavConfigError,
         r"flow.spk_embed_dim \(192\) must equal campplus.embedding_size \(128\)"),
        ({"speech_tokenizer": {"fsq_levels": [3] * 7}}, Token2WavConfigError,
         r"flow.vocab_size \(6561\) must equal the S3 codebook size \(2187\)"),
        ({"flow": {"n_timesteps": 0}}, FlowConfigError, "FlowConfig.n_timesteps must be a positive number, got 0"),
        ({"flow": {"dit_in_channels": 65}}, FlowConfigError, "dit_in_channels must be 4"),
        ({"speech_tokenizer": {"n_state": 30, "n_head": 4}}, S3TokenizerConfigError, "n_state=30 is not divisible"),
        ({"speech_tokenizer": {"n_mels": 80}}, S3TokenizerConfigError, "the S3 v2 front-end is fixed"),
    ],
)
def test_validation_errors_keep_their_messages(values, error, message):
    with pytest.raises(error, match=message):
        Token2WavConfig.from_dict(values)
    with pytest.raises(error, match=message):  # the same through MiniCPMOConfig
        tiny_config(token2wav_config=values)


def test_voice_encoder_checks_only_apply_with_voice_encoders():
    small_flow = presets.tiny_flow_config()  # 16 mel bins, 24-d speaker
    with pytest.raises(Token2WavConfigError, match="flow.output_size must be 80"):
        Token2WavConfig(flow=small_flow, hift=presets.tiny_hift_config(in_channels=16))
    bare = Token2WavConfig(flow=small_flow, hift=presets.tiny_hift_config(in_channels=16), voice_encoders=False)
    assert Token2WavConfig.from_dict(bare.to_dict()) == bare


def test_from_dict_needs_a_dict():
    with pytest.raises(Token2WavConfigError, match="Token2WavConfig.from_dict needs a dict, got list"):
        Token2WavConfig.from_dict([])
    assert issubclass(Token2WavConfigError, ValueError) and issubclass(FlowConfigError, ValueError)
    assert issubclass(S3TokenizerConfigError, ValueError)
