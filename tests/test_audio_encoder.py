"""Audio tower: chunked offline encoding, KV-cached streaming, projector/pooling, official parameter layout."""

import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
from transformers import PreTrainedModel, WhisperConfig  # noqa: E402
from transformers.models.whisper.modeling_whisper import sinusoids  # noqa: E402

from minicpmo.modeling.modeling_audio import (  # noqa: E402
    AudioEncoderStreamState,
    AudioInputError,
    AudioStreamError,
    AudioTooLongError,
    MiniCPMOAudioEncoder,
    MiniCPMOAudioPositionEmbedding,
    MiniCPMOAudioProjector,
    audio_embeddings_from_features,
    frames_to_token_count,
    block_causal_attention_mask,
)

D_MODEL = 32
LLM_HIDDEN = 24
ATOL = 1e-4


def tiny_whisper_config(max_source_positions: int = 1500, attn: str = "sdpa") -> WhisperConfig:
    config = WhisperConfig(
        d_model=D_MODEL,
        encoder_layers=2,
        encoder_attention_heads=2,
        encoder_ffn_dim=4 * D_MODEL,  # projector input = ffn // 4 = d_model, as for Whisper-medium
        decoder_layers=1,
        decoder_attention_heads=2,
        decoder_ffn_dim=64,
        num_mel_bins=80,
        max_source_positions=max_source_positions,
        max_target_positions=64,
        vocab_size=100,
        pad_token_id=1,
        bos_token_id=2,
        eos_token_id=3,
        decoder_start_token_id=2,
    )
    config._attn_implementation = attn
    return config


def tiny_encoder(seed: int = 0, **kwargs) -> MiniCPMOAudioEncoder:
    torch.manual_seed(seed)
    return MiniCPMOAudioEncoder(tiny_whisper_config(**kwargs)).eval()


def tiny_projector(seed: int = 1) -> MiniCPMOAudioProjector:
    torch.manual_seed(seed)
    return MiniCPMOAudioProjector(D_MODEL, LLM_HIDDEN).eval()


def mel(frames: int, seed: int = 0, batch: int = 1) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 80, frames, generator=generator)


def stream(encoder, features, chunk=100, lookahead=True, state=None):
    """Feed `features` [1, 80, T] in `chunk`-frame pieces; the next piece's first frames are the lookahead."""
    outputs = []
    total = features.shape[-1]
    for start in range(0, total, chunk):
        end = min(start + chunk, total)
        ahead = features[..., end : end + 2] if lookahead and end < total else None
        hidden, state = encoder.step(features[..., start:end], state, lookahead_features=ahead)
        outputs.append(hidden)
    return torch.cat(outputs, dim=1), state


# --- shapes and counts ----------------------------------------------------------------------------------------
def test_one_second_gives_fifty_frames_and_ten_tokens():
    encoder, projector = tiny_encoder(), tiny_projector()
    with torch.no_grad():
        hidden, mask = encoder(mel(100))
        tokens = projector.project_and_pool(hidden, 5)
    assert hidden.shape == (1, 50, D_MODEL) and mask.shape == (1, 50) and bool(mask.all())
    assert tokens.shape == (1, 10, LLM_HIDDEN)
    assert frames_to_token_count(100) == 10
    assert frames_to_token_count(3000) == 300
    assert frames_to_token_count(37) == 3  # T' = 19 -> 3 full pools
    assert frames_to_token_count(8) == 0
    assert frames_to_token_count(torch.tensor([100, 101, 3000])).tolist() == [10, 10, 300]


def test_odd_lengths_and_output_mask():
    encoder = tiny_encoder()
    features = mel(101, batch=2)
    mask = torch.ones(2, 101, dtype=torch.long)
    mask[1, 60:] = 0
    with torch.no_grad():
        hidden, out_mask = encoder(features, mask)
    assert hidden.shape == (2, 51, D_MODEL)
    assert out_mask.sum(-1).tolist() == [51, 30]


def test_audio_embeddings_keep_only_real_tokens():
    encoder, projector = tiny_encoder(), tiny_projector()
    lengths = [250, 100, 37]
    features = mel(250, batch=3)
    mask = (torch.arange(250)[None, :] < torch.tensor(lengths)[:, None]).long()
    with torch.no_grad():
        pieces = audio_embeddings_from_features(encoder, projector, features, mask, pool_step=5)
    assert [tuple(p.shape) for p in pieces] == [(25, LLM_HIDDEN), (10, LLM_HIDDEN), (3, LLM_HIDDEN)]


def test_projector_pools_after_projecting():
    projector = tiny_projector()
    hidden = torch.randn(2, 12, D_MODEL)
    with torch.no_grad():
        pooled = projector.project_and_pool(hidden, 5)
        expected = projector(hidden)[:, :10].reshape(2, 2, 5, LLM_HIDDEN).mean(2)
    assert pooled.shape == (2, 2, LLM_HIDDEN)
    torch.testing.assert_close(pooled, expected)


# --- block-causal chunk mask ----------------------------------------------------------------------------------
def test_block_causal_mask_layout():
    mask = block_causal_attention_mask(torch.tensor([5, 3]), num_frames=5, chunk_frames=2, dtype=torch.float32)
    allowed = (mask == 0).int()
    assert allowed[0, 0].tolist() == [[1, 1, 0, 0, 0], [1, 1, 0, 0, 0], [1, 1, 1, 1, 0], [1, 1, 1, 1, 0], [1] * 5]
    padded_rows = [[1, 1, 0, 0, 0], [1, 1, 0, 0, 0], [1, 1, 1, 0, 0], [1, 1, 1, 0, 0], [1, 1, 1, 0, 0]]
    assert allowed[1, 0].tolist() == padded_rows
    assert block_causal_attention_mask(torch.tensor([4]), 4, 0, torch.float32) is None


def test_later_chunks_do_not_change_earlier_chunks():
    encoder = tiny_encoder()
    features = mel(300)
    changed = features.clone()
    changed[..., 101:] = torch.randn_like(changed[..., 101:])  # encoder frames >= 50 read mel frames >= 98
    with torch.no_grad():
        before, _ = encoder(features)
        after, _ = encoder(changed)
        full_before, _ = encoder(features, chunk_frames=0)
        full_after, _ = encoder(changed, chunk_frames=0)
    torch.testing.assert_close(before[:, :50], after[:, :50], atol=1e-6, rtol=0)
    assert (before[:, 50:] - after[:, 50:]).abs().max() > 1e-2
    assert (full_before[:, :50] - full_after[:, :50]).abs().max() > 1e-2  # full attention looks ahead


# --- streaming == offline chunked -----------------------------------------------------------------------------
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_streaming_five_chunks_equals_offline_chunked(attn):
    encoder = tiny_encoder(attn=attn)
    features = mel(500, seed=3)
    with torch.no_grad():
        offline, _ = encoder(features)
        streamed, state = stream(encoder, features)
    assert streamed.shape == offline.shape == (1, 250, D_MODEL)
    torch.testing.assert_close(streamed, offline, atol=ATOL, rtol=0)
    assert state.cached_frames == 250 and state.mel_frames_seen == 500
    assert all(k.shape[2] == 250 and v.shape[2] == 250 for k, v in state.key_values)


def test_streaming_ragged_last_chunk_equals_offline():
    encoder = tiny_encoder()
    features = mel(437, seed=4)
    with torch.no_grad():
        offline, _ = encoder(features)
        streamed, _ = stream(encoder, features)
    assert streamed.shape == (1, 219, D_MODEL)
    torch.testing.assert_close(streamed, offline, atol=ATOL, rtol=0)


def test_streaming_without_lookahead_differs_at_seams():
    encoder = tiny_encoder()
    features = mel(200, seed=5)
    with torch.no_grad():
        offline, _ = encoder(features)
        streamed, _ = stream(encoder, features, lookahead=False)
    assert (streamed[:, :50] - offline[:, :50]).abs().max() > 1e-3


def test_step_is_pure():
    encoder = tiny_encoder()
    features = mel(200, seed=6)
    with torch.no_grad():
        _, state = encoder.step(features[..., :100], None, lookahead_features=features[..., 100:102])
        first, next_state = encoder.step(features[..., 100:], state)
        again, _ = encoder.step(features[..., 100:], state)
    assert state.cached_frames == 50 and next_state.cached_frames == 100
    assert all(k.shape[2] == 50 for k, _ in state.key_values)
    torch.testing.assert_close(first, again, atol=0, rtol=0)


def test_cache_resets_at_max_source_positions():
    encoder = tiny_encoder(max_source_positions=120)
    features = mel(400, seed=7)
    states, outputs = [], []
    state = None
    with torch.no_grad():
        for k in range(4):
            ahead = features[..., (k + 1) * 100 : (k + 1) * 100 + 2] if k < 3 else None
            hidden, state = encoder.step(features[..., k * 100 : (k + 1) * 100], state, lookahead_features=ahead)
            states.append(state)
            outputs.append(hidden)
        # 50 + 50 < 120, then 100 + 50 >= 120: the third chunk starts a fresh cache at position 0
        assert [s.cached_frames for s in states] == [50, 100, 50, 100]
        fresh = AudioEncoderStreamState(mel_tail=states[1].mel_tail, mel_frames_seen=200)
        restarted, _ = encoder.step(features[..., 200:300], fresh, lookahead_features=features[..., 300:302])
    torch.testing.assert_close(outputs[2], restarted, atol=1e-6, rtol=0)
    with pytest.raises(AudioTooLongError, match="max_source_positions"):
        encoder(features)


# --- batching, padding, attention backends --------------------------------------------------------------------
def test_padded_batch_equals_single_items():
    encoder, projector = tiny_encoder(), tiny_projector()
    lengths = [300, 170, 99]
    features = mel(300, seed=8, batch=3)
    mask = (torch.arange(300)[None, :] < torch.tensor(lengths)[:, None]).long()
    with torch.no_grad():
        batched, out_mask = encoder(features, mask)
        pieces = audio_embeddings_from_features(encoder, projector, features, mask, pool_step=5)
        for i, length in enumerate(lengths):
            single, _ = encoder(features[i : i + 1, :, :length])
            frames = single.shape[1]
            assert int(out_mask[i].sum()) == frames
            torch.testing.assert_close(batched[i : i + 1, :frames], single, atol=1e-5, rtol=0)
            alone = audio_embeddings_from_features(encoder, projector, features[i : i + 1, :, :length], None, 5)[0]
            torch.testing.assert_close(pieces[i], alone, atol=1e-5, rtol=0)


def test_padding_values_do_not_change_real_outputs():
    encoder = tiny_encoder()
    features = mel(200, seed=9)
    mask = torch.ones(1, 200, dtype=torch.long)
    mask[:, 130:] = 0
    garbage = features.clone()
    garbage[..., 130:] = 50.0 * torch.randn_like(garbage[..., 130:])
    zeros = features.clone()
    zeros[..., 130:] = 0.0
    with torch.no_grad():
        a, _ = encoder(garbage, mask)
        b, _ = encoder(zeros, mask)
    torch.testing.assert_close(a[:, :65], b[:, :65], atol=1e-6, rtol=0)


def test_sdpa_equals_eager():
    encoder = tiny_encoder(attn="sdpa")
    features = mel(300, seed=10, batch=2)
    mask = torch.ones(2, 300, dtype=torch.long)
    mask[1, 210:] = 0
    with torch.no_grad():
        sdpa_offline, _ = encoder(features, mask)
        sdpa_stream, _ = stream(encoder, features[:1])
        encoder.config._attn_implementation = "eager"
        eager_offline, _ = encoder(features, mask)
        eager_stream, _ = stream(encoder, features[:1])
    torch.testing.assert_close(sdpa_offline[0], eager_offline[0], atol=ATOL, rtol=0)
    torch.testing.assert_close(sdpa_offline[1, :105], eager_offline[1, :105], atol=ATOL, rtol=0)
    torch.testing.assert_close(sdpa_stream, eager_stream, atol=ATOL, rtol=0)


# --- training -------------------------------------------------------------------------------------------------
class _EncoderForTest(PreTrainedModel):
    config_class = WhisperConfig
    base_model_prefix = "encoder"
    supports_gradient_checkpointing = True
    _supports_sdpa = True

    def __init__(self, config):
        super().__init__(config)
        self.encoder = MiniCPMOAudioEncoder(config)
        self.post_init()

    def _init_weights(self, module):
        super()._init_weights(module)
        if isinstance(module, MiniCPMOAudioPositionEmbedding):
            module.reset_parameters()

    def forward(self, features):
        return self.encoder(features)[0]


def test_positions_start_sinusoidal_inside_a_pretrained_model():
    weight = _EncoderForTest(tiny_whisper_config()).encoder.embed_positions.weight
    torch.testing.assert_close(weight, sinusoids(*weight.shape))
    assert not weight.requires_grad  # frozen, as in transformers' WhisperEncoder


def test_gradient_checkpointing_gives_same_gradients():
    torch.manual_seed(0)
    model = _EncoderForTest(tiny_whisper_config()).train()
    features = mel(200, seed=11)

    def grads():
        model.zero_grad()
        model(features).pow(2).mean().backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    plain = grads()
    model.activation_checkpointing_enable()
    assert all(layer.gradient_checkpointing for layer in model.encoder.layers)
    checkpointed = grads()
    assert plain.keys() == checkpointed.keys() and "encoder.embed_positions.weight" not in plain
    for name in plain:
        torch.testing.assert_close(plain[name], checkpointed[name], atol=1e-6, rtol=1e-5)


# --- errors ---------------------------------------------------------------------------------------------------
def test_bad_inputs_raise_typed_errors():
    encoder = tiny_encoder()
    with pytest.raises(AudioInputError, match="mel bins"):
        encoder(torch.zeros(1, 128, 100))
    with pytest.raises(AudioInputError, match="right-padded"):
        encoder(mel(10), torch.tensor([[0, 1, 1, 1, 1, 1, 1, 1, 1, 1]]))
    with pytest.raises(AudioInputError, match="no real frames"):
        encoder(mel(10, batch=2), torch.tensor([[1] * 10, [0] * 10]))
    with pytest.raises(AudioStreamError, match="one stream"):
        encoder.step(mel(100, batch=2))
    with torch.no_grad():
        _, odd_state = encoder.step(mel(99))
    with pytest.raises(AudioStreamError, match="odd number"):
        encoder.step(mel(100), odd_state)
    with pytest.raises(AudioInputError, match="at least 9 mel frames"):
        audio_embeddings_from_features(encoder, tiny_projector(), mel(8), None, 5)


# --- official layout ------------------------------------------------------------------------------------------
def test_full_size_names_shapes_and_counts_match_official(shared_dir):
    config = WhisperConfig(
        d_model=1024, encoder_layers=24, encoder_attention_heads=16, encoder_ffn_dim=4096, num_mel_bins=80,
        max_source_positions=1500,
    )
    with torch.device("meta"):
        encoder = MiniCPMOAudioEncoder(config)
        projector = MiniCPMOAudioProjector(config.encoder_ffn_dim // 4, 4096)
    ours = {f"apm.{n}": tuple(t.shape) for n, t in encoder.state_dict().items()}
    ours.update({f"audio_projection_layer.{n}": tuple(t.shape) for n, t in projector.state_dict().items()})
    expected = {}
    for line in (shared_dir / "reference" / "official_state_dict.tsv").read_text().splitlines():
        name, shape, _dtype = line.split("\t")
        if name.startswith(("apm.", "audio_projection_layer.")):
            expected[name] = tuple(json.loads(shape))
    assert ours == expected
    assert sum(p.numel() for p in encoder.parameters()) == 307_216_384
    assert sum(p.numel() for p in projector.parameters()) == 20_979_712
