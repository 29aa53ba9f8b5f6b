"""Omni-Flow duplex sessions on the tiny model: layout, incremental == from scratch, controls, barge-in, window."""

import numpy as np
import pytest
import torch
from helpers import image, processor, tiny_model, tone

from minicpmo.modeling.modeling_cache_window import cache_nbytes
from minicpmo.processing.feature_extraction_minicpmo import InvalidAudioError, MultiChannelAudioError
from minicpmo.processing.feature_extraction_minicpmo import audio_token_count
from minicpmo.processing.duplex_layout_minicpmo import parse_unit, system_prefix_ids, unit_spans
from minicpmo.voices import load_voice

ALWAYS_SPEAK = dict(listen_bias=-1e9, force_listen_count=0)


def units(n, seconds=1.0, seed=0):
    rng = np.random.default_rng(seed)
    return [(0.05 * rng.standard_normal(16000)).astype(np.float32) + tone(seconds, 300 + 50 * k) for k in range(n)]


def test_forced_listen_then_outputs_per_unit():
    session = tiny_model().duplex_session(processor(), force_listen_count=2, generate_audio=False)
    outs = [session.step(chunk) for chunk in units(4)]
    assert [o.is_listen for o in outs[:2]] == [True, True]
    assert [o.time_s for o in outs] == [0.0, 1.0, 2.0, 3.0]
    assert set(outs[0].timings) == {"vision", "audio", "prefill", "decode", "speech_codes", "token2wav"}
    session.close()
    with pytest.raises(RuntimeError, match="closed"):
        session.step(units(1)[0])


def test_vocabulary_head_runs_once_per_decided_token_and_not_on_prefill_or_closing():
    """The system prefill and a unit's closing [terminator, </unit>] forward only extend the cache: no lm_head."""
    model = tiny_model()
    calls = []
    handle = model.lm_head.register_forward_hook(lambda module, args, output: calls.append(tuple(args[0].shape)))
    try:
        session = model.duplex_session(processor(), generate_audio=False, **ALWAYS_SPEAK,
                                       max_speak_tokens_per_unit=4)
        assert calls == []  # the system turn was prefilled without logits
        for chunk in units(3):
            before = len(calls)
            out = session.step(chunk)
            assert len(calls) - before == len(out.token_ids)  # one head per token chosen, none for the closing
    finally:
        handle.remove()
    assert all(shape == (model.config.hidden_size,) for shape in calls)


def test_speaking_units_stream_audio_and_follow_the_layout():
    model = tiny_model()
    voice = load_voice("en_dlc")
    # restrict_decision: the first token is <|speak|>, so the units follow the strict training layout.
    session = model.duplex_session(processor(), ref_audio=voice, record=True, **ALWAYS_SPEAK,
                                   max_speak_tokens_per_unit=6, restrict_decision=True)
    frames = [image(640, 480, seed=k) if k % 2 == 0 else None for k in range(4)]
    outs = [session.step(chunk, frame) for chunk, frame in zip(units(4), frames)]
    assert all(not o.is_listen for o in outs)
    assert all(len(o.token_ids) <= 6 for o in outs)
    produced = [o.audio for o in outs if o.audio is not None]
    assert produced and sum(a.size for a in produced) >= 24000  # at least 1 s of 24 kHz speech streamed

    # The live session writes exactly the layout the training serializer uses.
    ids = session.state.sequence_ids
    prefix = system_prefix_ids(processor().tokenizer, session.system_prompt,
                               n_ref_audio_slots=audio_token_count(voice.shape[0]))
    assert ids[: len(prefix)] == prefix
    spans = unit_spans(ids)
    assert len(spans) == 4
    for (start, end), out, frame in zip(spans, outs, frames):
        parsed = parse_unit(ids[start:end])
        assert parsed.has_frame == (frame is not None) and parsed.n_audio_slots == 10
        assert parsed.speak and parsed.end_of_turn == out.end_of_turn
        assert list(parsed.text_ids) == [t for t in out.token_ids[1:-1]]


def test_incremental_decision_logits_equal_a_from_scratch_forward():
    model = tiny_model()
    session = model.duplex_session(processor(), record=True, generate_audio=False, force_listen_count=1,
                                   listen_bias=-5.0, max_speak_tokens_per_unit=4)
    for chunk, frame in zip(units(3), [None, image(500, 500), None]):
        session.step(chunk, frame)
    state = session.state.llm
    embeds = torch.cat(state.fed_embeds).unsqueeze(0)
    assert embeds.shape[1] == len(state.sequence_ids)
    with torch.no_grad():
        hidden = model.model.language_model(inputs_embeds=embeds).last_hidden_state
        logits = model.lm_head(hidden)[0]
    # The first token of each unit is read at the unit's last input slot: <unit> [<image> 64 </image>] 10 audio.
    decision_positions = [start + 1 + (66 if has_frame else 0) + 10 - 1
                          for (start, _), has_frame in zip(state.unit_spans, [False, True, False])]
    assert len(decision_positions) == len(state.decision_logits) == 3
    for position, recorded in zip(decision_positions, state.decision_logits):
        torch.testing.assert_close(logits[position], recorded, rtol=1e-4, atol=1e-4)


def test_generate_duplex_equals_stepped_session_with_the_same_seed():
    model = tiny_model()
    controls = dict(do_sample=True, seed=7, force_listen_count=0, generate_audio=False, max_speak_tokens_per_unit=5)
    chunks = units(4, seed=3)
    streamed = list(model.generate_duplex(chunks, processor(), **controls))
    session = model.duplex_session(processor(), **controls)
    stepped = [session.step(chunk) for chunk in chunks]
    assert [o.token_ids for o in streamed] == [o.token_ids for o in stepped]
    assert [o.text for o in streamed] == [o.text for o in stepped]


def test_barge_in_stops_the_turn_and_drops_queued_speech():
    model = tiny_model()
    session = model.duplex_session(processor(), ref_audio=load_voice("en_dlc"), **ALWAYS_SPEAK,
                                   max_speak_tokens_per_unit=4)
    speaking = [session.step(chunk) for chunk in units(2)]
    assert all(not o.is_listen for o in speaking)
    session.config.listen_bias = 1e9  # the user talks over the model: it yields the floor
    out = session.step(units(1, seed=5)[0])
    assert out.is_listen and out.interrupted and out.end_of_turn and out.audio is None
    assert not session.state.in_turn and session.state.wav_state.pending.numel() == 0


def test_proactive_speech_without_any_user_speech():
    session = tiny_model().duplex_session(processor(), system_prompt="Remind me to drink water.",
                                          generate_audio=False, **ALWAYS_SPEAK)
    silence = np.zeros(16000, dtype=np.float32)
    outs = [session.step(silence) for _ in range(2)]
    assert all(not o.is_listen for o in outs)


def test_sliding_window_bounds_the_cache_and_keeps_the_system_prompt():
    model = tiny_model()
    session = model.duplex_session(processor(), generate_audio=False, force_listen_count=10**6,
                                   window_high_tokens=120, window_low_tokens=80)
    system_keys = session.state.llm.cache.layers[0].keys[:, :, : session.state.llm.system_length].clone()
    sizes = []
    for chunk in units(40):
        session.step(chunk)
        sizes.append(session.state.llm.next_position)
        assert session.state.llm.cache.get_seq_length() == session.state.llm.next_position
    assert max(sizes) <= 120 + 13  # one unit (11 slots + listen + </unit>) above the high watermark at most
    assert sizes[-1] < 120
    torch.testing.assert_close(session.state.llm.cache.layers[0].keys[:, :, : session.state.llm.system_length], system_keys)
    bytes_at_20 = cache_nbytes(session.state.llm.cache)
    for chunk in units(20, seed=1):
        session.step(chunk)
    assert cache_nbytes(session.state.llm.cache) <= bytes_at_20 * 1.5
    assert session.state.audio_state.cache_resets >= 1  # the Whisper cache restarts every 30 s


def test_bad_unit_audio_is_a_typed_error_and_the_session_survives():
    session = tiny_model().duplex_session(processor(), generate_audio=False)
    with pytest.raises(MultiChannelAudioError, match="multi-channel"):
        session.step(np.zeros((2, 16000), dtype=np.float32))
    with pytest.raises(InvalidAudioError, match="NaN"):
        session.step(np.full(16000, np.nan, dtype=np.float32))
    from PIL import Image

    with pytest.raises(ValueError, match="pixel|size|small"):
        session.step(units(1)[0], Image.new("RGB", (1, 1)))
    assert session.step(units(1)[0]).time_s == 0.0  # nothing of the bad units entered the session


def test_tail_playback_clock_shrinks_the_text_budget_when_speech_lags():
    from minicpmo.duplex.duplex_session import speak_budget

    session = tiny_model().duplex_session(processor(), generate_audio=False, max_speak_tokens_per_unit=20,
                                          max_speech_lag_s=1.0)
    state, config = session.state, session.config
    state.in_turn, state.turn_start_time_s = True, 10.0
    state.speech_emitted_s = 3.0  # 3 s of speech queued after 3 s of turn: in step with the clock
    assert speak_budget(config, state, now_s=13.0) == 20
    state.speech_emitted_s = 4.5  # 1.5 s ahead of the interaction clock
    assert speak_budget(config, state, now_s=13.0) == 10
    state.speech_emitted_s = 6.0  # 3 s ahead: keep the turn open without new text
    assert speak_budget(config, state, now_s=13.0) == 2
