"""One home per fact: the special-token table, the label constants, the sample rates and the PCM normaliser."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import json

import numpy as np
import pytest

from minicpmo import audio_utils, special_tokens
from minicpmo.processing.duplex_layout_minicpmo import DuplexTokens
from minicpmo.processing.tokenization_minicpmo import MiniCPMOTokenizerFast


def test_the_token_table_equals_the_official_tokenizer_files(shared_dir):
    tokenizer = MiniCPMOTokenizerFast.from_pretrained(str(shared_dir / "tokenizer"))
    table = special_tokens.MiniCPMOSpecialTokens()
    for name, value in table.as_dict().items():
        assert tokenizer.convert_tokens_to_ids(table.token_string(name)) == value, name
    assert special_tokens.MiniCPMOSpecialTokens.from_tokenizer(tokenizer) == table
    # the duplex layout and the speech output read the same table
    assert DuplexTokens() == DuplexTokens.from_special_tokens(table)
    from minicpmo.modeling import modeling_speech_output

    assert modeling_speech_output.TTS_BOS_TOKEN_ID == table.tts_bos == tokenizer.convert_tokens_to_ids("<|tts_bos|>")
    config = json.loads((shared_dir / "reference" / "official_config_reconstructed.json").read_text())
    assert config["tts_config"]["num_audio_tokens"] == special_tokens.SPEECH_CODEBOOK_SIZE + 1


def test_label_and_rate_constants_have_one_value_everywhere():
    from finetune import labels
    from minicpmo.modeling import modeling_speech_decoder, modeling_speech_output, modeling_speech_tokenizer
    from minicpmo.processing import duplex_serializer_minicpmo

    assert labels.IGNORE_INDEX is duplex_serializer_minicpmo.IGNORE_INDEX is special_tokens.IGNORE_INDEX == -100
    assert modeling_speech_decoder.SPEECH_IGNORE_INDEX == special_tokens.IGNORE_INDEX
    assert modeling_speech_tokenizer.S3_CODEBOOK_SIZE == special_tokens.SPEECH_CODEBOOK_SIZE == 3**8
    assert modeling_speech_output.OUTPUT_SAMPLE_RATE is audio_utils.OUTPUT_SAMPLE_RATE


@pytest.mark.parametrize("dtype", [np.int16, np.int32, np.float32, np.float64])
def test_browser_chunks_and_model_inputs_share_one_pcm_normaliser(dtype):
    from minicpmo.space.audio_io import browser_chunk_to_mono

    rng = np.random.default_rng(0)
    if np.issubdtype(dtype, np.integer):
        info = np.iinfo(dtype)
        samples = rng.integers(info.min, info.max, 4000, dtype=dtype)
    else:
        samples = rng.uniform(-1, 1, 4000).astype(dtype)
    mono = audio_utils.validate_waveform(samples)
    np.testing.assert_array_equal(browser_chunk_to_mono(samples), mono)
    np.testing.assert_array_equal(browser_chunk_to_mono(np.stack([samples, samples], 1)), mono)
    assert np.abs(mono).max() <= 1.0


def test_one_audio_file_reader_serves_files_and_bytes(tmp_path):
    import io

    import soundfile

    from minicpmo.processing.media_loading_minicpmo import load_audio
    from minicpmo.synthetic import speech

    rng = np.random.default_rng(0)
    stereo = rng.uniform(-0.5, 0.5, (2400, 2)).astype(np.float32)
    path = tmp_path / "stereo.wav"
    soundfile.write(path, stereo, audio_utils.OUTPUT_SAMPLE_RATE, subtype="FLOAT")
    mono, rate = audio_utils.read_audio_file(str(path))
    assert rate == audio_utils.OUTPUT_SAMPLE_RATE and mono.dtype == np.float32
    np.testing.assert_allclose(mono, stereo.mean(axis=1), atol=1e-7)
    assert load_audio(str(path)).shape == (1600,)  # the same reader, resampled to 16 kHz
    buffer = io.BytesIO()
    soundfile.write(buffer, stereo, audio_utils.INPUT_SAMPLE_RATE, format="WAV", subtype="FLOAT")
    from_bytes, rate = speech._read_wav(buffer.getvalue())
    assert rate == audio_utils.INPUT_SAMPLE_RATE
    np.testing.assert_array_equal(from_bytes, mono)


def test_serializer_and_duplex_collator_share_one_options_object():
    import inspect
    from dataclasses import fields
    from types import SimpleNamespace

    from finetune.duplex_collator import DuplexCollator
    from minicpmo.processing.duplex_serializer_minicpmo import DuplexSerializerOptions, serialize_duplex

    defaults = DuplexSerializerOptions()
    parameters = inspect.signature(serialize_duplex).parameters
    assert {f.name: parameters[f.name].default for f in fields(defaults)} == defaults.as_kwargs()

    processor = SimpleNamespace(image_processor=SimpleNamespace(image_feature_size=16))
    assert DuplexCollator(processor).options == DuplexSerializerOptions(image_slots=16)
    keyword = DuplexCollator(processor, lookahead_tokens=3, turn_gap_s=2, image_slots=None)
    assert keyword.options == DuplexSerializerOptions(lookahead_tokens=3, turn_gap_s=2.0, image_slots=16)
    given = DuplexSerializerOptions(unit_seconds=2.0, image_slots=8)
    assert DuplexCollator(processor, options=given).options == given
    assert DuplexCollator(processor, options=given, force_listen_count=1).options.force_listen_count == 1
    assert DuplexCollator(processor, options=given).codes_per_unit == 50
    with pytest.raises(TypeError):
        DuplexCollator(processor, unit_secs=1.0)
