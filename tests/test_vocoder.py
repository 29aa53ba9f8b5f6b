"""HiFT vocoder (offline + 1.0.5 streaming), CAMPPlus speaker embedding and token2wav audio front-ends."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import pytest
import soundfile as sf
import torch
import torchaudio.functional as taf
from transformers.audio_utils import mel_filter_bank, spectrogram, window_function

from minicpmo.configuration.configuration_presets import tiny_hift_config
from minicpmo.configuration.configuration_token2wav import CAMPPlusConfig, HiFTConfig
from minicpmo.modeling.audio_frontends_token2wav import (
    InvalidAudioError,
    fit_prompt_mel,
    kaldi_fbank_16k,
    prompt_mel_24k,
)
from minicpmo.modeling.modeling_campplus import CAMPPlus, SpeakerEmbedder
from minicpmo.modeling.modeling_hift import HiFTInputError, HiFTStreamState, HiFTVocoder

HIFT_PARAMS = 20_821_295


def _smooth_mel(frames: int, batch: int = 1, seed: int = 0) -> torch.Tensor:
    """A speech-like log-mel: slowly moving spectral shape plus some frame noise, around log(0.02)."""
    gen = torch.Generator().manual_seed(seed)
    t = torch.linspace(0, 1, frames)
    bins = torch.arange(80)[:, None]
    shape = torch.sin(bins / 10 + 6 * t)[None] - 4
    return shape + 0.5 * torch.randn(batch, 80, frames, generator=gen)


def _deterministic_vocoder(seed: int = 0) -> HiFTVocoder:
    """Tiny HiFT whose source has no sine and no noise (alpha = sigma = 0), so it is a pure function."""
    torch.manual_seed(seed)
    return HiFTVocoder(tiny_hift_config(nsf_alpha=0.0, nsf_sigma=0.0)).eval()


def _stream(vocoder, mel, sizes, seed=None):
    state = vocoder.new_stream_state(seed=seed)
    chunks, start = [], 0
    for index, size in enumerate(sizes):
        wav, state = vocoder.stream_step(mel[..., start : start + size], state, last_chunk=index == len(sizes) - 1)
        chunks.append(wav)
        start += size
    return chunks, state


# ---------------------------------------------------------------------------------------------- HiFT shapes


def test_full_size_hift_matches_official_state_dict(shared_dir):
    expected = {}
    for line in (shared_dir / "reference" / "token2wav_state_dict.tsv").read_text().splitlines():
        name, shape, _dtype = line.split("\t")
        if name.startswith("hift_original."):
            expected[name.removeprefix("hift_original.")] = [int(v) for v in shape.strip("[]").split(",")]
    with torch.device("meta"):
        vocoder = HiFTVocoder(HiFTConfig())
    actual = {name: list(tensor.shape) for name, tensor in vocoder.state_dict().items()}
    assert sorted(actual) == sorted(expected)
    assert actual == expected
    assert sum(p.numel() for p in vocoder.parameters()) == HIFT_PARAMS
    assert HiFTConfig().samples_per_frame == 480 and HiFTConfig().stream_cache_samples == 3840


@pytest.mark.parametrize("frames", [1, 7, 23])
def test_tiny_hift_gives_480_samples_per_frame(frames):
    torch.manual_seed(0)
    vocoder = HiFTVocoder(tiny_hift_config()).eval()
    with torch.no_grad():
        wav = vocoder(_smooth_mel(frames, batch=2))
    assert wav.shape == (2, frames * 480)
    assert torch.isfinite(wav).all() and wav.abs().max() <= 0.99
    assert wav.std() > 0


def test_hift_batched_equals_single():
    vocoder = _deterministic_vocoder()
    mel = _smooth_mel(12, batch=2)
    with torch.no_grad():
        batched = vocoder(mel)
        singles = torch.cat([vocoder(mel[i : i + 1]) for i in range(2)])
    torch.testing.assert_close(batched, singles, atol=1e-6, rtol=0)


def test_hift_source_noise_is_seedable():
    torch.manual_seed(0)
    vocoder = HiFTVocoder(tiny_hift_config()).eval()
    mel = _smooth_mel(10)
    with torch.no_grad():
        first = vocoder(mel, generator=torch.Generator().manual_seed(7))
        again = vocoder(mel, generator=torch.Generator().manual_seed(7))
        other = vocoder(mel, generator=torch.Generator().manual_seed(8))
    assert torch.equal(first, again)
    assert not torch.equal(first, other)


# ---------------------------------------------------------------------------------------------- streaming


def test_streaming_equals_offline_up_to_the_official_crossfade():
    """Outside the 8-frame overlaps the stream is the offline waveform; inside, it is the Hamming
    cross-fade of two re-vocodings, whose window halves sum to ~1.08 (as in minicpmo-utils 1.0.5)."""
    vocoder = _deterministic_vocoder()
    sizes = [5, 17, 30, 28]  # a first chunk shorter than the 8-frame cache is allowed
    mel = _smooth_mel(sum(sizes))
    with torch.no_grad():
        offline = vocoder(mel)[0]
        chunks, state = _stream(vocoder, mel, sizes)
    streamed = torch.cat(chunks, dim=-1)[0]
    assert streamed.shape == offline.shape == (sum(sizes) * 480,)
    assert state.finished and state.samples_emitted == offline.numel()
    assert chunks[0].shape[-1] == 0  # everything of a 5-frame first chunk is held back

    gain = torch.ones_like(offline)
    for end in np.cumsum(sizes)[:-1]:
        start = max(0, end - 8) * 480
        overlap = end * 480 - start
        window = torch.hamming_window(2 * overlap, periodic=False)
        gain[start : end * 480] = window[:overlap] + window[overlap:]
    in_overlap = gain != 1
    residual = (streamed - gain * offline).abs()
    # Measured: 4e-8 outside the overlaps, 1.4 % of the peak inside (edge effects of the held-back tail).
    assert residual[~in_overlap].max() < 1e-5
    assert residual[in_overlap].max() < 0.03 * offline.abs().max()


def test_streaming_with_noise_has_no_seam_clicks():
    torch.manual_seed(0)
    vocoder = HiFTVocoder(tiny_hift_config()).eval()  # official alpha 0.1 / sigma 0.003 source
    sizes = [20, 25, 25, 14]
    mel = _smooth_mel(sum(sizes))
    with torch.no_grad():
        offline = vocoder(mel, generator=torch.Generator().manual_seed(0))[0]
        chunks, _ = _stream(vocoder, mel, sizes, seed=3)
    streamed = torch.cat(chunks, dim=-1)[0]
    assert streamed.shape == offline.shape and torch.isfinite(streamed).all()
    # Different noise draws and re-started harmonic phases: measured relative RMS difference ~4 %.
    assert (streamed - offline).norm() / offline.norm() < 0.15

    jumps = streamed.diff().abs()
    seams = np.cumsum([c.shape[-1] for c in chunks])[:-1]
    seam_jumps = torch.stack([jumps[p - 1] for p in seams])
    inner = jumps.clone()
    inner[seams - 1] = 0
    assert seam_jumps.max() <= 2.0 * inner.max(), (seam_jumps, inner.max())


def test_stream_step_is_pure_and_reproducible():
    torch.manual_seed(0)
    vocoder = HiFTVocoder(tiny_hift_config()).eval()
    mel = _smooth_mel(30)
    with torch.no_grad():
        _, state = vocoder.stream_step(mel[..., :12], vocoder.new_stream_state(seed=5))
        snapshot = [t.clone() for t in (state.mel_cache, state.source_cache, state.speech_cache)]
        out_a, next_a = vocoder.stream_step(mel[..., 12:], state)
        out_b, next_b = vocoder.stream_step(mel[..., 12:], state)
    for before, after in zip(snapshot, (state.mel_cache, state.source_cache, state.speech_cache)):
        assert torch.equal(before, after)
    assert torch.equal(out_a, out_b) and next_a.step == next_b.step == 2
    assert state.mel_cache.shape == (1, 80, 8) and state.source_cache.shape == (1, 1, 3840)
    assert state.speech_cache.shape == (1, 3840)


def test_stream_flush_with_empty_last_chunk():
    vocoder = _deterministic_vocoder()
    mel = _smooth_mel(20)
    with torch.no_grad():
        first, state = vocoder.stream_step(mel, vocoder.new_stream_state())
        tail, state = vocoder.stream_step(mel[..., :0], state, last_chunk=True)
        offline = vocoder(mel)
    assert first.shape[-1] + tail.shape[-1] == 20 * 480
    torch.testing.assert_close(torch.cat([first, tail], -1), offline, atol=1e-5, rtol=0)


def test_hift_typed_errors():
    vocoder = _deterministic_vocoder()
    with pytest.raises(HiFTInputError, match="shape"):
        vocoder(torch.zeros(1, 40, 5))
    with pytest.raises(HiFTInputError, match="NaN"):
        vocoder(torch.full((1, 80, 5), float("nan")))
    with pytest.raises(HiFTInputError, match="no frames"):
        vocoder(torch.zeros(1, 80, 0))
    with pytest.raises(HiFTInputError, match="batch size"):
        vocoder.stream_step(torch.zeros(2, 80, 5), vocoder.new_stream_state())
    with pytest.raises(HiFTInputError, match="HiFTStreamState"):
        vocoder.stream_step(torch.zeros(1, 80, 5), {})
    with torch.no_grad():
        _, done = vocoder.stream_step(torch.zeros(1, 80, 5) - 5, HiFTStreamState(), last_chunk=True)
    with pytest.raises(HiFTInputError, match="last chunk"):
        vocoder.stream_step(torch.zeros(1, 80, 5), done)


# ---------------------------------------------------------------------------------------------- front-ends


def _read(path):
    wav, rate = sf.read(str(path), dtype="float32")
    return wav, rate


def test_prompt_mel_is_50_hz_and_matches_an_independent_reference(shared_dir):
    wav, rate = _read(shared_dir / "ref_audio" / "ref_en_dlc_1.wav")
    assert rate != 24000  # exercises the resampling path
    mel = prompt_mel_24k(wav, rate)
    assert mel.shape[1] == 80 and torch.isfinite(mel).all()
    assert abs(mel.shape[0] - 50 * len(wav) / rate) <= 1
    assert mel.min() >= np.log(1e-5) - 1e-6

    # numpy STFT from transformers.audio_utils + librosa-style (Slaney) filterbank
    audio = taf.resample(torch.from_numpy(wav), rate, 24000).numpy()
    audio = np.pad(audio, (720, 720), mode="reflect")
    filters = mel_filter_bank(
        num_frequency_bins=961, num_mel_filters=80, min_frequency=0, max_frequency=8000,
        sampling_rate=24000, norm="slaney", mel_scale="slaney",
    )
    power = spectrogram(
        audio, window_function(1920, "hann", periodic=True), frame_length=1920, hop_length=480,
        power=2.0, center=False,
    )
    reference = np.log(np.maximum(filters.T @ np.sqrt(power + 1e-9), 1e-5)).T
    np.testing.assert_allclose(mel.numpy(), reference, atol=1e-3)


def test_fit_prompt_mel_pads_and_cuts():
    mel = torch.arange(6 * 80, dtype=torch.float32).reshape(6, 80)
    padded = fit_prompt_mel(mel, 5)
    assert padded.shape == (10, 80)
    assert torch.equal(padded[:6], mel) and torch.equal(padded[6:], mel[-1:].expand(4, 80))
    cut = fit_prompt_mel(mel, 2)
    assert torch.equal(cut, mel[:4])
    with pytest.raises(InvalidAudioError, match="n_prompt_tokens"):
        fit_prompt_mel(mel, 0)
    with pytest.raises(InvalidAudioError, match=r"\[T, 80\]"):
        fit_prompt_mel(mel[None], 3)


def test_kaldi_fbank_shape():
    wav = (0.1 * np.sin(np.arange(16000) / 7)).astype(np.float32)
    fbank = kaldi_fbank_16k(wav)
    assert fbank.shape == (1 + (16000 - 400) // 160, 80)
    assert torch.isfinite(fbank).all()


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda: prompt_mel_24k(np.zeros(0, np.float32), 16000), "empty"),
        (lambda: prompt_mel_24k(np.full(16000, np.nan, np.float32), 16000), "NaN"),
        (lambda: prompt_mel_24k(np.zeros((2, 16000), np.float32), 16000), "mono"),
        (lambda: prompt_mel_24k(np.zeros(100, np.float32), 24000), "too short"),
        (lambda: prompt_mel_24k(np.zeros(16000, np.float32), 0), "sample_rate"),
        (lambda: kaldi_fbank_16k(np.zeros(22050, np.float32), 22050), "16000 Hz"),
        (lambda: kaldi_fbank_16k(np.zeros(100, np.float32)), "too short"),
        (lambda: kaldi_fbank_16k(np.zeros(1000, np.uint8)), "dtype"),
    ],
)
def test_front_end_typed_errors(call, match):
    with pytest.raises(InvalidAudioError, match=match):
        call()


# ---------------------------------------------------------------------------------------------- CAMPPlus


def test_campplus_has_the_published_shape():
    with torch.device("meta"):
        model = CAMPPlus(CAMPPlusConfig())
    state = model.state_dict()
    assert state["head.conv1.weight"].shape == (32, 1, 3, 3)
    assert state["xvector.tdnn.linear.weight"].shape == (128, 320, 5)
    assert state["xvector.block2.tdnnd24.cam_layer.linear_local.weight"].shape == (32, 128, 3)
    assert state["xvector.transit3.linear.weight"].shape == (512, 1024, 1)
    assert state["xvector.dense.linear.weight"].shape == (192, 1024, 1)
    assert "xvector.dense.nonlinear.batchnorm.weight" not in state  # affine-free BN
    # CAM++ is 7.18 M parameters with a 512-d head; 1024 * (512 - 192) fewer here.
    assert sum(p.numel() for p in model.parameters()) == 7_176_224 - 1024 * (512 - 192)


@pytest.fixture(scope="module")
def embedder():
    torch.manual_seed(0)
    return SpeakerEmbedder(CAMPPlusConfig()).eval()


def test_speaker_embeddings_separate_voices(shared_dir, embedder):
    signature, rate_a = _read(shared_dir / "ref_audio" / "ref_minicpm_signature.wav")
    english, rate_b = _read(shared_dir / "ref_audio" / "ref_en_dlc_1.wav")
    assert rate_a == 16000
    english = taf.resample(torch.from_numpy(english), rate_b, 16000)

    first = embedder.embed(signature)
    again = embedder.embed(torch.from_numpy(signature))
    other = embedder.embed(english)
    first_half = embedder.embed(signature[: len(signature) // 2])
    assert first.shape == (192,) and torch.isfinite(first).all()
    assert torch.equal(first, again)
    cross = torch.cosine_similarity(first, other, dim=0)
    same_voice = torch.cosine_similarity(first, first_half, dim=0)
    assert cross < 0.99
    assert same_voice > cross


def test_speaker_embedder_typed_errors(embedder):
    with pytest.raises(InvalidAudioError, match="empty"):
        embedder.embed(np.zeros(0, np.float32))
    with pytest.raises(InvalidAudioError, match="NaN"):
        embedder.embed(np.full(16000, np.nan, np.float32))
    with pytest.raises(InvalidAudioError, match="16000 Hz"):
        embedder.embed(np.zeros(24000, np.float32), sample_rate=24000)
    with pytest.raises(InvalidAudioError, match="too short"):
        embedder.embed(np.zeros(1000, np.float32))
