"""Token2wav wrapper: config, voice prompt, offline and streaming synthesis, meta-device init, converter."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import json  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from safetensors.torch import load_file  # noqa: E402
from torch import nn  # noqa: E402
from torch.nn.utils.parametrize import ParametrizationList  # noqa: E402
from transformers import PretrainedConfig, PreTrainedModel  # noqa: E402

from minicpmo.convert_token2wav import Token2WavConversionError, convert_token2wav, main  # noqa: E402
from minicpmo.modeling.audio_frontends_token2wav import InvalidAudioError  # noqa: E402
from minicpmo.configuration.configuration_presets import tiny_hift_config, tiny_token2wav_config  # noqa: E402
from minicpmo.configuration.configuration_token2wav import Token2WavConfig, Token2WavConfigError  # noqa: E402
from minicpmo.modeling.modeling_hift import Snake  # noqa: E402
from minicpmo.modeling.modeling_speech_tokenizer import SpeechTokenizerInputError  # noqa: E402
from minicpmo.modeling.modeling_token2wav import (  # noqa: E402
    MiniCPMOToken2Wav,
    Token2WavInputError,
    Token2WavStreamState,
    VoicePrompt,
    init_token2wav_weights,
)

SILENCE = 4218
SAMPLES_PER_CODE = 960
OVERLAP_FRAMES = 8  # HiFT 1.0.5 stream: re-vocoded mel frames per seam (3840 samples)


def _voice(config: Token2WavConfig, num_tokens: int = 8, seed: int = 1) -> VoicePrompt:
    gen = torch.Generator().manual_seed(seed)
    return VoicePrompt(
        prompt_tokens=torch.randint(0, config.flow.vocab_size, (1, num_tokens), generator=gen),
        prompt_mel=torch.randn(1, 2 * num_tokens, 80, generator=gen) - 4,
        speaker_embedding=torch.randn(1, 192, generator=gen),
    )


def _codes(n: int, seed: int = 2) -> torch.Tensor:
    return torch.randint(0, 6561, (n,), generator=torch.Generator().manual_seed(seed))


def _build(seed: int = 0, **overrides) -> MiniCPMOToken2Wav:
    torch.manual_seed(seed)
    return MiniCPMOToken2Wav(tiny_token2wav_config(**overrides)).eval()


def _stream(model, codes, voice, unit=25, seed=3, **kwargs):
    """Push ``codes`` in units of ``unit`` codes, then flush; returns the emitted pieces and the final state."""
    state = model.start_stream(voice, seed=seed, **kwargs)
    pieces = []
    for start in range(0, codes.numel(), unit):
        wav, state = model.push(codes[start : start + unit], state)
        pieces.append(wav)
    wav, state = model.flush(state)
    pieces.append(wav)
    return pieces, state


@pytest.fixture(scope="module")
def deterministic():
    """Tiny token2wav whose vocoder source has no sine and no noise: a pure function of the codes."""
    return _build(hift=tiny_hift_config(nsf_alpha=0.0, nsf_sigma=0.0), force_flush=False)


@pytest.fixture(scope="module")
def model():
    return _build()


# ---------------------------------------------------------------------------------------------- config


def test_config_json_round_trip():
    for config in (Token2WavConfig(), tiny_token2wav_config(n_timesteps=5, force_flush=False)):
        text = json.dumps(config.to_dict())
        again = Token2WavConfig.from_dict(json.loads(text))
        assert again == config
        assert isinstance(again.hift.resblock_dilation_sizes[0], tuple)
    assert Token2WavConfig().n_timesteps == 10 and Token2WavConfig().samples_per_code == SAMPLES_PER_CODE
    assert tiny_token2wav_config().samples_per_code == SAMPLES_PER_CODE and Token2WavConfig().sample_rate == 24000


def test_config_errors_name_the_problem():
    with pytest.raises(Token2WavConfigError, match="unknown Token2WavConfig keys"):
        Token2WavConfig.from_dict({"n_steps": 3})
    with pytest.raises(Token2WavConfigError, match="unknown hift keys"):
        Token2WavConfig.from_dict({"hift": {"channels": 3}})
    with pytest.raises(Token2WavConfigError, match="hift.in_channels"):
        tiny_token2wav_config(hift=tiny_hift_config(in_channels=64))
    with pytest.raises(Token2WavConfigError, match="n_timesteps"):
        tiny_token2wav_config(n_timesteps=0)
    with pytest.raises(Token2WavConfigError, match="force_flush_min_tokens"):
        tiny_token2wav_config(force_flush_min_tokens=3)


# ---------------------------------------------------------------------------------------------- names


def _official_shapes(shared_dir) -> dict:
    shapes = {}
    for line in (shared_dir / "reference" / "token2wav_state_dict.tsv").read_text().splitlines():
        name, shape, _ = line.split("\t")
        shapes[name] = tuple(json.loads(shape))
    return shapes


def test_full_size_state_dict_matches_official_names(shared_dir):
    official = _official_shapes(shared_dir)
    with torch.device("meta"):
        full = MiniCPMOToken2Wav(Token2WavConfig())
        bare = MiniCPMOToken2Wav(Token2WavConfig(voice_encoders=False))
    shapes = {name: tuple(t.shape) for name, t in full.state_dict().items()}
    assert {k: v for k, v in shapes.items() if k.startswith(MiniCPMOToken2Wav.official_prefixes)} == official
    extra = {k.split(".")[0] for k in shapes if not k.startswith(MiniCPMOToken2Wav.official_prefixes)}
    assert extra == {"campplus", "speech_tokenizer"}
    assert {name: tuple(t.shape) for name, t in bare.state_dict().items()} == official
    assert isinstance(full.flow.rand_noise, torch.Tensor) and full.hift_original.config.samples_per_frame == 480


# ---------------------------------------------------------------------------------------------- voice + offline


def test_prepare_voice_and_offline_synthesis(model):
    t = np.arange(int(1.5 * 22050)) / 22050
    wav = (0.3 * np.sin(2 * np.pi * 180 * t) * (1 + 0.5 * np.sin(2 * np.pi * 3 * t))).astype(np.float32)
    voice = model.prepare_voice(wav, 22050)
    n_prompt = voice.num_tokens
    assert n_prompt == 38  # 1.5 s -> 24000 samples at 16 kHz -> (150 + 3) // 4 codes
    assert voice.prompt_tokens.dtype == torch.long and voice.prompt_tokens.shape == (1, n_prompt)
    assert voice.prompt_mel.shape == (1, 2 * n_prompt, 80) and voice.speaker_embedding.shape == (1, 192)
    assert torch.isfinite(voice.prompt_mel).all() and torch.isfinite(voice.speaker_embedding).all()

    codes = _codes(25)
    wav_out = model.synthesize(codes, voice, generator=torch.Generator().manual_seed(0))
    assert wav_out.shape == (25 * SAMPLES_PER_CODE,) and wav_out.dtype == torch.float32
    assert torch.isfinite(wav_out).all() and wav_out.abs().max() <= 0.99
    again = model.synthesize(codes, voice, generator=torch.Generator().manual_seed(0))
    assert torch.equal(wav_out, again)
    assert model.synthesize(codes[:7], voice, n_timesteps=5).shape == (7 * SAMPLES_PER_CODE,)


@pytest.mark.parametrize(
    "wav, rate, error, match",
    [
        (np.zeros((2, 16000), np.float32), 16000, InvalidAudioError, "mono"),
        (np.zeros(0, np.float32), 16000, InvalidAudioError, "empty"),
        (np.full(16000, np.nan, np.float32), 16000, InvalidAudioError, "NaN"),
        (np.ones(800, np.float32) * 0.1, 16000, InvalidAudioError, "too short"),
        (np.ones(16000 * 31, np.float32) * 0.1, 16000, InvalidAudioError, "too long"),
        (np.zeros(16000, np.float32), 16000, InvalidAudioError, "silence"),
        (np.ones(16000, np.float32) * 0.1, 0, InvalidAudioError, "sample_rate"),
        (np.ones(16000, np.uint8), 16000, InvalidAudioError, "int16"),
    ],
)
def test_prepare_voice_rejects_bad_audio(model, wav, rate, error, match):
    with pytest.raises(error, match=match):
        model.prepare_voice(wav, rate)


def test_bad_codes_and_states_raise_typed_errors(model):
    voice = _voice(model.config)
    cases = [
        (lambda: model.synthesize(torch.tensor([], dtype=torch.long), voice), "empty"),
        (lambda: model.synthesize(torch.rand(5), voice), "integer"),
        (lambda: model.synthesize(torch.zeros(1, 5, dtype=torch.long), voice), "1-D"),
        (lambda: model.synthesize(torch.tensor([6561]), voice), r"\[0, 6561\)"),
        (lambda: model.synthesize(_codes(5), voice="alice"), "VoicePrompt"),
        (lambda: model.synthesize(_codes(5), voice, n_timesteps=0), "n_timesteps"),
        (lambda: model.push(_codes(5), state=None), "start_stream"),
        (lambda: model.start_stream(voice, force_flush="yes"), "force_flush"),
    ]
    for call, match in cases:
        with pytest.raises(Token2WavInputError, match=match):
            call()
    bare = MiniCPMOToken2Wav(tiny_token2wav_config(voice_encoders=False))
    with pytest.raises(Token2WavInputError, match="voice_encoders=False"):
        bare.prepare_voice(np.ones(16000, np.float32), 16000)
    assert issubclass(SpeechTokenizerInputError, ValueError)  # the tokenizer's own errors stay ValueErrors


# ---------------------------------------------------------------------------------------------- streaming


def _crossfade_gain(total_samples: int, chunk_ends_frames) -> torch.Tensor:
    """Where the 1.0.5 vocoder stream cross-fades, the output is ~(rising + falling Hamming half) x offline."""
    gain = torch.ones(total_samples)
    for end in chunk_ends_frames:
        start, stop = (end - OVERLAP_FRAMES) * 480, end * 480
        window = torch.hamming_window(2 * (stop - start), periodic=False)
        gain[start:stop] = window[: stop - start] + window[stop - start :]
    return gain


def test_stream_equals_offline_with_the_same_chunked_attention(deterministic):
    """72 codes in units of 25 + flush: windows of 28/25 codes over [4218]*3 + codes, i.e. flow blocks of 25.

    Measured (float32, CPU): vs the offline block-causal mel through the same vocoder stream, max 1e-7
    (tolerance 1e-5); vs the offline waveform, 4e-8 outside the two 8-frame cross-fades (tolerance 1e-5) and
    2 % of the peak inside them (tolerance 5 %; edge effects of re-vocoding 8 frames, as in the vocoder's
    own test); relative L2 2.6 % (tolerance 5 %).
    """
    model, config = deterministic, deterministic.config
    voice, codes = _voice(config), _codes(72)
    pieces, state = _stream(model, codes, voice)
    streamed = torch.cat(pieces)
    buffer = torch.cat([torch.full((3,), SILENCE), codes])
    assert streamed.shape == (buffer.numel() * SAMPLES_PER_CODE,)
    assert [p.numel() for p in pieces] == [50 * 480 - 3840, 50 * 480, 0, 50 * 480 + 3840]
    assert not state.in_turn and state.turn == 1 and state.pending.numel() == 0 and state.flow is state.base

    offline_mel = model.flow.inference(
        buffer[None], voice.prompt_tokens, voice.prompt_mel, voice.speaker_embedding, chunk_size=25
    )
    hift_state, restream = model.hift_original.new_stream_state(), []
    for start, last in ((0, False), (50, False), (100, True)):
        wav, hift_state = model.hift_original.stream_step(offline_mel[..., start : start + 50], hift_state, last)
        restream.append(wav[0])
    torch.testing.assert_close(streamed, torch.cat(restream), rtol=0, atol=1e-5)

    offline = model.synthesize(buffer, voice, chunk_size=25)
    gain = _crossfade_gain(offline.numel(), (50, 100))
    residual = (streamed - gain * offline).abs()
    in_fade = gain != 1
    assert residual[~in_fade].max() < 1e-5
    assert residual[in_fade].max() < 0.05 * offline.abs().max()
    assert (streamed - offline).norm() / offline.norm() < 0.05


def test_stream_has_no_clicks_at_the_seams(model):
    """Noisy source, official settings. Every 25 codes (24000 samples) is a chunk seam, and the emitted
    pieces meet 3840 samples earlier. Measured: the largest jump within 2 samples of a seam is 0.94-0.99x
    the 99th percentile of all jumps (the overall maximum is 1.03x); a click would stand far above it."""
    voice, codes = _voice(model.config), _codes(122, seed=5)
    pieces, _ = _stream(model, codes, voice)
    streamed = torch.cat(pieces)
    assert streamed.shape == ((122 + 3) * SAMPLES_PER_CODE,) and torch.isfinite(streamed).all()
    jumps = streamed.diff().abs()
    typical = torch.quantile(jumps, 0.99)
    chunk_seams = [k * 25 * SAMPLES_PER_CODE for k in range(1, 5)]
    emit_seams = np.cumsum([p.numel() for p in pieces])[:-1].tolist()
    for seam in chunk_seams + [s for s in emit_seams if 0 < s < streamed.numel()]:
        around = jumps[seam - 3 : seam + 2].max()
        assert around <= 1.25 * typical, (seam, float(around), float(typical))
    assert streamed.abs().max() <= 0.99


def test_push_is_pure_and_any_unit_size_works(model):
    voice, codes = _voice(model.config), _codes(40)
    state = model.start_stream(voice, seed=7)
    empty, same = model.push(codes[:0], state)
    assert empty.numel() == 0 and same.pending.numel() == 0 and not same.in_turn

    wav_a, next_a = model.push(codes[:30], state)
    wav_b, next_b = model.push(codes[:30], state)
    assert torch.equal(wav_a, wav_b) and torch.equal(next_a.pending, next_b.pending)
    assert state.pending.numel() == 0 and not state.in_turn and state.flow is state.base

    total, state = 0, model.start_stream(voice, seed=7)
    for size in (1, 2, 0, 13, 24):
        wav, state = model.push(codes[:size], state)
        total += wav.numel()
    wav, state = model.flush(state)
    assert total + wav.numel() == (40 + 3) * SAMPLES_PER_CODE
    assert model.flush(state)[0].numel() == 0  # nothing buffered: an empty turn emits nothing


def test_force_flush_streams_small_units_early(model):
    """Units of 10 codes: with force_flush each unit is vocoded at once (all but 3 lookahead codes);
    without it nothing is emitted until 28 codes are buffered. Both give the same total at the flush."""
    voice, codes = _voice(model.config), _codes(30)
    eager, _ = _stream(model, codes, voice, unit=10, force_flush=True)
    lazy, _ = _stream(model, codes, voice, unit=10, force_flush=False)
    # buffer 13 -> 10 new codes = 20 frames, minus the vocoder's 3840 held back; then 20 frames per unit
    assert [p.numel() for p in eager] == [20 * 480 - 3840, 20 * 480, 20 * 480, 3 * 960 + 3840]
    assert [p.numel() for p in lazy] == [0, 0, 25 * 960 - 3840, 8 * 960 + 3840]
    assert sum(p.numel() for p in eager) == sum(p.numel() for p in lazy) == 33 * SAMPLES_PER_CODE


def test_each_turn_restarts_from_the_prompt(deterministic):
    model = deterministic
    voice, codes = _voice(model.config), _codes(30)
    state = model.start_stream(voice)
    first, state = model.push(codes, state, end_of_turn=True)
    assert isinstance(state, Token2WavStreamState) and state.turn == 1 and state.samples_emitted == 0
    second, state = model.push(codes, state, end_of_turn=True)
    assert first.shape == (33 * SAMPLES_PER_CODE,)
    torch.testing.assert_close(first, second, rtol=0, atol=1e-6)
    offline = model.synthesize(torch.cat([torch.full((3,), SILENCE), codes]), voice, chunk_size=25)
    gain = _crossfade_gain(offline.numel(), (50,))
    assert (first - gain * offline)[gain == 1].abs().max() < 1e-5


# ---------------------------------------------------------------------------------------------- meta-device init


class _HostConfig(PretrainedConfig):
    model_type = "token2wav_test_host"


class _Host(PreTrainedModel):
    """Stands in for the lead's model: default init plus the token2wav hook on every module."""

    config_class = _HostConfig

    def __init__(self, config):
        super().__init__(config)
        self.token2wav = MiniCPMOToken2Wav(tiny_token2wav_config())
        self.post_init()

    def _init_weights(self, module):
        super()._init_weights(module)
        init_token2wav_weights(module, std=0.02)


def test_meta_device_build_is_fully_reinitialised():
    torch.manual_seed(0)
    reference = MiniCPMOToken2Wav(tiny_token2wav_config())
    with torch.device("meta"):
        host = _Host(_HostConfig())
    host.to_empty(device="cpu")
    with torch.no_grad():  # make every uninitialised value visible
        for tensor in [*host.parameters(), *host.buffers()]:
            tensor.fill_(float("nan") if tensor.is_floating_point() else 12345)
    host.initialize_weights()
    t2w = host.token2wav

    for name, tensor in [*t2w.named_parameters(), *t2w.named_buffers()]:
        assert torch.isfinite(tensor.float()).all(), name
    ref_buffers = dict(reference.named_buffers())
    for name, buffer in t2w.named_buffers():
        assert torch.equal(buffer, ref_buffers[name]), name  # noise, FSQ tables, BatchNorm stats
    for module in t2w.modules():
        if isinstance(module, Snake):
            assert torch.equal(module.alpha, torch.ones_like(module.alpha))
        if isinstance(module, ParametrizationList):
            norms = module.original1.flatten(1).norm(dim=1)
            torch.testing.assert_close(module.original0.flatten(), norms)
    voice = _voice(t2w.config)
    assert torch.isfinite(t2w.synthesize(_codes(5), voice)).all()


def test_from_pretrained_round_trip_keeps_loaded_values(tmp_path):
    """The real meta-device path: save_pretrained, then from_pretrained (meta build, load, init of the rest)."""
    torch.manual_seed(0)
    host = _Host(_HostConfig())
    with torch.no_grad():
        for module in host.modules():
            if isinstance(module, Snake):
                module.alpha.fill_(0.7)  # a loaded value the init hook (ones) must not overwrite
    host.save_pretrained(tmp_path)
    loaded = _Host.from_pretrained(tmp_path)
    original = host.state_dict()
    for name, tensor in loaded.state_dict().items():
        assert torch.equal(tensor, original[name]), name
    buffers = dict(host.named_buffers())
    for name, buffer in loaded.named_buffers():  # non-persistent ones (noise, FSQ tables) included
        assert torch.equal(buffer, buffers[name]), name
    voice, codes = _voice(host.token2wav.config), _codes(10)
    expected = host.token2wav.synthesize(codes, voice, generator=torch.Generator().manual_seed(0))
    assert torch.equal(loaded.token2wav.synthesize(codes, voice, generator=torch.Generator().manual_seed(0)), expected)


def test_init_hook_keeps_loaded_tensors():
    torch.manual_seed(0)
    model = MiniCPMOToken2Wav(tiny_token2wav_config(voice_encoders=False))
    alpha = next(m for m in model.modules() if isinstance(m, Snake)).alpha
    with torch.no_grad():
        alpha.fill_(0.5)
    alpha._is_hf_initialized = True  # what from_pretrained sets on loaded tensors
    for module in model.modules():
        init_token2wav_weights(module)
    assert torch.equal(alpha, torch.full_like(alpha, 0.5))
    assert not init_token2wav_weights(nn.Linear(2, 2))


# ---------------------------------------------------------------------------------------------- converter


def _official_style_files(tmp_path, config, old_weight_norm: bool):
    """Synthetic flow.pt / hift.pt with the official layout: unprefixed keys, optionally weight_g / weight_v."""
    torch.manual_seed(4)
    model = MiniCPMOToken2Wav(Token2WavConfig.from_dict({**config.to_dict(), "voice_encoders": False}))
    flow = {k: v.clone() for k, v in model.flow.state_dict().items()}
    hift = {}
    for key, value in model.hift_original.state_dict().items():
        if old_weight_norm:
            key = key.replace(".parametrizations.weight.original0", ".weight_g")
            key = key.replace(".parametrizations.weight.original1", ".weight_v")
        hift[key] = value.clone()
    torch.save(flow, tmp_path / "flow.pt")
    torch.save(hift, tmp_path / "hift.pt")
    return model


@pytest.mark.parametrize("old_weight_norm", [False, True])
def test_converter_writes_safetensors_that_load_strictly(tmp_path, old_weight_norm):
    config = tiny_token2wav_config()
    assets, out = tmp_path / "assets", tmp_path / "out"
    assets.mkdir()
    source = _official_style_files(assets, config, old_weight_norm)
    config_path = tmp_path / "tiny.json"
    config_path.write_text(json.dumps(config.to_dict()))
    assert main([str(assets), str(out), "--config", str(config_path)]) == 0

    saved = json.loads((out / "config.json").read_text())
    restored_config = Token2WavConfig.from_dict(saved)
    assert restored_config.voice_encoders is False and restored_config.flow == config.flow
    restored = MiniCPMOToken2Wav(restored_config)
    restored.load_state_dict(load_file(str(out / "model.safetensors")), strict=True)
    for name, tensor in source.state_dict().items():
        assert torch.equal(restored.state_dict()[name], tensor), name


def test_converter_rejects_mismatches_and_pickles(tmp_path):
    config = tiny_token2wav_config()
    _official_style_files(tmp_path, config, old_weight_norm=False)
    flow = torch.load(tmp_path / "flow.pt", weights_only=True)
    flow["encoder.extra.weight"] = torch.zeros(1)
    flow.pop("input_embedding.weight")
    torch.save(flow, tmp_path / "flow.pt")
    with pytest.raises(Token2WavConversionError, match=r"1 missing .*flow.input_embedding.weight.*1 unexpected"):
        convert_token2wav(tmp_path, tmp_path / "out", config)
    assert not (tmp_path / "out").exists()

    torch.save({"weights": _HostConfig()}, tmp_path / "flow.pt")  # an arbitrary pickled object
    with pytest.raises(Token2WavConversionError, match="weights_only"):
        convert_token2wav(tmp_path, tmp_path / "out", config)
    with pytest.raises(Token2WavConversionError, match="assets folder not found"):
        convert_token2wav(tmp_path / "nowhere", tmp_path / "out", config)
