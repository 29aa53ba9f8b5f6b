import json

import pytest
from huggingface_hub.errors import StrictDataclassFieldValidationError

from minicpmo import MiniCPMOConfig, MiniCPMOConfigError, official_config, tiny_config


def test_reads_official_layout(shared_dir):
    values = json.loads((shared_dir / "reference" / "official_config_reconstructed.json").read_text())
    config = MiniCPMOConfig(**values)
    assert config.hidden_size == 4096 and config.num_hidden_layers == 36 and config.vocab_size == 151748
    assert config.rope_parameters["rope_theta"] == 1e6
    assert config.vision_config.num_hidden_layers == 27 and config.vision_config.patch_size == 14
    assert config.audio_config.d_model == 1024 and config.audio_config.encoder_layers == 24
    assert config.tts_config.num_audio_tokens == 6562 and config.tts_config.top_k == 25
    assert config.tts_config.llm_hidden_size == 4096  # official alias of llm_dim
    assert config.slice_config.max_slice_nums == 9
    assert config.query_num == 64 and config.audio_pool_step == 5
    assert config.get_text_config() is config  # TRL reads the LLM keys from the top level
    assert config.patch_size == 14 and config.slice_mode is True


def test_save_load_round_trip_keeps_official_keys(tmp_path):
    config = official_config()
    config.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    # The official (transformers 4.x) code reads these top-level keys.
    assert saved["rope_theta"] == 1e6
    for key in ("vision_config", "audio_config", "tts_config", "slice_config", "query_num", "audio_pool_step"):
        assert key in saved
    assert saved["tts_config"]["top_p"] == 0.85 and saved["tts_config"]["repetition_penalty"] == 1.05
    reloaded = MiniCPMOConfig.from_pretrained(tmp_path)
    assert reloaded.to_dict() == config.to_dict()


def test_tiny_config_round_trip(tmp_path):
    config = tiny_config()
    config.save_pretrained(tmp_path)
    assert MiniCPMOConfig.from_pretrained(tmp_path).to_dict() == config.to_dict()


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(query_num=0), "query_num"),
        (dict(audio_pool_step=0), "audio_pool_step"),
        (dict(audio_chunk_length=0.0), "audio_chunk_length"),
        (dict(slice_config=dict(max_slice_nums=0)), "max_slice_nums"),
        (dict(slice_config=dict(patch_size=16)), "patch_size"),
        (dict(tts_config=dict(hidden_size=30, num_attention_heads=4)), "divisible"),
        (dict(hidden_size=128), "llm_dim"),
    ],
)
def test_bad_values_raise_typed_errors(overrides, message):
    with pytest.raises(MiniCPMOConfigError, match=message):
        tiny_config(**overrides)


def test_wrong_types_are_rejected():
    with pytest.raises(StrictDataclassFieldValidationError):
        tiny_config(query_num="many")
