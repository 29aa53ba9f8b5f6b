"""Token2wav flow (conformer encoder + DiT + CFG Euler ODE): shapes, official names, sampling, streaming."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import json  # noqa: E402
import math  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

from minicpmo.configuration.configuration_presets import tiny_flow_config  # noqa: E402
from minicpmo.configuration.configuration_token2wav import FlowConfig, FlowConfigError  # noqa: E402
from minicpmo.modeling.modeling_flow import (  # noqa: E402
    FlowDecoder,
    FlowInputError,
    FlowStreamState,
    cosine_time_schedule,
    make_flow_noise,
)

PROMPT_TOKENS = 6
STREAM_TOLERANCE = 1e-4  # float32; observed differences are ~1e-6


@pytest.fixture(scope="module")
def config():
    return tiny_flow_config()


@pytest.fixture(scope="module")
def model(config):
    torch.manual_seed(0)
    return FlowDecoder(config).eval()


@pytest.fixture(scope="module")
def voice(config):
    generator = torch.Generator().manual_seed(1)
    prompt_tokens = torch.randint(0, config.vocab_size, (1, PROMPT_TOKENS), generator=generator)
    prompt_mel = torch.randn(1, 2 * PROMPT_TOKENS, config.output_size, generator=generator)
    speaker = torch.randn(1, config.spk_embed_dim, generator=generator)
    return prompt_tokens, prompt_mel, speaker


def random_tokens(config, length, seed=2):
    return torch.randint(0, config.vocab_size, (1, length), generator=torch.Generator().manual_seed(seed))


def run_stream(model, tokens, voice, new_per_chunk, n_timesteps=None):
    """Feed ``tokens`` as (new + 3 lookahead) windows with stride ``new_per_chunk``; the rest as last chunk."""
    prompt_tokens, prompt_mel, speaker = voice
    lookahead = model.config.pre_lookahead_len
    state = model.prepare_stream(
        prompt_tokens, prompt_mel, speaker, n_timesteps=n_timesteps, lookahead_tokens=tokens[:, :lookahead]
    )
    mels, start = [], 0
    while tokens.shape[1] - start >= new_per_chunk + lookahead:
        mel, state = model.stream_step(tokens[:, start : start + new_per_chunk + lookahead], state)
        mels.append(mel)
        start += new_per_chunk
    mel, state = model.stream_step(tokens[:, start:], state, last_chunk=True)
    mels.append(mel)
    return torch.cat(mels, dim=-1), state


def test_offline_25_tokens_give_50_mel_frames(model, voice, config):
    mel = model.inference(random_tokens(config, 25), *voice)
    assert mel.shape == (1, config.output_size, 50)
    assert torch.isfinite(mel).all()


def test_stream_step_shapes_and_last_chunk(model, voice, config):
    tokens = random_tokens(config, 35)
    state = model.prepare_stream(*voice)
    assert state.prompt_frames == 2 * PROMPT_TOKENS and state.frame_offset == 2 * PROMPT_TOKENS
    mel, state = model.stream_step(tokens[:, :28], state)
    assert mel.shape == (1, config.output_size, 50)
    assert state.token_offset == PROMPT_TOKENS + 25 and not state.finished
    # last call: all 10 remaining tokens are new, zero lookahead frames are padded
    mel, state = model.stream_step(tokens[:, 25:], state, last_chunk=True)
    assert mel.shape == (1, config.output_size, 20)
    assert state.finished and state.frame_offset == 2 * (PROMPT_TOKENS + 35)
    with pytest.raises(FlowInputError, match="already received its last_chunk"):
        model.stream_step(tokens[:, :28], state)


def test_full_size_names_and_shapes_match_official_flow_checkpoint(shared_dir):
    official = {}
    for line in (shared_dir / "reference" / "token2wav_state_dict.tsv").read_text().splitlines():
        name, shape, _ = line.split("\t")
        if name.startswith("flow."):
            official[name[len("flow.") :]] = json.loads(shape)
    with torch.device("meta"):
        model = FlowDecoder(FlowConfig())
    ours = {name: list(tensor.shape) for name, tensor in model.state_dict().items()}
    assert ours == official
    assert sum(p.numel() for p in model.parameters()) == 155_802_352
    assert "rand_noise" not in ours  # non-persistent, re-created from the seed


def test_euler_schedule_one_batched_cfg_call_per_step(model, voice, config, monkeypatch):
    calls = []
    original = model.decoder.estimator.forward

    def recording(x, mu, t, spks, cond, attention_mask=None):
        calls.append((x.shape[0], t.clone(), mu.clone(), spks.clone(), cond.clone()))
        return original(x, mu, t, spks, cond, attention_mask)

    monkeypatch.setattr(model.decoder.estimator, "forward", recording)
    model.inference(random_tokens(config, 5), *voice, n_timesteps=5)
    assert len(calls) == 5
    expected = [1 - math.cos(k / 5 * math.pi / 2) for k in range(5)]
    for (batch, t, mu, spks, cond), t_expected in zip(calls, expected):
        assert batch == 2
        torch.testing.assert_close(t, torch.full((2,), t_expected), rtol=0, atol=1e-6)
        # branch 0 is conditional, branch 1 is the unconditional (mu = spk = cond = 0) CFG branch
        assert mu[0].abs().sum() > 0 and spks[0].abs().sum() > 0 and cond[0].abs().sum() > 0
        assert mu[1].abs().sum() == 0 and spks[1].abs().sum() == 0 and cond[1].abs().sum() == 0


def test_stream_runs_one_batched_call_per_step_per_chunk(model, voice, config, monkeypatch):
    state = model.prepare_stream(*voice, n_timesteps=3)
    calls = []
    original = model.decoder.estimator.forward_chunk

    def recording(x, mu, t, spks, cond, kv_cache=None, conv_cache=None):
        calls.append((x.shape[0], float(t[0]), None if kv_cache is None else kv_cache.shape[-2]))
        return original(x, mu, t, spks, cond, kv_cache, conv_cache)

    monkeypatch.setattr(model.decoder.estimator, "forward_chunk", recording)
    model.stream_step(random_tokens(config, 28), state)
    assert [c[0] for c in calls] == [2, 2, 2]
    assert [c[1] for c in calls] == pytest.approx([0.0, 1 - math.cos(math.pi / 6), 1 - math.cos(math.pi / 3)])
    assert [c[2] for c in calls] == [2 * PROMPT_TOKENS] * 3  # each step sees the prompt frames of that step


def test_cfg_combination_and_euler_integration(model, voice, config, monkeypatch):
    def constant_velocity(x, mu, t, spks, cond, attention_mask=None):
        return torch.cat([torch.full_like(x[:1], 2.0), torch.full_like(x[:1], -1.0)])

    monkeypatch.setattr(model.decoder.estimator, "forward", constant_velocity)
    mel = model.inference(random_tokens(config, 4), *voice, n_timesteps=7)
    noise = model.rand_noise[..., 2 * PROMPT_TOKENS : 2 * PROMPT_TOKENS + 8]
    # v = 1.7 * 2 - 0.7 * (-1) = 4.1, and the Euler step sizes sum to 1
    torch.testing.assert_close(mel, noise + 4.1, rtol=0, atol=1e-5)


def test_cosine_schedule_values():
    torch.testing.assert_close(
        cosine_time_schedule(4), torch.tensor([1 - math.cos(k / 4 * math.pi / 2) for k in range(5)]), rtol=0, atol=1e-7
    )


@pytest.mark.parametrize(("new_per_chunk", "num_tokens"), [(25, 61), (4, 15)])
def test_stream_equals_block_causal_offline(model, voice, config, new_per_chunk, num_tokens):
    tokens = random_tokens(config, num_tokens, seed=new_per_chunk)
    streamed, _ = run_stream(model, tokens, voice, new_per_chunk)
    offline = model.inference(tokens, *voice, chunk_size=new_per_chunk)
    assert streamed.shape == offline.shape == (1, config.output_size, 2 * num_tokens)
    torch.testing.assert_close(streamed, offline, rtol=0, atol=STREAM_TOLERANCE)
    # the chunk mask matters: full attention gives a different result
    full = model.inference(tokens, *voice)
    assert (full - offline).abs().max() > 100 * STREAM_TOLERANCE


def test_noise_is_deterministic_per_seed(config):
    noise = make_flow_noise(5, config.output_size, config.noise_length)
    torch.testing.assert_close(noise, make_flow_noise(5, config.output_size, config.noise_length), rtol=0, atol=0)
    assert not torch.equal(noise, make_flow_noise(6, config.output_size, config.noise_length))
    torch.manual_seed(5)  # same draw as a buffer built right after torch.manual_seed(5)
    torch.testing.assert_close(noise, torch.randn(1, config.output_size, config.noise_length), rtol=0, atol=0)

    torch.manual_seed(123)
    first = FlowDecoder(config).rand_noise.clone()
    torch.manual_seed(456)
    second = FlowDecoder(config).rand_noise
    assert torch.equal(first, second)  # independent of the global RNG
    assert first.shape == (1, config.output_size, config.noise_length)


def test_noise_recreated_after_meta_init(config):
    with torch.device("meta"):
        model = FlowDecoder(config)
    model.to_empty(device="cpu")
    model.reset_noise(9)
    assert torch.equal(model.rand_noise, make_flow_noise(9, config.output_size, config.noise_length))
    assert "rand_noise" not in model.state_dict()


def test_different_speakers_give_different_mels(model, voice, config):
    prompt_tokens, prompt_mel, speaker = voice
    tokens = random_tokens(config, 10)
    other = torch.randn(1, config.spk_embed_dim, generator=torch.Generator().manual_seed(7))
    mel_a = model.inference(tokens, prompt_tokens, prompt_mel, speaker)
    mel_b = model.inference(tokens, prompt_tokens, prompt_mel, other)
    assert (mel_a - mel_b).abs().max() > 1e-3
    # the embedding is L2-normalised first, so its scale does not matter
    scaled = model.inference(tokens, prompt_tokens, prompt_mel, 3 * speaker)
    torch.testing.assert_close(mel_a, scaled, rtol=0, atol=1e-5)


def test_cache_trimming_keeps_prompt_and_recent_frames(voice):
    torch.manual_seed(0)
    config = tiny_flow_config(stream_cache_frames=8, n_timesteps=2)
    model = FlowDecoder(config).eval()
    prompt_frames = 2 * PROMPT_TOKENS
    tokens = random_tokens(config, 40)
    state = model.prepare_stream(*voice)
    prompt_kv = state.estimator_cache.kv[..., :prompt_frames, :].clone()
    for i in range(6):
        window = tokens[:, 4 * i : 4 * i + 7]
        mel, state = model.stream_step(window, state)
        assert mel.shape[-1] == 8 and torch.isfinite(mel).all()
    # every attention cache: prompt entries + the 8 newest mel frames (4 tokens at token rate)
    assert state.estimator_cache.kv.shape[-2] == prompt_frames + 8
    torch.testing.assert_close(state.estimator_cache.kv[..., :prompt_frames, :], prompt_kv, rtol=0, atol=0)
    assert state.encoder_cache.mel_kv.shape[-2] == prompt_frames + 8
    assert state.encoder_cache.token_kv.shape[-2] == PROMPT_TOKENS + 4
    assert state.estimator_cache.conv.shape[-1] == 2
    assert state.frame_offset == prompt_frames + 6 * 8


def test_stream_step_is_pure(model, voice, config):
    state = model.prepare_stream(*voice)
    tokens = random_tokens(config, 28)
    mel_a, next_a = model.stream_step(tokens, state)
    mel_b, next_b = model.stream_step(tokens, state)
    assert torch.equal(mel_a, mel_b)
    assert state.frame_offset == 2 * PROMPT_TOKENS
    assert state.estimator_cache.kv.shape[-2] == 2 * PROMPT_TOKENS
    assert isinstance(next_a, FlowStreamState) and next_a.frame_offset == next_b.frame_offset


def test_short_prompt_mel_is_replicate_padded(model, voice, config):
    prompt_tokens, prompt_mel, speaker = voice
    tokens = random_tokens(config, 5)
    short = prompt_mel[:, :-2]
    padded = torch.cat([short, short[:, -1:].expand(1, 2, -1)], dim=1)
    torch.testing.assert_close(
        model.inference(tokens, prompt_tokens, short, speaker),
        model.inference(tokens, prompt_tokens, padded, speaker),
        rtol=0,
        atol=0,
    )


def test_bad_inputs_raise_typed_errors(model, voice, config):
    prompt_tokens, prompt_mel, speaker = voice
    tokens = random_tokens(config, 5)
    with pytest.raises(FlowInputError, match="integer token ids"):
        model.inference(tokens.float(), prompt_tokens, prompt_mel, speaker)
    with pytest.raises(FlowInputError, match="outside"):
        model.inference(tokens + config.vocab_size, prompt_tokens, prompt_mel, speaker)
    with pytest.raises(FlowInputError, match=r"shape \[1, T\]"):
        model.inference(tokens[0], prompt_tokens, prompt_mel, speaker)
    with pytest.raises(FlowInputError, match="speaker_embedding"):
        model.inference(tokens, prompt_tokens, prompt_mel, speaker[:, :5])
    with pytest.raises(FlowInputError, match="NaN"):
        model.inference(tokens, prompt_tokens, prompt_mel, speaker * float("nan"))
    with pytest.raises(FlowInputError, match="prompt_mel"):
        model.inference(tokens, prompt_tokens, prompt_mel[..., :3], speaker)
    with pytest.raises(FlowInputError, match="n_timesteps"):
        model.inference(tokens, prompt_tokens, prompt_mel, speaker, n_timesteps=0)
    with pytest.raises(FlowInputError, match="prompt_tokens"):
        model.prepare_stream(prompt_tokens[:, :0], prompt_mel, speaker)
    state = model.prepare_stream(prompt_tokens, prompt_mel, speaker)
    with pytest.raises(FlowInputError, match="lookahead"):
        model.stream_step(tokens[:, :3], state)
    with pytest.raises(FlowInputError, match="FlowStreamState"):
        model.stream_step(tokens, {"not": "a state"})
    with pytest.raises(FlowConfigError, match="dit_in_channels"):
        tiny_flow_config(dit_in_channels=65)
    assert issubclass(FlowInputError, ValueError) and issubclass(FlowConfigError, ValueError)
