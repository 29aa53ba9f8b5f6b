"""Speech-token decoder (`tts.*`): official names/shapes, condition, sampling, streaming, duplex units."""

import csv
import json
import math
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

from transformers import PreTrainedModel  # noqa: E402

from minicpmo.configuration.configuration_minicpmo import MiniCPMTTSConfig  # noqa: E402
from minicpmo.modeling.modeling_speech_decoder import (  # noqa: E402
    MiniCPMOSpeechDecoder,
    SpeechDecoderInputError,
    SpeechSamplingConfig,
    SpeechSamplingError,
    apply_repetition_penalty,
    init_weight_norm_parametrization,
    warp_code_logits,
)

SHARED_REFERENCE = Path(__file__).resolve().parents[1].parent / "shared" / "reference"
LLM_DIM, HIDDEN, N_AUDIO = 64, 32, 66
EOS = N_AUDIO - 1
AUDIO_BOS, TEXT_EOS = 198, 199


def tiny_config(**overrides) -> MiniCPMTTSConfig:
    values = dict(
        llm_dim=LLM_DIM,
        hidden_size=HIDDEN,
        intermediate_size=64,
        num_attention_heads=2,
        num_key_value_heads=2,
        num_hidden_layers=2,
        num_text_tokens=200,
        num_audio_tokens=N_AUDIO,
        audio_bos_token_id=AUDIO_BOS,
        text_eos_token_id=TEXT_EOS,
    )
    values.update(overrides)
    return MiniCPMTTSConfig(**values)


@pytest.fixture(scope="module")
def decoder() -> MiniCPMOSpeechDecoder:
    torch.manual_seed(0)
    model = MiniCPMOSpeechDecoder(tiny_config()).eval()
    # Larger code weights make the tiny random model's code distribution peaked and varied, like a real one;
    # larger query/key weights make attention (and so positions and the cache) matter.
    with torch.no_grad():
        model.emb_code[0].weight.normal_(0, 1.0)
        model.head_code[0].parametrizations.weight.original0.fill_(8.0)
        for layer in model.model.layers:
            layer.self_attn.q_proj.weight.normal_(0, 0.6)
            layer.self_attn.k_proj.weight.normal_(0, 0.6)
    return model


def text_and_hidden(n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, 190, (1, n), generator=gen), torch.randn(1, n, LLM_DIM, generator=gen)


def favour_eos(decoder: MiniCPMOSpeechDecoder, boost: float = 1e4):
    """Forward hook that makes EOS by far the most likely code at every step."""
    bias = torch.zeros(N_AUDIO)
    bias[EOS] = boost
    return decoder.head_code[0].register_forward_hook(lambda module, inputs, output: output + bias)


# --- structure -----------------------------------------------------------------------------------------------
def test_tiny_shapes_and_condition(decoder):
    shapes = {name: tuple(p.shape) for name, p in decoder.named_parameters()}
    assert shapes["emb_text.weight"] == (200, HIDDEN)
    assert shapes["model.embed_tokens.weight"] == (32000, HIDDEN)
    assert shapes["projector_semantic.linear1.weight"] == (HIDDEN, LLM_DIM)
    assert shapes["projector_spk.linear1.weight"] == (HIDDEN, LLM_DIM)
    assert shapes["emb_code.0.weight"] == (N_AUDIO, HIDDEN)
    assert shapes["head_code.0.parametrizations.weight.original0"] == (N_AUDIO, 1)
    assert shapes["head_code.0.parametrizations.weight.original1"] == (N_AUDIO, HIDDEN)
    ids = torch.randint(0, 200, (2, 5))
    assert decoder.condition(ids, torch.randn(2, 5, LLM_DIM)).shape == (2, 5, HIDDEN)
    assert decoder.eos_code == EOS


def _official_tts_rows() -> dict[str, tuple[int, ...]]:
    path = SHARED_REFERENCE / "official_state_dict.tsv"
    if not path.exists():
        pytest.skip("../shared/reference is not present")
    rows = {}
    with path.open() as handle:
        for name, shape, *_ in csv.reader(handle, delimiter="\t"):
            if name.startswith("tts."):
                rows[name[len("tts.") :]] = tuple(json.loads(shape))
    return rows


def test_full_size_names_shapes_and_count_match_official():
    official = _official_tts_rows()
    tts_values = json.loads((SHARED_REFERENCE / "official_config_reconstructed.json").read_text())["tts_config"]
    with torch.device("meta"):
        full = MiniCPMOSpeechDecoder(MiniCPMTTSConfig(**tts_values))
    ours = {name: tuple(p.shape) for name, p in full.named_parameters()}
    buffers = {name: tuple(b.shape) for name, b in full.named_buffers()}
    official_params = {k: v for k, v in official.items() if k not in buffers}
    assert ours == official_params
    assert buffers["model.rotary_emb.inv_freq"] == official["model.rotary_emb.inv_freq"]
    assert set(full.state_dict()) == set(official_params)
    assert sum(p.numel() for p in full.parameters()) == 347_696_290


def test_weight_norm_effective_weight_and_init_hook():
    torch.manual_seed(1)
    model = MiniCPMOSpeechDecoder(tiny_config())
    head = model.head_code[0]
    with torch.no_grad():
        head.parametrizations.weight.original0.uniform_(0.5, 2.0)
    g = head.parametrizations.weight.original0
    v = head.parametrizations.weight.original1
    torch.testing.assert_close(head.weight, g * v / v.norm(dim=1, keepdim=True))
    # After meta-device construction, the init hook yields finite weights with g = ||v|| (weight == v).
    with torch.device("meta"):
        fresh = MiniCPMOSpeechDecoder(tiny_config())
    fresh.to_empty(device="cpu")
    fresh.reset_code_heads(std=0.02)
    fresh_head = fresh.head_code[0]
    assert torch.isfinite(fresh_head.weight).all()
    torch.testing.assert_close(fresh_head.weight, fresh_head.parametrizations.weight.original1)
    assert 0.005 < fresh_head.parametrizations.weight.original1.std() < 0.05


class _HostModel(PreTrainedModel):
    """A PreTrainedModel holding the decoder the way the omni model does (`tts` attribute)."""

    config_class = MiniCPMTTSConfig

    def __init__(self, config):
        super().__init__(config)
        self.tts = MiniCPMOSpeechDecoder(config)
        self.post_init()

    def _init_weights(self, module):
        super()._init_weights(module)
        init_weight_norm_parametrization(module, std=0.02)


def test_meta_device_init_inside_pretrained_model_leaves_no_garbage(tmp_path):
    with torch.device("meta"):
        host = _HostModel(tiny_config())
    host.to_empty(device="cpu")
    host.initialize_weights()
    for name, param in host.named_parameters():
        assert torch.isfinite(param).all() and param.abs().max() < 10, name
    head = host.tts.head_code[0]
    torch.testing.assert_close(head.weight, head.parametrizations.weight.original1)
    torch.testing.assert_close(host.tts.model.rotary_emb.inv_freq[1], torch.tensor(10000.0 ** (-2 / 16)))
    host.save_pretrained(tmp_path)
    reloaded = _HostModel.from_pretrained(tmp_path)
    for (name, expected), actual in zip(host.state_dict().items(), reloaded.state_dict().values()):
        assert torch.equal(expected, actual), name


def test_normalisation_switch_changes_condition_norm():
    torch.manual_seed(2)
    plain = MiniCPMOSpeechDecoder(tiny_config(normalize_projected_hidden=False)).eval()
    normed = MiniCPMOSpeechDecoder(tiny_config(normalize_projected_hidden=True)).eval()
    normed.load_state_dict(plain.state_dict())
    ids, hidden = text_and_hidden(6)
    hidden = hidden * 50
    text_part = plain.emb_text(ids)
    projected_plain = plain.condition(ids, hidden) - text_part
    projected_normed = normed.condition(ids, hidden) - text_part
    torch.testing.assert_close(projected_normed.norm(dim=-1), torch.ones(1, 6), atol=1e-5, rtol=0)
    assert not torch.allclose(projected_plain.norm(dim=-1), torch.ones(1, 6), atol=1e-2)
    torch.testing.assert_close(plain.condition(ids, hidden, normalize=True), normed.condition(ids, hidden))


def test_bad_inputs_raise_typed_errors(decoder):
    ids, hidden = text_and_hidden(4)
    with pytest.raises(SpeechDecoderInputError, match="llm_dim"):
        decoder.condition(ids, torch.randn(1, 4, LLM_DIM + 1))
    with pytest.raises(SpeechDecoderInputError, match="disagree"):
        decoder.condition(ids, torch.randn(1, 5, LLM_DIM))
    with pytest.raises(SpeechDecoderInputError, match="out of range"):
        decoder.condition(torch.full((1, 4), 200), hidden)
    with pytest.raises(SpeechDecoderInputError, match="integer"):
        decoder.condition(ids.float(), hidden)
    with pytest.raises(SpeechDecoderInputError, match="one sequence"):
        decoder.generate_codes(ids.repeat(2, 1), hidden.repeat(2, 1, 1))
    with pytest.raises(SpeechDecoderInputError, match="audio_bos_token_id"):
        MiniCPMOSpeechDecoder(tiny_config(audio_bos_token_id=200))
    with pytest.raises(SpeechSamplingError, match="temperature"):
        SpeechSamplingConfig(temperature=0)
    with pytest.raises(SpeechSamplingError, match="top_p"):
        SpeechSamplingConfig(top_p=1.5)
    state = decoder.new_stream_state()
    _, state = decoder.step(ids, hidden, state, is_last_chunk=True, sampling=SpeechSamplingConfig(max_new_codes=3))
    with pytest.raises(SpeechDecoderInputError, match="finished"):
        decoder.step(ids, hidden, state, is_last_chunk=True)


# --- sampling ------------------------------------------------------------------------------------------------
def test_repetition_penalty_math_on_hand_made_logits():
    logits = torch.tensor([2.0, -2.0, 1.0, -1.0, 0.5])
    history = torch.tensor([0, 0, 1, 3, 3, 3])
    out = apply_repetition_penalty(logits, history, penalty=1.05, window=16)
    expected = torch.tensor([2.0 / 1.05**2, -2.0 * 1.05, 1.0, -1.0 * 1.05**3, 0.5])
    torch.testing.assert_close(out, expected)
    # Only the last `window` codes count: with window 3 the two 0s and the 1 fall out.
    windowed = apply_repetition_penalty(logits, history, penalty=1.05, window=3)
    torch.testing.assert_close(windowed, torch.tensor([2.0, -2.0, 1.0, -1.0 * 1.05**3, 0.5]))
    # No history, no change; temperature is applied before the penalty.
    torch.testing.assert_close(apply_repetition_penalty(logits, history[:0], 1.05, 16), logits)
    sampling = SpeechSamplingConfig(temperature=0.5, top_p=1.0, top_k=0)
    warped = warp_code_logits(logits, history, sampling, eos_code=4, mask_eos=False)
    torch.testing.assert_close(warped, apply_repetition_penalty(logits / 0.5, history, 1.05, 16))


def test_top_p_and_top_k_keep_at_least_three():
    logits = torch.arange(N_AUDIO, dtype=torch.float) / 100  # distinct values: top-k keeps ties
    logits[7] = 100.0
    top_p_only = SpeechSamplingConfig(top_p=0.1, top_k=0, repetition_penalty=1.0)
    kept = torch.isfinite(warp_code_logits(logits, torch.zeros(0, dtype=torch.long), top_p_only, EOS, False))
    assert kept.sum() == 3 and kept[7]
    top_k_only = SpeechSamplingConfig(top_p=1.0, top_k=1, repetition_penalty=1.0)
    kept = torch.isfinite(warp_code_logits(logits, torch.zeros(0, dtype=torch.long), top_k_only, EOS, False))
    assert kept.sum() == 3 and kept[7]
    ramp = torch.arange(N_AUDIO, dtype=torch.float) / 10
    default = SpeechSamplingConfig(repetition_penalty=1.0)
    kept = torch.isfinite(warp_code_logits(ramp, torch.zeros(0, dtype=torch.long), default, EOS, False))
    assert 3 <= kept.sum() <= 25 and kept[N_AUDIO - 1]


def test_eos_mask_in_warp_and_in_generation(decoder):
    logits = torch.zeros(N_AUDIO)
    logits[EOS] = 50.0
    masked = warp_code_logits(logits, torch.zeros(0, dtype=torch.long), SpeechSamplingConfig(), EOS, True)
    # EOS is masked after top-p/top-k (official order), so 2 of the 3 kept candidates remain.
    assert masked[EOS] == -math.inf and torch.isfinite(masked).sum() == 2
    ids, hidden = text_and_hidden(5)
    handle = favour_eos(decoder)
    try:
        for do_sample in (False, True):
            sampling = SpeechSamplingConfig(min_new_codes=7, do_sample=do_sample, seed=0)
            codes = decoder.generate_codes(ids, hidden, sampling)
            assert codes.shape == (7,) and (codes != EOS).all()
        assert decoder.generate_codes(ids, hidden, SpeechSamplingConfig(min_new_codes=0)).numel() == 0
    finally:
        handle.remove()


def test_sampling_is_seeded_and_varies_across_seeds(decoder):
    ids, hidden = text_and_hidden(6)

    def run(seed):
        return decoder.generate_codes(ids, hidden, SpeechSamplingConfig(seed=seed, min_new_codes=20, max_new_codes=20))

    first, again, other = run(1), run(1), run(2)
    assert first.shape == (20,) and first.dtype == torch.long
    assert torch.equal(first, again)
    assert not torch.equal(first, other)
    assert ((first >= 0) & (first < EOS)).all()


# --- streaming -----------------------------------------------------------------------------------------------
def record_code_logits(decoder):
    """Forward hook that keeps the code logits of every cached decoding forward, in order."""
    recorded = []
    handle = decoder.head_code[0].register_forward_hook(lambda module, inputs, output: recorded.append(output[0]))
    return recorded, handle


def _recompute_greedy_check(decoder, chunks, streamed, sampling, max_per_chunk, cached_logits=None):
    """Rebuild the whole streamed sequence, run it once uncached, and re-derive each greedy code.

    `cached_logits` (recorded during the cached run) must equal the uncached logits at the same positions.
    """
    pieces, predict_at, position = [], [], 0
    for index, ((ids, hidden), codes) in enumerate(zip(chunks, streamed)):
        is_last = index == len(chunks) - 1
        parts = [decoder.condition(ids, hidden)]
        if is_last:
            parts.append(decoder.emb_text(torch.tensor([[TEXT_EOS]])))
        parts.append(decoder.emb_text(torch.tensor([[AUDIO_BOS]])))
        parts.append(decoder.emb_code[0](codes.view(1, -1)))
        prefix_len = sum(p.shape[1] for p in parts[:-1])
        # Predictions for this chunk come from the last prefix position and every fed code.
        first = position + prefix_len - 1
        predict_at.append(list(range(first, first + len(codes) + 1)))
        pieces.extend(parts)
        position += prefix_len + len(codes)
    embeds = torch.cat(pieces, dim=1)
    positions = torch.arange(embeds.shape[1])[None]
    hidden_states = decoder.model(inputs_embeds=embeds, position_ids=positions).last_hidden_state
    logits = decoder.head_code[0](hidden_states)[0]
    if cached_logits is not None:
        flat_positions = [pos for positions in predict_at for pos in positions]
        torch.testing.assert_close(torch.stack(cached_logits), logits[flat_positions], atol=1e-4, rtol=1e-4)
    history: list[int] = []
    for positions, codes in zip(predict_at, streamed):
        codes = codes.tolist()
        for offset, pos in enumerate(positions):
            if offset == len(codes) and len(codes) == max_per_chunk:
                break  # the chunk stopped at its cap, not at EOS
            history_tensor = torch.tensor(history, dtype=torch.long)
            mask_eos = len(history) < sampling.min_new_codes
            scores = warp_code_logits(logits[pos], history_tensor, sampling, EOS, mask_eos)
            expected = codes[offset] if offset < len(codes) else EOS
            assert int(scores.argmax()) == expected
            if offset < len(codes):
                history.append(codes[offset])
    return position


@torch.no_grad()
def test_streaming_equals_uncached_recomputation_under_greedy(decoder):
    sampling = SpeechSamplingConfig(do_sample=False, min_new_codes=4)
    max_per_chunk = 9
    chunks = [text_and_hidden(n, seed=10 + n) for n in (3, 4, 2)]
    state = decoder.new_stream_state()
    streamed = []
    cached_logits, handle = record_code_logits(decoder)
    try:
        for index, (ids, hidden) in enumerate(chunks):
            codes, state = decoder.step(
                ids, hidden, state, is_last_chunk=index == len(chunks) - 1, sampling=sampling,
                max_codes_per_chunk=max_per_chunk,
            )
            assert codes.dtype == torch.long and codes.numel() <= max_per_chunk
            streamed.append(codes)
    finally:
        handle.remove()
    assert sum(len(c) for c in streamed) >= sampling.min_new_codes
    lengths = [len(c) for c in streamed]
    assert max_per_chunk in lengths and min(lengths) < max_per_chunk, f"want a capped and an EOS chunk: {lengths}"
    total_positions = _recompute_greedy_check(decoder, chunks, streamed, sampling, max_per_chunk, cached_logits)
    assert state.position == total_positions == state.cache.get_seq_length()
    assert state.codes == torch.cat(streamed).tolist() and state.finished


@torch.no_grad()
def test_offline_generation_equals_single_chunk_stream(decoder):
    ids, hidden = text_and_hidden(5, seed=3)
    for sampling in (
        SpeechSamplingConfig(do_sample=False, min_new_codes=3, max_new_codes=12),
        SpeechSamplingConfig(seed=5, min_new_codes=3, max_new_codes=12),
    ):
        offline = decoder.generate_codes(ids, hidden, sampling)
        streamed, _ = decoder.step(
            ids, hidden, decoder.new_stream_state(sampling.seed), is_last_chunk=True, sampling=sampling,
            max_codes_per_chunk=sampling.max_new_codes,
        )
        assert torch.equal(offline, streamed)
    greedy = SpeechSamplingConfig(do_sample=False, min_new_codes=3, max_new_codes=12)
    offline = decoder.generate_codes(ids, hidden, greedy)
    _recompute_greedy_check(decoder, [(ids, hidden)], [offline], greedy, greedy.max_new_codes)


# --- duplex --------------------------------------------------------------------------------------------------
@torch.no_grad()
def test_duplex_units_emit_25_codes_and_keep_positions_within_a_turn(decoder):
    state = decoder.new_stream_state(seed=0)
    ids1, hidden1 = text_and_hidden(4, seed=1)
    codes, state = decoder.generate_unit_codes(ids1, hidden1, state, turn_start=False, unit_has_turn_eos=False)
    assert codes.shape == (25,) and (codes != EOS).all()
    assert state.position == 4 + 1 + 25 == state.cache.get_seq_length()
    ids2, hidden2 = text_and_hidden(0)
    codes, state = decoder.generate_unit_codes(ids2, hidden2, state, turn_start=False, unit_has_turn_eos=False)
    assert codes.shape == (25,)
    assert state.position == 30 + 1 + 25 == state.cache.get_seq_length()
    assert len(state.codes) == 50
    ids3, hidden3 = text_and_hidden(3, seed=3)
    codes, state = decoder.generate_unit_codes(ids3, hidden3, state, turn_start=False, unit_has_turn_eos=True)
    assert 0 <= codes.numel() <= 25
    assert state.position == 0 and state.cache.get_seq_length() == 0 and state.codes == []


@torch.no_grad()
def test_duplex_eos_only_at_turn_start_or_turn_end(decoder):
    ids, hidden = text_and_hidden(3, seed=4)
    handle = favour_eos(decoder)
    try:
        mid, state = decoder.generate_unit_codes(
            ids, hidden, decoder.new_stream_state(seed=0).reset(), turn_start=False, unit_has_turn_eos=False
        )
        assert mid.shape == (25,) and (mid != EOS).all()
        assert state.position == 3 + 1 + 25
        start, state = decoder.generate_unit_codes(
            ids, hidden, decoder.new_stream_state(seed=0), turn_start=True, unit_has_turn_eos=False
        )
        assert start.numel() == 0 and state.position == 3 + 1
        end, state = decoder.generate_unit_codes(ids, hidden, state, turn_start=False, unit_has_turn_eos=True)
        assert end.numel() == 0 and state.position == 0
    finally:
        handle.remove()


@torch.no_grad()
def test_duplex_unit_matches_recomputation_and_discards_26th_sample(decoder):
    """Greedy: unit 2's codes follow from [unit1 cond, bos, 25 codes, unit2 cond, bos] recomputed uncached."""
    sampling = SpeechSamplingConfig.for_duplex(do_sample=False)
    units = [text_and_hidden(3, seed=21), text_and_hidden(2, seed=22)]
    state = decoder.new_stream_state()
    emitted = []
    for ids, hidden in units:
        codes, state = decoder.generate_unit_codes(
            ids, hidden, state, turn_start=False, unit_has_turn_eos=False, sampling=sampling
        )
        emitted.append(codes)
    pieces = []
    for (ids, hidden), codes in zip(units, emitted):
        pieces += [
            decoder.condition(ids, hidden, normalize=True),
            decoder.emb_text(torch.tensor([[AUDIO_BOS]])),
            decoder.emb_code[0](codes.view(1, -1)),
        ]
    embeds = torch.cat(pieces, dim=1)
    assert embeds.shape[1] == state.position
    logits = decoder.head_code[0](decoder.model(inputs_embeds=embeds).last_hidden_state)[0]
    start = 3 + 1 + 25 + 2 + 1 - 1
    history: list[int] = []
    for offset, code in enumerate(emitted[1].tolist()):
        scores = warp_code_logits(logits[start + offset], torch.tensor(history, dtype=torch.long), sampling, EOS, True)
        assert int(scores.argmax()) == code
        history.append(code)


# --- official step-0 rule (spec 6, turn-based) ---------------------------------------------------------------
OFFICIAL_CODES = 6561  # S3 codes; EOS is 6561, the head has 6562 rows


def official_step_probs(raw: torch.Tensor, history: list[int], step: int) -> torch.Tensor:
    """The spec's turn-based sampling rule, written out independently of warp_code_logits.

    Step 0: softmax(logits / 0.8) with EOS masked. From step 1: the 1.05**count penalty over the last 16 codes,
    top-p 0.85 then top-k 25 (each keeps >= 3), EOS masked (fewer than 50 codes so far).
    """
    scores = raw.double() / 0.8
    if step > 0:
        for code in set(history[-16:]):
            factor = 1.05 ** history[-16:].count(code)
            scores[code] = scores[code] * factor if scores[code] < 0 else scores[code] / factor
        order = torch.argsort(scores, descending=True)
        sorted_probs = torch.softmax(scores[order], dim=0)
        mass_before = torch.cumsum(sorted_probs, dim=0) - sorted_probs
        keep = order[: max(3, int((mass_before < 0.85).sum()))]
        keep = keep[: max(3, 25)]
        kept = torch.full_like(scores, -math.inf)
        kept[keep] = scores[keep]
        scores = kept
    scores[OFFICIAL_CODES] = -math.inf
    return torch.softmax(scores, dim=0)


@torch.no_grad()
def test_turn_first_code_uses_temperature_and_eos_mask_only(monkeypatch):
    """Step 0 after audio_bos: every one of the 6561 codes can be drawn; step 1 is penalised and top-p/top-k cut."""
    import minicpmo.modeling.modeling_speech_decoder as speech_decoder_module

    torch.manual_seed(3)
    model = MiniCPMOSpeechDecoder(tiny_config(num_audio_tokens=OFFICIAL_CODES + 1)).eval()
    with torch.no_grad():
        model.head_code[0].parametrizations.weight.original0.fill_(4.0)
    raw_logits, drawn_from = [], []
    model.head_code[0].register_forward_hook(lambda module, inputs, output: raw_logits.append(output[0].clone()))
    original_pick = speech_decoder_module.pick_code

    def recording_pick(scores, sampling, generator):
        drawn_from.append(scores.clone())
        return original_pick(scores, sampling, generator)

    monkeypatch.setattr(speech_decoder_module, "pick_code", recording_pick)
    ids, hidden = text_and_hidden(4, seed=5)
    codes = model.generate_codes(ids, hidden, SpeechSamplingConfig(seed=1, max_new_codes=2)).tolist()
    assert len(codes) == 2 and len(drawn_from) == 2

    step0 = torch.softmax(drawn_from[0].double(), dim=0)
    assert (step0[:OFFICIAL_CODES] > 0).all() and step0[OFFICIAL_CODES] == 0
    torch.testing.assert_close(step0, official_step_probs(raw_logits[0], [], step=0), atol=1e-7, rtol=1e-5)

    step1 = torch.softmax(drawn_from[1].double(), dim=0)
    expected1 = official_step_probs(raw_logits[1], codes[:1], step=1)
    assert 3 <= int((expected1 > 0).sum()) <= 25
    assert torch.equal(step1 > 0, expected1 > 0)
    torch.testing.assert_close(step1, expected1, atol=1e-6, rtol=1e-4)


def test_first_code_flag_on_hand_made_logits():
    logits = torch.tensor([3.0, -1.0, 2.0, 0.5, 1.0])
    history = torch.tensor([0, 0])
    first = warp_code_logits(logits, history, SpeechSamplingConfig(top_k=1), eos_code=4, mask_eos=True, first_code=True)
    torch.testing.assert_close(first, torch.tensor([3.0, -1.0, 2.0, 0.5, -math.inf]) / 0.8)
    later = warp_code_logits(logits, history, SpeechSamplingConfig(top_k=1), eos_code=4, mask_eos=True)
    assert torch.isfinite(later).sum() == 3 - 1  # top-k keeps 3 (0, 2, 4), EOS then masked
