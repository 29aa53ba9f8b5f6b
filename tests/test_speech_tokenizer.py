"""S3 speech tokenizer v2 (speech-decoder training targets): front-end, lengths, padding, FSQ, conversion."""

import math
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from minicpmo.configuration.configuration_presets import tiny_s3tokenizer_config  # noqa: E402
from minicpmo.configuration.configuration_token2wav import (  # noqa: E402
    S3TokenizerCheckpointError,
    S3TokenizerConfig,
)
from minicpmo.modeling.modeling_speech_tokenizer import (  # noqa: E402
    S3_CODEBOOK_SIZE,
    AudioDtypeError,
    AudioTooShortError,
    EmptyAudioError,
    MultiChannelAudioError,
    NonFiniteAudioError,
    S3SpeechTokenizer,
    SampleRateError,
    SpeechTokenizerAudioTooLongError,
    SpeechTokenizerInputError,
    convert_public_s3tokenizer_v2_state_dict,
    log_mel_128,
    num_s3_codes,
)


def _speechlike(num_samples: int, seed: int = 0) -> np.ndarray:
    """Noise shaped by a slow envelope plus a few harmonics, so the log-mel has structure."""
    rng = np.random.default_rng(seed)
    t = np.arange(num_samples) / 16000
    envelope = 0.5 + 0.5 * np.sin(2 * np.pi * 3.0 * t)
    voiced = sum(np.sin(2 * np.pi * f * t) / k for k, f in enumerate((180.0, 360.0, 540.0, 720.0), start=1))
    return (0.2 * envelope * voiced + 0.02 * rng.standard_normal(num_samples)).astype(np.float32)


@pytest.fixture(scope="module")
def tokenizer():
    torch.manual_seed(0)
    model = S3SpeechTokenizer(tiny_s3tokenizer_config()).eval()
    # Random init puts most FSQ inputs near 0; widen project_in so the test codes use many digits.
    with torch.no_grad():
        model.quantizer.project_in.weight.mul_(20.0)
    return model


def _official_fsq_indices(projected: torch.Tensor) -> torch.Tensor:
    """The published v2 equations: tanh, * 0.999 (float32), round, + 1, base-3 with dim 0 least significant."""
    digits = (projected.float().tanh() * 0.9990000128746033).round() + 1
    powers = 3 ** torch.arange(projected.shape[-1], dtype=torch.float32)
    return (digits * powers).sum(-1).long()


def _reference_features(model: S3SpeechTokenizer, mel: torch.Tensor) -> torch.Tensor:
    """Unbatched restatement of the published v2 encoder: q and k both scaled by d^-1/4, rotary via explicit
    cos/sin over (t * theta^(-2i/d)) repeated on both halves, FSMN = zero-padded depthwise conv + value."""
    cfg = model.config
    enc = model.encoder
    x = F.gelu(F.conv1d(mel[None], enc.conv1.weight, enc.conv1.bias, stride=2, padding=1))
    x = F.gelu(F.conv1d(x, enc.conv2.weight, enc.conv2.bias, stride=2, padding=1))[0].T  # [n, C]
    n, d, h = x.shape[0], cfg.head_dim, cfg.n_head
    freqs = torch.arange(n).float()[:, None] / (cfg.rope_theta ** (torch.arange(0, d, 2).float() / d))[None]
    cos, sin = torch.cat([freqs.cos()] * 2, -1), torch.cat([freqs.sin()] * 2, -1)  # [n, d]

    def rotate(t):  # t: [n, h, d]
        left, right = t[..., : d // 2], t[..., d // 2 :]
        return t * cos[:, None] + torch.cat([-right, left], -1) * sin[:, None]

    for block in enc.blocks:
        a = block.attn
        y = F.layer_norm(x, (cfg.n_state,), block.attn_ln.weight, block.attn_ln.bias, eps=1e-6)
        q = rotate((y @ a.query.weight.T + a.query.bias).view(n, h, d)) * d**-0.25
        k = rotate((y @ a.key.weight.T).view(n, h, d)) * d**-0.25
        v = y @ a.value.weight.T + a.value.bias
        weights = torch.einsum("qhd,khd->hqk", q, k).softmax(-1)
        attended = torch.einsum("hqk,khd->qhd", weights, v.view(n, h, d)).reshape(n, cfg.n_state)
        pad = (cfg.fsmn_kernel_size - 1) // 2
        memory = F.conv1d(F.pad(v.T[None], (pad, pad)), a.fsmn_block.weight, groups=cfg.n_state)[0].T + v
        x = x + attended @ a.out.weight.T + a.out.bias + memory
        y = F.layer_norm(x, (cfg.n_state,), block.mlp_ln.weight, block.mlp_ln.bias, eps=1e-5)
        x = x + block.mlp(y)
    return x


# ------------------------------------------------------------------------------------------ config


def test_default_config_is_the_public_v2_tokenizer():
    cfg = S3TokenizerConfig()
    assert (cfg.n_mels, cfg.n_audio_ctx, cfg.n_state, cfg.n_head, cfg.n_layer) == (128, 1500, 1280, 20, 6)
    assert cfg.head_dim == 64 and cfg.fsmn_kernel_size == 31 and cfg.fsq_levels == [3] * 8
    assert cfg.codebook_size == S3_CODEBOOK_SIZE == 6561
    assert cfg.max_mel_frames == 3000  # 30 s
    tiny = tiny_s3tokenizer_config()
    assert tiny.n_mels == 128 and tiny.fsq_levels == [3] * 8 and tiny.n_state < 100


def test_full_size_module_has_the_public_parameter_layout():
    model = S3SpeechTokenizer(S3TokenizerConfig(n_layer=1))
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert shapes["encoder.conv1.weight"] == (1280, 128, 3)
    assert shapes["encoder.conv2.weight"] == (1280, 1280, 3)
    assert shapes["encoder.blocks.0.attn.fsmn_block.weight"] == (1280, 1, 31)
    assert shapes["encoder.blocks.0.mlp.0.weight"] == (5120, 1280)
    assert "encoder.blocks.0.attn.key.bias" not in shapes
    assert shapes["quantizer.project_in.weight"] == (8, 1280)
    assert shapes["quantizer.project_out.weight"] == (1280, 8)
    # 16 tensors per block + 4 conv + 2 project_in (= the public 102 for 6 blocks) + 2 project_out
    assert len(shapes) == 16 + 4 + 2 + 2


def test_missing_fsq_library_fails_clearly_at_construction(monkeypatch):
    import minicpmo.modeling.modeling_speech_tokenizer as module

    monkeypatch.setattr(module, "_FSQ", None)
    with pytest.raises(ImportError, match="vector-quantize-pytorch"):
        S3SpeechTokenizer(tiny_s3tokenizer_config())


def test_config_rejects_inconsistent_values():
    with pytest.raises(ValueError, match="divisible"):
        S3TokenizerConfig(n_state=30, n_head=4)
    with pytest.raises(ValueError, match="front-end is fixed"):
        S3TokenizerConfig(n_mels=80)


# ------------------------------------------------------------------------------------------ front-end


def test_log_mel_matches_the_whisper_128_bin_front_end():
    from transformers import WhisperFeatureExtractor

    wav = _speechlike(16000 + 37)
    mel = log_mel_128(wav)
    assert mel.shape == (128, (16000 + 37) // 160) and mel.dtype == torch.float32
    whisper = WhisperFeatureExtractor(feature_size=128, sampling_rate=16000, hop_length=160, n_fft=400)
    expected = torch.from_numpy(whisper._torch_extract_fbank_features(wav))
    torch.testing.assert_close(mel, expected, atol=1e-4, rtol=1e-4)
    # the Whisper normalisation: floor at global max - 8 in log10 units, then (x + 4) / 4
    assert mel.max() - mel.min() <= 2.0 + 1e-5


def test_log_mel_accepts_int16_and_row_vectors():
    wav = _speechlike(4000)
    as_int16 = np.round(wav * 32767).astype(np.int16)
    torch.testing.assert_close(log_mel_128(as_int16), log_mel_128(as_int16.astype(np.float32) / 32768.0))
    torch.testing.assert_close(log_mel_128(torch.from_numpy(wav)[None]), log_mel_128(wav))


# ------------------------------------------------------------------------------------------ lengths and codes


def test_length_formula():
    assert num_s3_codes(16000) == 25
    assert num_s3_codes(16000 * 3) == 75
    assert num_s3_codes(16159) == 25 and num_s3_codes(16160) == 26
    for seconds in (0.04, 0.5, 1.0, 2.2, 7.0):
        samples = round(seconds * 16000)
        assert num_s3_codes(samples) == math.ceil(round(seconds * 25, 6))
    for samples in (201, 399, 640, 641, 12345):
        assert num_s3_codes(samples) == math.ceil(math.ceil((samples // 160) / 2) / 2)


def test_one_second_gives_25_codes_in_range(tokenizer):
    codes = tokenizer.encode(_speechlike(16000))
    assert codes.dtype == torch.int64 and codes.shape == (25,)
    assert int(codes.min()) >= 0 and int(codes.max()) < 6561
    assert len(torch.unique(codes)) > 3


@pytest.mark.parametrize("num_samples", [201, 640, 1000, 8000, 12345, 40000])
def test_encode_length_follows_the_formula(tokenizer, num_samples):
    codes = tokenizer.encode(_speechlike(num_samples, seed=num_samples))
    assert codes.shape == (num_s3_codes(num_samples),)
    assert ((codes >= 0) & (codes < 6561)).all()


def test_encode_is_deterministic(tokenizer):
    wav = _speechlike(24000, seed=3)
    first = tokenizer.encode(wav)
    assert torch.equal(first, tokenizer.encode(wav))
    assert torch.equal(first, tokenizer.encode(torch.from_numpy(wav)))
    torch.manual_seed(0)
    twin = S3SpeechTokenizer(tiny_s3tokenizer_config()).eval()
    twin.load_state_dict(tokenizer.state_dict())
    assert torch.equal(first, twin.encode(wav))


def test_batched_equals_single(tokenizer):
    wavs = [_speechlike(n, seed=n) for n in (16000, 5000, 11111, 201, 16000 + 800)]
    codes, lengths = tokenizer.encode_batch(wavs)
    assert codes.shape == (5, int(lengths.max())) and lengths.tolist() == [num_s3_codes(len(w)) for w in wavs]
    for row, wav, length in zip(codes, wavs, lengths):
        assert torch.equal(row[:length], tokenizer.encode(wav))
        assert (row[length:] == -100).all()
    padded, _ = tokenizer.encode_batch(wavs, padding_value=S3_CODEBOOK_SIZE)
    assert (padded[1, lengths[1] :] == S3_CODEBOOK_SIZE).all()


def test_padding_does_not_leak_into_features(tokenizer):
    # 11111 samples: 69 mel frames -> 35 after conv1 (odd), so conv2's last real output reads one padded frame
    wavs = [_speechlike(n, seed=n) for n in (16000, 11111, 5000, 201)]
    mels = [log_mel_128(w) for w in wavs]
    batch = torch.nn.utils.rnn.pad_sequence([m.T for m in mels], batch_first=True).transpose(1, 2)
    with torch.no_grad():
        together = tokenizer(batch, torch.tensor([m.shape[-1] for m in mels]))
        for i, mel in enumerate(mels):
            alone = tokenizer(mel[None])
            n = int(together.lengths[i])
            assert n == alone.features.shape[1]
            torch.testing.assert_close(together.features[i, :n], alone.features[0], atol=1e-5, rtol=1e-5)
            assert (together.features[i, n:] == 0).all()


def test_encoder_matches_the_published_equations(tokenizer):
    mel = log_mel_128(_speechlike(9000, seed=5))
    with torch.no_grad():
        out = tokenizer(mel[None])
        expected = _reference_features(tokenizer, mel)
        torch.testing.assert_close(out.features[0], expected, atol=1e-4, rtol=1e-4)
        projected = tokenizer.quantizer.project_in(out.features[0])
    assert torch.equal(out.codes[0], _official_fsq_indices(projected))


# ------------------------------------------------------------------------------------------ FSQ


def test_fsq_indices_codes_indices_round_trip(tokenizer):
    fsq = tokenizer.quantizer
    indices = torch.arange(S3_CODEBOOK_SIZE)
    digits = fsq.implicit_codebook[indices]  # [6561, 8] in {-1, 0, 1}
    assert set(digits.unique().tolist()) == {-1.0, 0.0, 1.0}
    assert torch.equal(fsq.codes_to_indices(digits).long(), indices)
    base3 = torch.stack([(indices // 3**i) % 3 for i in range(8)], -1)  # dim 0 least significant
    assert torch.equal((digits + 1).long(), base3)
    assert fsq.implicit_codebook[4218].tolist() == (base3[4218] - 1).float().tolist()
    # indices -> features (project_out) -> quantiser -> indices, once project_out inverts project_in
    # (which the public-checkpoint converter guarantees)
    model = S3SpeechTokenizer.from_public_state_dict(_public_state_dict(tokenizer.config), tokenizer.config)
    with torch.no_grad():
        features = model.codes_to_features(indices[None])
        assert features.shape == (1, S3_CODEBOOK_SIZE, tokenizer.config.n_state)
        _, back = model.quantizer(features)
    assert torch.equal(back[0].long(), indices)


def test_fsq_uses_the_official_rounding_thresholds(tokenizer):
    fsq = tokenizer.quantizer
    # tanh(z) = 0.5 exactly: the official graph (x 0.999) rounds to digit 0; stock FSQ (x 1.001) would give 1
    boundary = torch.full((1, 1, 8), math.atanh(0.5))
    projected = torch.randn(2, 50, 8) * 2
    for z in (boundary, projected):
        digits = fsq.quantize(z.reshape(*z.shape[:2], 1, 8))
        assert torch.equal(fsq.codes_to_indices(digits)[..., 0].long(), _official_fsq_indices(z))
    assert _official_fsq_indices(boundary).item() == sum(3**i for i in range(8))  # all digits 0 -> +1


def test_codes_to_features_rejects_out_of_range_codes(tokenizer):
    with pytest.raises(SpeechTokenizerInputError, match="6561"):
        tokenizer.codes_to_features(torch.tensor([6561]))


# ------------------------------------------------------------------------------------------ real files


def test_reference_wavs_give_codes_of_the_right_length(tokenizer, ref_audio_paths):
    sf = pytest.importorskip("soundfile")
    taf = pytest.importorskip("torchaudio.functional")
    if not ref_audio_paths:
        pytest.skip("no reference wavs")
    for path in ref_audio_paths:
        data, rate = sf.read(str(path), dtype="float32", always_2d=True)
        wav = torch.from_numpy(data.mean(axis=1))
        wav16k = taf.resample(wav, rate, 16000) if rate != 16000 else wav
        codes = tokenizer.encode(wav16k)
        assert codes.shape == (num_s3_codes(wav16k.numel()),)
        assert abs(codes.numel() - 25 * data.shape[0] / rate) <= 1.0
        assert ((codes >= 0) & (codes < 6561)).all()
        if rate != 16000:
            with pytest.raises(SampleRateError, match=str(rate)):
                tokenizer.encode(wav, sample_rate=rate)


# ------------------------------------------------------------------------------------------ typed errors


@pytest.mark.parametrize(
    "wav, kwargs, error, message",
    [
        (np.zeros(16000, np.float32), {"sample_rate": 24000}, SampleRateError, "16000 Hz"),
        (np.zeros(0, np.float32), {}, EmptyAudioError, "empty"),
        (np.array([0.1] * 1000 + [np.nan], np.float32), {}, NonFiniteAudioError, "NaN"),
        (np.zeros((2, 16000), np.float32), {}, MultiChannelAudioError, "mono"),
        (np.zeros((16000, 2), np.float32), {}, MultiChannelAudioError, "mono"),
        (np.zeros(100, np.float32), {}, AudioTooShortError, "at least 201"),
        (np.zeros(16000, np.uint8), {}, AudioDtypeError, "int16"),
        ("audio.wav", {}, AudioDtypeError, "numpy array or torch tensor"),
    ],
)
def test_bad_audio_raises_typed_errors(tokenizer, wav, kwargs, error, message):
    with pytest.raises(error, match=message):
        tokenizer.encode(wav, **kwargs)
    assert issubclass(error, (ValueError, TypeError))


def test_batch_and_mel_errors(tokenizer):
    with pytest.raises(MultiChannelAudioError):
        tokenizer.encode_batch([_speechlike(4000), np.zeros((2, 4000), np.float32)])
    with pytest.raises(SpeechTokenizerInputError, match="non-empty list"):
        tokenizer.encode_batch([])
    with pytest.raises(SpeechTokenizerAudioTooLongError, match="30 s"):
        tokenizer(torch.zeros(1, 128, 3001))
    with pytest.raises(SpeechTokenizerInputError, match="mel_lengths"):
        tokenizer(torch.zeros(2, 128, 10), torch.tensor([10, 11]))
    with pytest.raises(SpeechTokenizerInputError, match="128"):
        tokenizer(torch.zeros(1, 80, 10))


# ------------------------------------------------------------------------------------------ conversion


def _public_state_dict(config: S3TokenizerConfig, seed: int = 7) -> dict:
    """Random tensors under the names and shapes that s3tokenizer's onnx2torch writes for v2."""
    gen = torch.Generator().manual_seed(seed)
    c = config.n_state

    def rand(*shape):
        return torch.randn(*shape, generator=gen) * 0.2

    sd = {
        "encoder.conv1.weight": rand(c, 128, 3),
        "encoder.conv1.bias": rand(c),
        "encoder.conv2.weight": rand(c, c, 3),
        "encoder.conv2.bias": rand(c),
    }
    for i in range(config.n_layer):
        p = f"encoder.blocks.{i}."
        for name in ("query", "value", "out"):
            sd[p + f"attn.{name}.weight"], sd[p + f"attn.{name}.bias"] = rand(c, c), rand(c)
        sd[p + "attn.key.weight"] = rand(c, c)
        sd[p + "attn.fsmn_block.weight"] = rand(c, 1, config.fsmn_kernel_size)
        for ln in ("attn_ln", "mlp_ln"):
            sd[p + f"{ln}.weight"], sd[p + f"{ln}.bias"] = 1 + rand(c), rand(c)
        sd[p + "mlp.0.weight"], sd[p + "mlp.0.bias"] = rand(4 * c, c), rand(4 * c)
        sd[p + "mlp.2.weight"], sd[p + "mlp.2.bias"] = rand(c, 4 * c), rand(c)
    sd["quantizer._codebook.project_down.weight"] = rand(8, c) * 10
    sd["quantizer._codebook.project_down.bias"] = rand(8)
    return sd


def test_public_state_dict_round_trips_with_strict_loading():
    config = tiny_s3tokenizer_config()
    public = _public_state_dict(config)
    assert len(public) == 4 + 16 * config.n_layer + 2
    inferred = S3TokenizerConfig.from_public_state_dict(public, n_head=config.n_head)
    assert (inferred.n_state, inferred.n_layer, inferred.fsmn_kernel_size) == (32, 2, 31)
    model = S3SpeechTokenizer.from_public_state_dict(public, config)  # strict=True inside
    own = model.state_dict()
    for name, tensor in public.items():
        target = name.replace("quantizer._codebook.project_down", "quantizer.project_in")
        assert torch.equal(own[target], tensor), name
    # project_out is the least-squares inverse: project_in(project_out(z)) == z
    z = torch.randn(5, 8)
    with torch.no_grad():
        torch.testing.assert_close(model.quantizer.project_in(model.quantizer.project_out(z)), z, atol=1e-4, rtol=1e-4)
        mel = log_mel_128(_speechlike(6000, seed=9))
        out = model(mel[None])
        expected = _reference_features(model, mel)
        torch.testing.assert_close(out.features[0], expected, atol=1e-3, rtol=1e-3)
    projected = torch.nn.functional.linear(out.features[0], public["quantizer._codebook.project_down.weight"],
                                           public["quantizer._codebook.project_down.bias"])
    assert torch.equal(out.codes[0], _official_fsq_indices(projected))


def test_converter_rejects_foreign_keys():
    public = _public_state_dict(tiny_s3tokenizer_config())
    with pytest.raises(S3TokenizerCheckpointError, match="positional_embedding"):
        convert_public_s3tokenizer_v2_state_dict({**public, "encoder.positional_embedding": torch.zeros(3)})
    public.pop("quantizer._codebook.project_down.bias")
    with pytest.raises(S3TokenizerCheckpointError, match="project_down"):
        convert_public_s3tokenizer_v2_state_dict(public)
    with pytest.raises(S3TokenizerCheckpointError, match="missing"):
        S3TokenizerConfig.from_public_state_dict({})


def test_to_empty_then_recreate_buffers_restores_the_quantiser(tokenizer):
    wav = _speechlike(8000, seed=11)
    expected = tokenizer.encode(wav)
    clone = S3SpeechTokenizer(tiny_s3tokenizer_config()).to_empty(device="cpu")
    clone.load_state_dict(tokenizer.state_dict())
    clone.recreate_buffers()
    assert torch.equal(clone.quantizer.implicit_codebook, tokenizer.quantizer.implicit_codebook)
    assert torch.equal(clone.eval().encode(wav), expected)


# ------------------------------------------------------------------------------------------ training


def test_straight_through_training_reduces_reconstruction_loss():
    torch.manual_seed(1)
    model = S3SpeechTokenizer(tiny_s3tokenizer_config()).train()
    mels = [log_mel_128(_speechlike(n, seed=n)) for n in (6000, 4000)]
    batch = torch.nn.utils.rnn.pad_sequence([m.T for m in mels], batch_first=True).transpose(1, 2)
    lengths = torch.tensor([m.shape[-1] for m in mels])
    with torch.no_grad():  # a fixed target: the initial pre-quantisation features (distillation-style)
        first = model(batch, lengths)
    target, valid = first.features, (first.codes >= 0)[..., None].float()
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)

    losses = []
    for step in range(10):
        out = model(batch, lengths)
        loss = (((out.quantized - target) ** 2) * valid).sum() / valid.sum()
        optimizer.zero_grad()
        loss.backward()
        if step == 0:
            # gradients cross the rounding (straight-through) into the encoder and both projections
            for name in ("encoder.conv1.weight", "encoder.blocks.0.attn.fsmn_block.weight",
                         "quantizer.project_in.weight", "quantizer.project_out.weight"):
                grad = model.get_parameter(name).grad
                assert grad is not None and grad.abs().sum() > 0, name
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0], losses
