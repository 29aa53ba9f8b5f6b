"""Duplex (Omni-Flow) unit layout and the training serializer: exact ids, TAIL, look-ahead, caps, labels, errors."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import functools  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from minicpmo.processing.duplex_layout_minicpmo import (  # noqa: E402
    UNIT_END,
    DuplexLayoutError,
    DuplexTokens,
    ParsedUnit,
    duplex_slot_masks,
    parse_unit,
    system_prefix_ids,
    unit_decision_ids,
    unit_input_ids,
    unit_spans,
)
from minicpmo.processing.duplex_serializer_minicpmo import (  # noqa: E402
    IGNORE_INDEX,
    DuplexSample,
    InvalidTimedTokenError,
    SpeechCodesMismatchError,
    TimedToken,
    TimelineMismatchError,
    UnsortedTokensError,
    collate_duplex,
    serialize_duplex,
)
from minicpmo.processing.feature_extraction_minicpmo import UnsupportedSamplingRateError  # noqa: E402

# Official ids (spec section 5), written out so the layout is checked against the numbers, not the code.
UNK, UNIT, UNIT_CLOSE = 128244, 151683, 151684
IMG, IMG_CLOSE = 151669, 151670
AUDIO_START, AUDIO_END, IM_START, IM_END = 151697, 151699, 151644, 151645
LISTEN, SPEAK, TURN_EOS, CHUNK_EOS = 151705, 151706, 151717, 151718
HELLO, THERE = 14990, 1052  # "hello", " there"


@functools.lru_cache(maxsize=None)
def tokenizer():
    from minicpmo.processing.tokenization_minicpmo import load_minicpmo_tokenizer

    return load_minicpmo_tokenizer()


@functools.lru_cache(maxsize=None)
def processor():
    from minicpmo.processing.processing_minicpmo import MiniCPMOProcessor

    return MiniCPMOProcessor.from_defaults()


def frame(seed: int, size=(320, 240)) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 255, size=(size[1], size[0], 3), dtype=np.uint8))


def noise(seconds: float, seed: int = 0) -> np.ndarray:
    return (0.1 * np.random.default_rng(seed).standard_normal(int(seconds * 16000))).astype(np.float32)


def hello_there(**overrides) -> DuplexSample:
    """4 s session: the user talks for 2 s, the assistant says "hello there" from 2.2 s to 3.6 s."""
    fields = dict(
        audio_16k=noise(4.0),
        frames=[(1.0, frame(1)), (3.0, frame(3))],
        assistant_tokens=[TimedToken(HELLO, 2.2, 2.6), TimedToken(THERE, 3.0, 3.6)],
        speech_codes=np.arange(100, 150),  # 2 s of codes from 2.0 s: code i covers [2 + i/25, 2 + (i+1)/25)
        speech_codes_start_s=2.0,
        system_prompt="Streaming Omni Conversation.",
    )
    fields.update(overrides)
    return DuplexSample(**fields)


def frame_block():
    return [IMG] + [UNK] * 64 + [IMG_CLOSE]


# ---- layout building blocks -------------------------------------------------------------------------------
def test_duplex_tokens_match_official_ids():
    tokens = DuplexTokens.from_tokenizer(tokenizer())
    assert tokens == DuplexTokens()
    assert (tokens.unit_start, tokens.unit_end, tokens.listen, tokens.speak) == (UNIT, UNIT_CLOSE, LISTEN, SPEAK)
    assert (tokens.turn_eos, tokens.chunk_eos, tokens.unk) == (TURN_EOS, CHUNK_EOS, UNK)
    assert UNIT_END == UNIT_CLOSE


def test_unit_input_ids_sizes():
    assert unit_input_ids(None, False) == [UNIT] + [UNK] * 10
    assert len(unit_input_ids(None, False)) == 11
    assert unit_input_ids(None, True) == [UNIT] + frame_block() + [UNK] * 10
    assert len(unit_input_ids(None, True)) == 77
    assert len(unit_input_ids(None, True, n_audio_slots=20)) == 87
    resolved = DuplexTokens.from_tokenizer(tokenizer())
    assert unit_input_ids(resolved, has_frame=True, n_audio_slots=10, image_slots=64) == unit_input_ids(None, True)


def test_unit_decision_ids():
    assert unit_decision_ids(None, False) == [LISTEN]
    assert unit_decision_ids(None, True, [HELLO]) == [SPEAK, HELLO, CHUNK_EOS]
    assert unit_decision_ids(None, True, [THERE], end_of_turn=True) == [SPEAK, THERE, TURN_EOS, CHUNK_EOS]
    assert unit_decision_ids(None, True, []) == [SPEAK, CHUNK_EOS]
    with pytest.raises(DuplexLayoutError, match="listen unit"):
        unit_decision_ids(None, False, [HELLO])
    with pytest.raises(DuplexLayoutError, match="layout token"):
        unit_decision_ids(None, True, [HELLO, UNK])


def test_system_prefix_with_and_without_reference_audio():
    tok = tokenizer()
    text_ids = tok("Streaming Omni Conversation.", add_special_tokens=False)["input_ids"]
    newline = tok("\n", add_special_tokens=False)["input_ids"]
    system = tok("system", add_special_tokens=False)["input_ids"]
    with_ref = system_prefix_ids(tok, "Streaming Omni Conversation.", 3)
    official_prefix = tok("<|im_start|>system\nStreaming Omni Conversation.\n<|audio_start|>",
                          add_special_tokens=False)["input_ids"]
    assert with_ref == official_prefix + [UNK, UNK, UNK, AUDIO_END, IM_END]
    assert with_ref[-6:] == [AUDIO_START, UNK, UNK, UNK, AUDIO_END, IM_END]
    assert tok.decode(with_ref[:-5]) == "<|im_start|>system\nStreaming Omni Conversation.\n<|audio_start|>"
    without_ref = system_prefix_ids(tok, "Streaming Omni Conversation.", 0)
    assert without_ref == [IM_START] + system + newline + text_ids + [IM_END]
    assert AUDIO_START not in without_ref
    with pytest.raises(DuplexLayoutError, match="layout token"):
        system_prefix_ids(tok, "hi <unit> there", 0)


def test_parse_unit_round_trip_and_errors():
    for has_frame in (False, True):
        for speak, text, eot in ((False, [], False), (True, [HELLO, THERE], False), (True, [THERE], True)):
            ids = unit_input_ids(None, has_frame) + unit_decision_ids(None, speak, text, eot) + [UNIT_END]
            assert parse_unit(ids) == ParsedUnit(has_frame, 64 if has_frame else 0, 10, speak, tuple(text), eot)
    with pytest.raises(DuplexLayoutError, match="start with <unit>"):
        parse_unit([UNK, LISTEN, UNIT_END])
    with pytest.raises(DuplexLayoutError, match="decision"):
        parse_unit([UNIT, UNK, SPEAK, HELLO, UNIT_END])  # no <|chunk_eos|>
    with pytest.raises(DuplexLayoutError, match="frame"):
        parse_unit([UNIT, IMG, UNK, UNK, LISTEN, UNIT_END])  # unclosed image


def test_slot_masks_distinguish_image_unit_and_reference_audio():
    ids = [IM_START, AUDIO_START, UNK, UNK, AUDIO_END, IM_END] + unit_input_ids(None, True) + [LISTEN, UNIT_END]
    image, audio = duplex_slot_masks(ids)
    assert image.sum() == 64 and audio.sum() == 2 + 10
    assert not (image & audio).any()
    assert audio[2] and audio[3] and not audio[0]


# ---- serializer: exact layout -----------------------------------------------------------------------------
def test_exact_layout_of_small_session():
    out = serialize_duplex(hello_there(), tokenizer(), lookahead_tokens=0)
    system = system_prefix_ids(tokenizer(), "Streaming Omni Conversation.", 0)
    expected = (
        system
        + [UNIT] + [UNK] * 10 + [LISTEN] + [UNIT_CLOSE]  # unit 0: no frame yet (first frame at 1.0 s)
        + [UNIT] + frame_block() + [UNK] * 10 + [LISTEN] + [UNIT_CLOSE]  # unit 1: frame of 1.0 s
        + [UNIT] + frame_block() + [UNK] * 10 + [SPEAK, HELLO, CHUNK_EOS] + [UNIT_CLOSE]  # unit 2: frame 1.0 s
        + [UNIT] + frame_block() + [UNK] * 10 + [SPEAK, THERE, TURN_EOS, CHUNK_EOS] + [UNIT_CLOSE]  # frame 3.0 s
    )
    assert out.input_ids.tolist() == expected
    assert out.system_length == len(system)
    assert [u.speak for u in out.units] == [False, False, True, True]
    assert [u.end_of_turn for u in out.units] == [False, False, False, True]
    assert [u.has_frame for u in out.units] == [False, True, True, True]
    assert out.unit_frames[0] is None
    assert [u.end_pos - u.start_pos for u in out.units] == [13, 79, 81, 82]
    # speech with no look-ahead: hello owns codes [5, 25) (2.2 s .. 3.0 s), there owns [25, 40) (3.0 s .. 3.6 s)
    assert out.units[2].speech_codes == list(range(105, 125))
    assert out.units[2].code_token_indices == [0] * 20
    assert out.units[3].speech_codes == list(range(125, 140))
    assert out.units[3].code_token_indices == [1] * 15
    assert out.units[3].tts_condition_positions == [out.units[3].decision_pos + 1, out.units[3].decision_pos + 2]
    assert out.input_ids[out.units[3].tts_condition_positions].tolist() == [THERE, TURN_EOS]


def test_frames_are_latest_before_unit_start():
    sample = hello_there()
    out = serialize_duplex(sample, tokenizer(), lookahead_tokens=0)
    first, third = sample.frames[0][1], sample.frames[1][1]
    assert out.unit_frames == [None, first, first, third]


def test_parse_unit_round_trip_on_serialized_session():
    out = serialize_duplex(hello_there(), tokenizer())
    ids = out.input_ids.tolist()
    assert unit_spans(ids) == [(u.start_pos, u.end_pos) for u in out.units]
    for unit in out.units:
        parsed = parse_unit(ids[unit.start_pos : unit.end_pos])
        assert parsed.speak == unit.speak and parsed.end_of_turn == unit.end_of_turn
        assert list(parsed.text_ids) == unit.text_ids
        assert parsed.has_frame == unit.has_frame and parsed.n_audio_slots == 10
        assert ids[unit.decision_pos] == (SPEAK if unit.speak else LISTEN)


def test_labels_supervise_only_decisions_text_and_terminators():
    out = serialize_duplex(hello_there(), tokenizer(), lookahead_tokens=0)
    supervised = (out.labels != IGNORE_INDEX).nonzero().flatten().tolist()
    expected = []
    for unit in out.units:
        expected += list(range(unit.decision_pos, unit.end_pos - 1))
    assert supervised == expected
    assert out.labels[supervised].tolist() == [LISTEN, LISTEN, SPEAK, HELLO, CHUNK_EOS, SPEAK, THERE, TURN_EOS,
                                               CHUNK_EOS]
    ids = out.input_ids
    for never in (UNK, UNIT, UNIT_CLOSE, IMG, IMG_CLOSE):
        assert (out.labels[ids == never] == IGNORE_INDEX).all()
    assert (out.labels[: out.system_length] == IGNORE_INDEX).all()


def test_slot_counts_and_masks():
    out = serialize_duplex(hello_there(), tokenizer())
    n_frames = sum(u.has_frame for u in out.units)
    assert int(out.image_slot_mask.sum()) == 64 * n_frames
    assert int(out.audio_slot_mask.sum()) == 10 * len(out.units)
    for unit in out.units:
        span = slice(unit.start_pos, unit.end_pos)
        assert int(out.audio_slot_mask[span].sum()) == 10
        assert int(out.image_slot_mask[span].sum()) == (64 if unit.has_frame else 0)
        assert bool(out.audio_slot_mask[unit.decision_pos - 10 : unit.decision_pos].all())


def test_reference_audio_slots_in_system_prefix():
    out = serialize_duplex(hello_there(ref_audio=noise(2.0, seed=5)), tokenizer())
    prefix = out.input_ids[: out.system_length].tolist()
    assert prefix[-2:] == [AUDIO_END, IM_END] and prefix.count(UNK) == 20
    assert int(out.audio_slot_mask.sum()) == 20 + 10 * len(out.units)


def test_audio_chunks_one_per_unit_last_zero_padded():
    audio = noise(3.5)
    out = serialize_duplex(hello_there(audio_16k=audio, frames=[]), tokenizer(), lookahead_tokens=0)
    assert len(out.units) == len(out.audio_chunks) == 4
    assert all(chunk.shape == (16000,) for chunk in out.audio_chunks)
    np.testing.assert_array_equal(np.concatenate(out.audio_chunks)[:56000], audio)
    assert not out.audio_chunks[-1][8000:].any()


# ---- TAIL, look-ahead, cap --------------------------------------------------------------------------------
def test_tail_tokens_go_to_the_unit_of_their_start_time():
    times = [0.1, 0.5, 0.99, 1.0, 1.3, 3.05, 4.1]
    tokens = [TimedToken(1000 + i, t, t + 0.2) for i, t in enumerate(times)]
    sample = DuplexSample(audio_16k=noise(5.0), assistant_tokens=tokens)
    out = serialize_duplex(sample, tokenizer(), lookahead_tokens=0, turn_gap_s=5.0)
    assert [u.text_token_indices for u in out.units] == [[0, 1, 2], [3, 4], [], [5], [6]]
    assert [u.speak for u in out.units] == [True, True, True, True, True]  # unit 2: turn still open, no text
    assert out.units[2].text_ids == [] and out.input_ids[out.units[2].decision_pos + 1].item() == CHUNK_EOS
    assert [u.end_of_turn for u in out.units] == [False, False, False, False, True]


def test_gap_starts_a_new_turn_and_silence_is_listen():
    tokens = [TimedToken(1000, 0.2, 0.5), TimedToken(1001, 3.1, 3.4)]
    out = serialize_duplex(DuplexSample(audio_16k=noise(5.0), assistant_tokens=tokens), tokenizer())
    assert [u.speak for u in out.units] == [True, False, False, True, False]
    assert [u.end_of_turn for u in out.units] == [True, False, False, True, False]
    assert [u.turn_index for u in out.units] == [0, None, None, 1, None]


def test_lookahead_defers_speech_of_last_tokens():
    tokens = [TimedToken(1000 + i, 0.2 * i, 0.2 * (i + 1)) for i in range(10)]  # 5 tokens per unit, 0..2 s
    codes = np.arange(50)  # code i at i/25 s; token i owns codes [5i, 5i+5)
    sample = DuplexSample(audio_16k=noise(4.0), assistant_tokens=tokens, speech_codes=codes)
    no_lookahead = serialize_duplex(sample, tokenizer(), lookahead_tokens=0)
    assert no_lookahead.units[0].speech_codes == list(range(0, 25))
    assert no_lookahead.units[1].speech_codes == list(range(25, 50)) and no_lookahead.units[1].end_of_turn
    out = serialize_duplex(sample, tokenizer(), lookahead_tokens=2)
    # unit 0: tokens 0..4 emitted, speech of tokens 3 and 4 deferred -> codes of tokens 0..2
    assert out.units[0].speech_codes == list(range(0, 15))
    assert out.units[0].code_token_indices == [0] * 5 + [1] * 5 + [2] * 5
    # unit 1: the turn's text is complete, so everything is released; 25 codes at most per unit
    assert out.units[1].speech_codes == list(range(15, 40)) and not out.units[1].end_of_turn
    assert sorted(set(out.units[1].code_token_indices)) == [3, 4, 5, 6, 7]
    # unit 2: a speaking unit without text drains the rest and ends the turn
    assert out.units[2].text_ids == [] and out.units[2].speech_codes == list(range(40, 50))
    assert out.units[2].end_of_turn and out.units[2].speak
    assert not out.units[3].speak
    emitted = [code for unit in out.units for code in unit.speech_codes]
    assert emitted == list(range(50))  # nothing lost or repeated


def test_max_tokens_per_unit_cap_moves_overflow_to_next_unit():
    tokens = [TimedToken(1000 + i, 0.02 * i, 0.02 * i + 0.02) for i in range(25)]  # 25 tokens in unit 0
    sample = DuplexSample(audio_16k=noise(3.0), assistant_tokens=tokens)
    out = serialize_duplex(sample, tokenizer(), max_speak_tokens_per_unit=20)
    assert out.units[0].text_token_indices == list(range(18))  # <|speak|> + 18 + <|chunk_eos|> = 20 ids
    assert out.units[1].text_token_indices == list(range(18, 25)) and out.units[1].end_of_turn
    for unit in out.units:
        assert unit.end_pos - 1 - unit.decision_pos <= 20
    # exactly full last unit: <|turn_eos|> does not fit and moves to an otherwise empty speaking unit
    out = serialize_duplex(DuplexSample(audio_16k=noise(3.0), assistant_tokens=tokens[:18]), tokenizer())
    assert out.units[0].text_token_indices == list(range(18)) and not out.units[0].end_of_turn
    assert out.units[1].speak and out.units[1].text_ids == [] and out.units[1].end_of_turn


def test_force_listen_count_delays_early_tokens():
    tokens = [TimedToken(1000, 0.5, 0.8), TimedToken(1001, 1.5, 1.8)]
    out = serialize_duplex(DuplexSample(audio_16k=noise(4.0), assistant_tokens=tokens), tokenizer(),
                           force_listen_count=3, turn_gap_s=5.0)
    assert [u.speak for u in out.units] == [False, False, False, True]
    assert [u.forced_listen for u in out.units] == [True, True, True, False]
    assert out.units[3].text_token_indices == [0, 1] and out.units[3].end_of_turn


def test_pending_speech_after_audio_end_appends_silent_units():
    tokens = [TimedToken(1000, 1.5, 2.9)]
    sample = DuplexSample(audio_16k=noise(2.0), assistant_tokens=tokens, speech_codes=np.zeros(75, dtype=np.int64))
    out = serialize_duplex(sample, tokenizer(), lookahead_tokens=0)
    assert len(out.units) == 3 and out.units[-1].end_of_turn
    assert not out.audio_chunks[-1].any()
    assert sum(len(u.speech_codes) for u in out.units) == round((2.9 - 1.5) * 25)


def test_unit_seconds_two():
    tokens = [TimedToken(HELLO, 2.2, 2.6), TimedToken(THERE, 3.0, 3.6)]
    sample = DuplexSample(audio_16k=noise(4.0), frames=[(0.0, frame(0))], assistant_tokens=tokens,
                          speech_codes=np.arange(100, 150), speech_codes_start_s=2.0)
    out = serialize_duplex(sample, tokenizer(), unit_seconds=2.0, lookahead_tokens=0)
    assert len(out.units) == 2 and all(chunk.shape == (32000,) for chunk in out.audio_chunks)
    expected_unit1 = [UNIT] + frame_block() + [UNK] * 20 + [SPEAK, HELLO, THERE, TURN_EOS, CHUNK_EOS, UNIT_CLOSE]
    assert out.input_ids[out.units[1].start_pos : out.units[1].end_pos].tolist() == expected_unit1
    assert out.units[0].speak is False
    assert out.units[1].speech_codes == list(range(105, 140))  # <= 50 codes per 2-s unit
    assert int(out.audio_slot_mask.sum()) == 40


# ---- errors -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "overrides, error, message",
    [
        (dict(sampling_rate=24000), UnsupportedSamplingRateError, "24000 Hz"),
        (dict(assistant_tokens=[TimedToken(HELLO, 4.5, 4.7)]), TimelineMismatchError, "after the end"),
        (dict(frames=[(9.0, frame(0))]), TimelineMismatchError, "outside"),
        (dict(assistant_tokens=[TimedToken(HELLO, 2.5, 2.2)]), InvalidTimedTokenError, "ends before it starts"),
        (dict(assistant_tokens=[TimedToken(THERE, 3.0, 3.5), TimedToken(HELLO, 2.2, 2.6)]), UnsortedTokensError,
         "not sorted"),
        (dict(assistant_tokens=[TimedToken(SPEAK, 2.2, 2.6)]), InvalidTimedTokenError, "layout token"),
        (dict(speech_codes=np.arange(10)), SpeechCodesMismatchError, "speech codes cover"),
        (dict(speech_codes=np.full(50, 7000)), SpeechCodesMismatchError, r"\[0, 6561\)"),
        (dict(assistant_tokens=[]), SpeechCodesMismatchError, "no assistant tokens"),
    ],
)
def test_typed_errors(overrides, error, message):
    with pytest.raises(error, match=message):
        serialize_duplex(hello_there(**overrides), tokenizer())
    assert issubclass(error, ValueError)


def test_bad_unit_seconds():
    with pytest.raises(TimelineMismatchError, match="whole number"):
        serialize_duplex(hello_there(), tokenizer(), unit_seconds=1.00001)
    with pytest.raises(TimelineMismatchError, match="positive"):
        serialize_duplex(hello_there(), tokenizer(), unit_seconds=0)


# ---- encoder inputs ---------------------------------------------------------------------------------------
def test_one_second_piece_gives_ten_audio_tokens():
    extractor = processor().feature_extractor
    assert extractor.token_count(16000) == 10
    features = extractor([noise(1.0)])
    assert features["input_features"].shape == (1, 80, 100)


def test_model_inputs_match_slots():
    out = serialize_duplex(hello_there(ref_audio=noise(2.0, seed=5)), tokenizer())
    inputs = out.model_inputs(processor())
    n_units = len(out.units)
    assert inputs["input_ids"].shape == (1, out.input_ids.shape[0])
    assert torch.equal(inputs["labels"][0], out.labels)
    # ref (2 s, offline) + the unit audio as one streaming piece: 100 core frames per unit + 1 right-context frame
    assert inputs["input_features"].shape == (2, 80, 100 * n_units + 1)
    frames_per_piece = inputs["input_features_mask"].sum(-1).tolist()
    assert frames_per_piece == [200, 100 * n_units + 1]
    from minicpmo.processing.feature_extraction_minicpmo import frames_to_token_count

    assert sum(frames_to_token_count(n) for n in frames_per_piece) == int(out.audio_slot_mask.sum())
    n_frames = sum(u.has_frame for u in out.units)
    assert inputs["pixel_values"].shape[:3] == (n_frames, 3, 14)
    assert inputs["tgt_sizes"].shape == (n_frames, 2)
    assert int(out.image_slot_mask.sum()) == 64 * inputs["pixel_values"].shape[0]


def test_collate_pads_right_and_orders_features():
    first = serialize_duplex(hello_there(), tokenizer())
    second = serialize_duplex(hello_there(audio_16k=noise(6.0), frames=[]), tokenizer())
    batch = collate_duplex([first, second], processor())
    length = max(first.input_ids.shape[0], second.input_ids.shape[0])
    assert batch["input_ids"].shape == batch["labels"].shape == batch["attention_mask"].shape == (2, length)
    short = first.input_ids.shape[0]
    assert batch["attention_mask"][0].sum() == short and (batch["labels"][0, short:] == IGNORE_INDEX).all()
    # one streaming piece per session (both are far below the 29-unit cache reset), in batch order
    assert batch["input_features_mask"].sum(-1).tolist() == [100 * len(first.units) + 1, 100 * len(second.units) + 1]
    assert batch["pixel_values"].shape[0] == sum(u.has_frame for u in first.units)
    image, audio = duplex_slot_masks(batch["input_ids"].flatten().tolist())
    assert audio.sum() == 10 * (len(first.units) + len(second.units))


def test_tiny_model_encoders_fill_the_serialized_slots_exactly():
    from helpers import tiny_model

    from minicpmo.modeling.modeling_multimodal_merge import scatter_into_slots

    model = tiny_model()
    core = model.model
    out = serialize_duplex(hello_there(ref_audio=noise(1.5, seed=2)), tokenizer())
    inputs = out.model_inputs(processor())
    with torch.no_grad():
        audio = core.get_audio_features(inputs["input_features"], inputs["input_features_mask"]).pooler_output
        image = core.get_image_features(inputs["pixel_values"], inputs["tgt_sizes"]).pooler_output.flatten(0, 1)
        embeds = core.get_input_embeddings()(inputs["input_ids"])
        embeds = scatter_into_slots(embeds, out.image_slot_mask[None], image, "image")
        embeds = scatter_into_slots(embeds, out.audio_slot_mask[None], audio, "audio")
    assert audio.shape[0] == int(out.audio_slot_mask.sum()) == 15 + 10 * len(out.units)
    assert image.shape[0] == int(out.image_slot_mask.sum())
    first_unit = out.units[0]
    torch.testing.assert_close(embeds[0, first_unit.decision_pos - 10 : first_unit.decision_pos], audio[15:25])
