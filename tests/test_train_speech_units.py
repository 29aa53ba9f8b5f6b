"""Training recipes of the audio side (speech tokenizer, token2wav flow + vocoder) on tiny configs."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import pytest
import torch

from finetune import train_speech_tokenizer as tok_recipe
from finetune import train_token2wav as t2w_recipe
from finetune.speech_corpus import SpeechClip, SpeechClipError, check_clips
from minicpmo.modeling.modeling_speech_tokenizer import S3_SILENCE_CODE
from minicpmo.configuration.configuration_presets import demo_token2wav_config, tiny_token2wav_config
from minicpmo.configuration.configuration_token2wav import Token2WavConfig
from minicpmo.modeling.modeling_token2wav import MiniCPMOToken2Wav
from minicpmo.synthetic.speech import espeak_available

TONES = {"a": 150.0, "i": 220.0, "u": 330.0, "s": None}  # "s": white noise


def tone_clip(phones: str, voice: str = "tone", rate: int = 16000, seed: int = 0) -> SpeechClip:
    """A toy utterance: 0.1 s silence, one 0.12 s segment per phone (a tone or noise), 0.1 s silence."""
    rng = np.random.default_rng(seed)
    pieces = [np.zeros(int(0.1 * rate), np.float32)]
    t = np.arange(int(0.12 * rate)) / rate
    for phone in phones:
        freq = TONES[phone]
        piece = rng.normal(0, 0.2, t.size) if freq is None else np.sin(2 * np.pi * freq * t)
        pieces.append((0.5 * piece).astype(np.float32))
    pieces.append(np.zeros(int(0.1 * rate), np.float32))
    return SpeechClip(text=phones, voice=voice, audio=np.concatenate(pieces), phonemes=tuple(phones), sample_rate=rate)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models gain nothing from threads, and oversubscribed cores make them crawl."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def clips():
    words = ["aiu", "uia", "sai", "ius", "aaus", "siu", "uais", "isa"]
    return [tone_clip(w, voice="tone" if i % 3 else "other", seed=i) for i, w in enumerate(words * 2)]


@pytest.fixture()
def tiny():
    torch.manual_seed(0)
    return MiniCPMOToken2Wav(tiny_token2wav_config())


def test_demo_config_fits_the_budget_and_keeps_official_rates():
    config = demo_token2wav_config()
    model = MiniCPMOToken2Wav(config)
    assert sum(p.numel() for p in model.parameters()) <= 2_000_000
    assert config.sample_rate == 24000 and config.samples_per_code == 960
    assert config.flow.output_size == 80 and config.flow.spk_embed_dim == 192
    assert config.speech_tokenizer.codebook_size == 6561 and config.campplus.embedding_size == 192
    assert Token2WavConfig.from_dict(config.to_dict()) == config


def test_silence_digits_encode_code_4218(tiny):
    digits = tok_recipe.silence_digits(tiny.config.speech_tokenizer.fsq_levels)
    index = tiny.speech_tokenizer.quantizer.codes_to_indices(digits[None, None])
    assert int(index) == S3_SILENCE_CODE


def test_tokenizer_training_lowers_losses_and_adds_no_weights(tiny, clips):
    keys = set(tiny.state_dict())
    metrics = tok_recipe.train_speech_tokenizer(tiny.speech_tokenizer, clips, budget_s=1e9, max_steps=40,
                                                batch_size=4, lr=3e-3, log=None, eval_clips=clips[:2])
    assert metrics["steps"] == 40
    assert metrics["ctc_loss"] < metrics["first_ctc_loss"]
    assert metrics["recon_loss"] < metrics["first_recon_loss"]
    assert metrics["silence_loss"] < metrics["first_silence_loss"]
    assert metrics["distinct_codes"] >= 1 and 0 <= metrics["silence_as_4218"] <= 1 and "eval_per" in metrics
    assert set(tiny.state_dict()) == keys  # the CTC / reconstruction heads are not part of the model
    assert not tiny.speech_tokenizer.training


def test_budget_stops_training_by_the_clock(tiny, clips, monkeypatch):
    clock = iter(range(0, 10_000))  # every clock read advances one "second"
    from finetune import budgeted_loop

    monkeypatch.setattr(budgeted_loop.time, "monotonic", lambda: float(next(clock)))
    metrics = tok_recipe.train_speech_tokenizer(tiny.speech_tokenizer, clips, budget_s=6, log=None, batch_size=2)
    assert 1 <= metrics["steps"] <= 6
    assert tok_recipe.train_speech_tokenizer(tiny.speech_tokenizer, clips, budget_s=0, log=None)["steps"] == 0
    assert 1 <= t2w_recipe.train_vocoder(tiny.hift_original, clips, budget_s=6, log=None, batch_size=1)["steps"] <= 6


def test_flow_and_vocoder_training_lower_losses_and_inference_still_runs(tiny, clips, tmp_path):
    keys = set(tiny.state_dict())
    before = {k: v.clone() for k, v in tiny.state_dict().items()}
    flow = t2w_recipe.train_flow(tiny, clips, budget_s=1e9, max_steps=40, batch_size=4, window_tokens=12,
                                 lr=3e-3, log=None)
    assert flow["flow_loss"] < flow["first_flow_loss"]
    assert np.isfinite(flow["speaker_loss"])
    for prefix in ("flow.input_embedding.", "flow.encoder.", "flow.decoder.", "campplus.xvector.dense."):
        assert any(not torch.equal(v, before[k]) for k, v in tiny.state_dict().items() if k.startswith(prefix)), prefix
    assert all(torch.equal(v, before[k]) for k, v in tiny.state_dict().items() if k.startswith("speech_tokenizer."))
    data = t2w_recipe._vocoder_data(clips)

    def f0_error():
        with torch.no_grad():
            predictor = tiny.hift_original.f0_predictor
            return np.mean([(predictor(mel[None])[0] - f0).abs().mean().item() for mel, _, f0 in data])

    # the best any constant F0 can do (113 Hz here): beating it means the predictor reads pitch from the mel
    best_constant = min(np.mean([(f0 - c).abs().mean().item() for _, _, f0 in data]) for c in range(0, 400, 2))
    assert f0_error() > 0.95 * best_constant  # untrained, it is no better than a constant
    vocoder = t2w_recipe.train_vocoder(tiny.hift_original, clips, budget_s=1e9, max_steps=40, batch_size=2,
                                       segment_frames=12, log=None)
    assert vocoder["mel_loss"] < vocoder["first_mel_loss"]
    # measured over model seeds 0-7 and 1 or 2 threads: 44-77 Hz after 40 steps
    assert f0_error() < 0.85 * best_constant
    assert any(not torch.equal(v, before[k]) for k, v in tiny.state_dict().items() if k.startswith("hift_original."))
    assert set(tiny.state_dict()) == keys  # the speaker-ID head is training-only
    assert not tiny.flow.training and not tiny.campplus.training and not tiny.hift_original.training

    voice = tiny.prepare_voice(clips[0].audio, 16000)
    codes = tiny.speech_tokenizer.encode(clips[1].audio)
    wav = tiny.synthesize(codes, voice)
    assert wav.shape == (codes.numel() * 960,) and torch.isfinite(wav).all()
    state = tiny.start_stream(voice, seed=0)
    piece, state = tiny.push(codes, state, end_of_turn=True)
    assert piece.numel() == (codes.numel() + 3) * 960

    metrics = t2w_recipe.evaluate_resynthesis(tiny, clips[:2], clips[0], out_dir=str(tmp_path), n_examples=1)
    assert metrics["clips"] == 2 and np.isfinite(metrics["mel_l1"])
    assert 0 <= metrics["code_agreement"] <= 1 and 0 < metrics["chance_agreement"] <= 1
    assert sorted(os.listdir(tmp_path)) == ["heldout_00.txt", "heldout_00_original.wav", "heldout_00_resynth.wav"]

    tok_recipe.save_token2wav(tiny, str(tmp_path / "saved"))
    loaded = tok_recipe.load_token2wav(str(tmp_path / "saved"))
    for key, value in tiny.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key


def test_pitch_track_finds_a_tone_and_leaves_silence_unvoiced():
    t = np.arange(16000) / 16000
    f0 = t2w_recipe.pitch_track((0.5 * np.sin(2 * np.pi * 150 * t)).astype(np.float32), 50)
    assert torch.allclose(f0[2:-2], torch.full((46,), 150.0), atol=4)
    assert (t2w_recipe.pitch_track(np.zeros(16000, np.float32), 50) == 0).all()


@pytest.mark.parametrize(
    "bad, message",
    [
        (lambda c: SpeechClip("x", "v", np.zeros(0, np.float32), ("a",)), "empty or silent"),
        (lambda c: SpeechClip("x", "v", c.audio, c.phonemes, sample_rate=24000), "24000 Hz"),
        (lambda c: SpeechClip("x", "v", c.audio[1600:1700], c.phonemes), "at least"),
        (lambda c: SpeechClip("x", "v", c.audio.astype(np.int16), c.phonemes), "float"),
    ],
)
def test_bad_clips_raise_typed_errors(tiny, clips, bad, message):
    broken = clips[:2] + [bad(clips[0])]
    with pytest.raises(SpeechClipError, match=message):
        tok_recipe.train_speech_tokenizer(tiny.speech_tokenizer, broken, budget_s=10, log=None)
    with pytest.raises(SpeechClipError, match=message):
        t2w_recipe.train_flow(tiny, broken, budget_s=10, log=None)
    with pytest.raises(SpeechClipError, match=message):
        t2w_recipe.train_vocoder(tiny.hift_original, broken, budget_s=10, log=None)
    with pytest.raises(SpeechClipError):
        check_clips([])


def test_wrong_modules_raise_typed_errors(tiny, clips):
    with pytest.raises(tok_recipe.TokenizerTrainingError):
        tok_recipe.train_speech_tokenizer(tiny.flow, clips, budget_s=1, log=None)
    with pytest.raises(t2w_recipe.Token2WavTrainingError):
        t2w_recipe.train_flow(tiny.flow, clips, budget_s=1, log=None)
    with pytest.raises(t2w_recipe.Token2WavTrainingError):
        t2w_recipe.train_vocoder(tiny.flow, clips, budget_s=1, log=None)


@pytest.mark.skipif(not espeak_available(), reason="espeak-ng is not installed")
def test_corpus_clips_carry_phonemes_and_heldout_text_is_unseen():
    from finetune.speech_corpus import build_speech_corpus, heldout_sentences, split_sentences

    corpus = build_speech_corpus(4, seed=3)
    check_clips(corpus)
    assert all(c.phonemes and c.sample_rate == 16000 for c in corpus)
    train, _ = split_sentences(3)
    assert not set(heldout_sentences(12, seed=3)) & set(train)
    assert len(heldout_sentences(12)) == 12
