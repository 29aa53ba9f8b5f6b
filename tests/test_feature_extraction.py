"""16 kHz log-mel features: Whisper equivalence, 30 s pieces, frame mask, token counts, bad input."""

import math
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from transformers import WhisperFeatureExtractor  # noqa: E402

from minicpmo.processing.feature_extraction_minicpmo import (  # noqa: E402
    InvalidAudioError,
    MiniCPMOFeatureExtractor,
    MultiChannelAudioError,
    UnsupportedSamplingRateError,
    audio_token_count,
)
from minicpmo.processing.media_loading_minicpmo import load_audio  # noqa: E402

SR = 16000


@pytest.fixture(scope="module")
def extractor():
    return MiniCPMOFeatureExtractor()


def tone(seconds, seed=0):
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * SR)) / SR
    return (0.3 * np.sin(2 * np.pi * 220 * t) + 0.01 * rng.standard_normal(t.shape)).astype(np.float32)


@pytest.mark.parametrize(
    "num_samples, tokens",
    [(16000, 10), (160000, 100), (480000, 300), (720000, 450), (1281, 1), (1280, 0), (24000, 15), (8000, 5)],
)
def test_audio_token_count(num_samples, tokens):
    assert audio_token_count(num_samples) == tokens


def test_audio_token_count_formula_per_piece():
    rng = np.random.default_rng(0)
    for num_samples in rng.integers(1300, 1_500_000, size=50):
        expected = 0
        for start in range(0, int(num_samples), 480000):
            frames = math.ceil((min(start + 480000, num_samples) - start) / 160)
            encoder_frames = (frames - 1) // 2 + 1
            expected += max((encoder_frames - 5) // 5 + 1, 0)
        assert audio_token_count(int(num_samples)) == expected


def test_matches_whisper_features_cut_to_real_length(extractor):
    audio = tone(2.5)
    ours = extractor(audio, sampling_rate=SR)
    whisper = WhisperFeatureExtractor()(audio, sampling_rate=SR, return_tensors="np")["input_features"]
    frames = math.ceil(audio.shape[0] / 160)
    assert ours["input_features"].shape == (1, 80, frames)
    assert ours["input_features_mask"].tolist() == [[1] * frames]
    np.testing.assert_allclose(ours["input_features"][0], whisper[0, :, :frames], atol=1e-5)


def test_long_audio_is_split_into_30s_pieces(extractor):
    audio = tone(45.0)
    out = extractor(audio, return_tensors="pt")
    assert out["input_features"].shape == (2, 80, 3000)
    assert out["input_features_mask"].sum(dim=1).tolist() == [3000, 1500]
    assert torch.all(out["input_features"][1, :, 1500:] == 0)
    assert out["num_pieces"].tolist() == [2]
    first = extractor(audio[:480000])["input_features"][0]
    np.testing.assert_allclose(out["input_features"][0].numpy(), first, atol=1e-6)


def test_batch_is_zero_padded_with_mask(extractor):
    out = extractor([tone(1.0), tone(0.5, seed=1)], sampling_rate=SR)
    assert out["input_features"].shape == (2, 80, 100)
    assert out["input_features_mask"].sum(axis=1).tolist() == [100, 50]
    assert np.all(out["input_features"][1, :, 50:] == 0)
    single = extractor(tone(0.5, seed=1))["input_features"][0]
    np.testing.assert_allclose(out["input_features"][1, :, :50], single, atol=1e-6)


def test_reference_voice_features(extractor, ref_audio_paths):
    if not ref_audio_paths:
        pytest.skip("no reference audio available")
    for path in ref_audio_paths:
        audio = load_audio(str(path))  # soundfile + torchaudio resample to 16 kHz, mono
        assert audio.ndim == 1 and audio.dtype == np.float32 and np.abs(audio).max() <= 1.5
        out = extractor(audio, sampling_rate=SR, return_tensors="pt")
        pieces = math.ceil(audio.shape[0] / 480000)
        frames = out["input_features_mask"].sum().item()
        assert out["input_features"].shape[:2] == (pieces, 80)
        assert frames == sum(math.ceil(min(480000, audio.shape[0] - s) / 160) for s in range(0, audio.shape[0], 480000))
        real = out["input_features"][0][:, : out["input_features_mask"][0].sum()]
        # dynamic floor: values span at most 8 log10 units -> 2 after (x+4)/4; speech peaks around 0.5..2
        assert torch.isfinite(real).all()
        assert real.max() - real.min() <= 2.0 + 1e-5
        assert 0.0 < real.max() < 3.0 and real.min() > -1.5
        assert audio_token_count(audio.shape[0]) == extractor.token_count(audio.shape[0]) > 0


def test_int16_pcm_is_scaled(extractor):
    audio = tone(1.0)
    pcm = np.round(audio * 32767).astype(np.int16)
    np.testing.assert_allclose(
        extractor(pcm)["input_features"], extractor(audio)["input_features"], atol=1e-2
    )


def test_mono_2d_and_tensor_inputs(extractor):
    audio = tone(1.0)
    reference = extractor(audio)["input_features"]
    np.testing.assert_allclose(extractor(audio[None, :])["input_features"], reference)
    np.testing.assert_allclose(extractor(audio[:, None])["input_features"], reference)
    np.testing.assert_allclose(extractor(torch.from_numpy(audio))["input_features"], reference)


@pytest.mark.parametrize(
    "kwargs, audio, error, message",
    [
        ({"sampling_rate": 44100}, tone(1.0), UnsupportedSamplingRateError, "44100"),
        ({}, np.stack([tone(1.0), tone(1.0)]), MultiChannelAudioError, "multi-channel"),
        ({}, np.stack([tone(1.0)] * 2, axis=1), MultiChannelAudioError, "multi-channel"),
        ({}, np.array([0.0, np.nan] * 8000, dtype=np.float32), InvalidAudioError, "NaN"),
        ({}, np.array([0.0, np.inf] * 8000, dtype=np.float32), InvalidAudioError, "NaN or infinite"),
        ({}, np.zeros(0, dtype=np.float32), InvalidAudioError, "empty"),
        ({}, np.zeros(16000, dtype=bool), InvalidAudioError, "dtype"),
        ({}, np.zeros(16000, dtype=np.complex64), InvalidAudioError, "dtype"),
        ({}, np.zeros(1000, dtype=np.float32), InvalidAudioError, "too short"),
        ({}, "audio.wav", InvalidAudioError, "numpy array"),
        ({}, np.zeros((2, 2, 16000), dtype=np.float32), InvalidAudioError, "1-D"),
    ],
)
def test_bad_audio_raises_typed_errors(extractor, kwargs, audio, error, message):
    with pytest.raises(error, match=message):
        extractor(audio, **kwargs)


def test_config_round_trip(tmp_path, extractor):
    extractor.save_pretrained(tmp_path)
    loaded = MiniCPMOFeatureExtractor.from_pretrained(tmp_path)
    audio = tone(1.2)
    np.testing.assert_array_equal(loaded(audio)["input_features"], extractor(audio)["input_features"])
    assert loaded.audio_pool_step == 5 and loaded.sampling_rate == SR
