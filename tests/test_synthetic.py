"""Synthetic duplex world: scenes, espeak speech, episodes with ground truth, DuplexSample conversion, disk format."""

import math
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import pytest
from PIL import Image

from minicpmo.processing.duplex_serializer_minicpmo import TimedToken, serialize_duplex
from minicpmo.synthetic import speech
from minicpmo.synthetic.alignment import align_tokens
from minicpmo.synthetic.dataset import (
    HELDOUT_VOICE_NAMES,
    TRAIN_VOICE_NAMES,
    DatasetError,
    default_tokenizer,
    episode_to_duplex_sample,
    generate_episodes,
    load_episodes,
    main,
    save_episodes,
)
from minicpmo.synthetic.episodes import ACKNOWLEDGEMENTS, EPISODE_TYPES, EpisodeError, TimingConfig
from minicpmo.synthetic.scenes import (
    COLOURS,
    SceneError,
    SceneEvent,
    SceneObject,
    SceneQuestion,
    SceneState,
    SceneTimeline,
    answer_question,
    render,
)
from minicpmo.synthetic.speech import SAMPLE_RATE, Utterance, Voice, WordTiming


needs_espeak = pytest.mark.skipif(not speech.espeak_available(), reason="espeak-ng is not installed")


# ---------------------------------------------------------------- scenes (no espeak)


def _timeline() -> SceneTimeline:
    initial = (
        SceneObject(0, "square", "red", cell=0),
        SceneObject(1, "circle", "blue", cell=4),
        SceneObject(2, "circle", "green", cell=8),
    )
    timeline = SceneTimeline(initial)
    timeline.add_event(SceneEvent(3, "colour", 0, colour="yellow"))
    timeline.add_event(SceneEvent(5, "disappear", 1))
    timeline.add_event(SceneEvent(2, "appear", 3, obj=SceneObject(3, "triangle", "red", cell=2)))
    return timeline


def test_scene_state_follows_events_at_whole_seconds():
    timeline = _timeline()
    assert [e.time_s for e in timeline.events] == [2, 3, 5]
    assert timeline.state_at(2.99).find(0).colour == "red"
    assert timeline.state_at(3).find(0).colour == "yellow"
    assert answer_question(timeline.state_at(4), SceneQuestion("count_shape", shape="circle")) == (
        "two", "There are two circles.")
    assert answer_question(timeline.state_at(5), SceneQuestion("count_shape", shape="circle")) == (
        "one", "There is one circle.")
    assert answer_question(timeline.state_at(0), SceneQuestion("exists_shape", shape="triangle"))[0] == "no"
    assert answer_question(timeline.state_at(2), SceneQuestion("exists_shape", shape="triangle"))[0] == "yes"
    assert answer_question(timeline.state_at(2), SceneQuestion("count_colour", colour="red"))[0] == "two"
    assert answer_question(timeline.state_at(3), SceneQuestion("shape_colour", shape="square")) == (
        "yellow", "The square is yellow.")
    assert SceneTimeline.from_dict(timeline.to_dict()) == timeline


def test_scene_errors_are_typed():
    timeline = _timeline()
    with pytest.raises(SceneError, match="ambiguous"):
        answer_question(timeline.state_at(0), SceneQuestion("shape_colour", shape="circle"))
    with pytest.raises(SceneError, match="absent object"):
        timeline.add_event(SceneEvent(6, "colour", 1, colour="red"))  # object 1 disappeared at 5 s
    with pytest.raises(SceneError, match="occupied cell"):
        timeline.add_event(SceneEvent(1, "appear", 9, obj=SceneObject(9, "circle", "red", cell=4)))
    with pytest.raises(SceneError, match="unknown colour"):
        timeline.add_event(SceneEvent(1, "colour", 0, colour="pink"))
    assert [e.time_s for e in timeline.events] == [2, 3, 5]  # failed inserts leave the timeline unchanged


def test_render_draws_objects_in_their_cells():
    state = SceneState((SceneObject(0, "square", "red", cell=0), SceneObject(1, "circle", "blue", cell=8)))
    image = render(state, size=96)
    assert image.size == (96, 96) and image.mode == "RGB"
    assert image.getpixel((16, 16)) == COLOURS["red"]
    assert image.getpixel((80, 80)) == COLOURS["blue"]
    assert image.getpixel((48, 48)) != COLOURS["red"]  # empty centre cell shows the background


def test_alignment_maps_tokens_onto_word_times():
    text = "There are two circles."
    words, cursor = [], 0.0
    for match_start, word in ((0, "There"), (6, "are"), (10, "two"), (14, "circles.")):
        words.append(WordTiming(word, match_start, match_start + len(word), cursor, cursor + 0.3))
        cursor += 0.4
    utterance = Utterance(text, Voice("en-us"), np.zeros(int(cursor * SAMPLE_RATE), np.float32), words)
    tokenizer = default_tokenizer()
    tokens = align_tokens(utterance, tokenizer, offset_s=2.0)
    assert [t.token_id for t in tokens] == tokenizer(text, add_special_tokens=False)["input_ids"]
    starts = [t.start_s for t in tokens]
    assert starts == sorted(starts) and all(t.end_s >= t.start_s for t in tokens)
    assert tokens[0].start_s == pytest.approx(2.0) and tokens[-1].end_s == pytest.approx(2.0 + 1.2 + 0.3)
    assert all(later.start_s >= earlier.end_s - 1e-9 for earlier, later in zip(tokens, tokens[1:]))


def test_timing_config_rejects_pauses_as_long_as_a_turn():
    with pytest.raises(EpisodeError, match="turn_threshold_s"):
        TimingConfig(pause_s=(0.5, 2.0), turn_threshold_s=1.5).validate()


def test_missing_espeak_gives_a_clear_error(monkeypatch):
    monkeypatch.setattr(speech.shutil, "which", lambda name: None)
    with pytest.raises(speech.EspeakNotFoundError, match="apt-get install espeak-ng"):
        speech.synthesize("hello there", Voice("en-us"))


def test_bad_dataset_arguments():
    with pytest.raises(DatasetError, match="unknown split"):
        generate_episodes(1, 0, split="validation")
    with pytest.raises(EpisodeError, match="types"):
        generate_episodes(1, 0, types=("karaoke",))
    assert not set(TRAIN_VOICE_NAMES) & set(HELDOUT_VOICE_NAMES)


# ---------------------------------------------------------------- speech and episodes (espeak)


@needs_espeak
def test_synthesize_gives_16k_audio_with_word_timings():
    utterance = speech.synthesize("How many circles, please?", Voice("en-gb+f2", 160))
    assert utterance.audio.dtype == np.float32 and utterance.audio.ndim == 1
    assert np.abs(utterance.audio).max() == pytest.approx(speech.TARGET_PEAK, rel=1e-4)
    assert [w.word for w in utterance.words] == ["How", "many", "circles,", "please?"]
    for word in utterance.words:
        piece = utterance.audio[int(word.start_s * SAMPLE_RATE) : int(word.end_s * SAMPLE_RATE)]
        assert np.sqrt(np.mean(piece**2)) > 0.02  # word spans hold voiced audio
    gaps = [b.start_s - a.end_s for a, b in zip(utterance.words, utterance.words[1:])]
    assert all(gap > 0 for gap in gaps) and gaps[2] > gaps[1] + 0.1  # the comma adds a pause
    assert utterance.words[-1].end_s == pytest.approx(utterance.duration_s)
    faster = speech.synthesize("How many circles, please?", Voice("en-gb+f2", 260))
    assert faster.duration_s < utterance.duration_s
    with pytest.raises(speech.SpeechSynthesisError, match="voice name"):
        speech.synthesize("hello", Voice("en-us; rm -rf"))
    with pytest.raises(speech.SpeechSynthesisError, match="does not exist|espeak-ng failed"):
        speech.synthesize("hello", Voice("xx-nonexistent"))


@pytest.fixture(scope="module")
def episodes():
    if not speech.espeak_available():
        pytest.skip("espeak-ng is not installed")
    return generate_episodes(len(EPISODE_TYPES), seed=0, split="train")


def _state_key(state):
    return tuple((o.object_id, o.shape, o.colour, o.cell) for o in state.objects)


def _by_type(episodes, kind):
    return next(e for e in episodes if e.episode_type == kind)


@needs_espeak
def test_generation_is_deterministic_per_seed(episodes):
    again = generate_episodes(2, seed=0, split="train")
    for first, second in zip(episodes, again):
        assert first.episode_id == second.episode_id
        assert np.array_equal(first.user_audio, second.user_audio)
        assert np.array_equal(first.assistant_audio, second.assistant_audio)
        assert first.assistant_tokens == second.assistant_tokens
        assert first.ground_truth == second.ground_truth
        assert first.scene == second.scene
    other = generate_episodes(1, seed=1, split="train")[0]
    assert not (other.user_audio.shape == episodes[0].user_audio.shape
                and np.array_equal(other.user_audio, episodes[0].user_audio))


@needs_espeak
def test_tracks_and_frames_cover_the_episode(episodes):
    assert sorted(e.episode_type for e in episodes) == sorted(EPISODE_TYPES)
    for episode in episodes:
        samples = episode.duration_s * SAMPLE_RATE
        assert isinstance(episode.duration_s, int) and episode.duration_s >= TimingConfig().min_duration_s
        assert episode.user_audio.shape == (samples,) and episode.user_audio.dtype == np.float32
        assert episode.assistant_audio.shape == (samples,) and episode.assistant_audio.dtype == np.float32
        assert [t for t, _ in episode.frames] == [float(t) for t in range(episode.duration_s)]  # 1 fps
        for time_s, frame in episode.frames:
            assert frame.size == (224, 224)
            assert np.array_equal(np.asarray(frame), np.asarray(render(episode.scene.state_at(time_s))))
        for segment in episode.user_segments:  # user speech where the segments say, noise floor elsewhere
            piece = episode.user_audio[int(segment.start_s * SAMPLE_RATE) : int(segment.end_s * SAMPLE_RATE)]
            assert np.sqrt(np.mean(piece**2)) > 0.02
        head = episode.user_audio[: int(episode.user_segments[0].start_s * SAMPLE_RATE)]
        assert np.sqrt(np.mean(head**2)) < 0.005
        for turn in episode.assistant_turns:
            piece = episode.assistant_audio[int(turn.start_s * SAMPLE_RATE) : int(turn.end_s * SAMPLE_RATE)]
            assert np.sqrt(np.mean(piece**2)) > 0.02
        spoken = np.zeros(samples, bool)
        for turn in episode.assistant_turns:
            spoken[int(turn.start_s * SAMPLE_RATE) : int(math.ceil(turn.end_s * SAMPLE_RATE))] = True
        assert not np.any(episode.assistant_audio[~spoken])


@needs_espeak
def test_assistant_tokens_respect_listen_and_speak_windows(episodes):
    tokenizer = default_tokenizer()
    for episode in episodes:
        truth = episode.ground_truth
        tokens = episode.assistant_tokens
        assert tokens == sorted(tokens, key=lambda t: t.start_s)
        for turn in episode.assistant_turns:
            assert turn.tokens and all(isinstance(t, TimedToken) for t in turn.tokens)
            assert turn.tokens[0].start_s == pytest.approx(turn.start_s)
            assert turn.tokens[-1].end_s <= turn.end_s + 1e-6
            assert tokenizer.decode([t.token_id for t in turn.tokens]).strip() == turn.text
        for low, high in truth["must_listen"]:
            assert not [t for t in tokens if low <= t.start_s < high], (episode.episode_type, low, high)
        turn_starts = [turn.start_s for turn in episode.assistant_turns]
        assert len(truth["speak_windows"]) == len(turn_starts)
        for window, start in zip(truth["speak_windows"], turn_starts):
            assert window["earliest_s"] <= start <= window["deadline_s"], (episode.episode_type, window, start)
        for user_end, start in zip(truth["user_turn_end_s"], turn_starts):  # take-over after the user stops
            assert start > user_end


@needs_espeak
def test_question_answers_match_the_scene_at_question_time(episodes):
    for kind in ("question", "pause"):
        episode = _by_type(episodes, kind)
        truth = episode.ground_truth
        question = SceneQuestion(truth["question"]["kind"], truth["question"]["shape"], truth["question"]["colour"])
        asked_at = truth["user_turn_end_s"][-1]
        assert truth["question"]["asked_at_s"] == asked_at
        expected, reply = answer_question(episode.scene.state_at(asked_at), question)
        assert (truth["expected_answer"], truth["expected_reply"]) == (expected, reply)
        assert episode.assistant_turns[-1].text == reply and truth["response"] == "answer"
        first_start = episode.user_segments[0].start_s
        assert _state_key(episode.scene.state_at(first_start)) == _state_key(
            episode.scene.state_at(episode.assistant_turns[-1].end_s))  # the scene holds still meanwhile
        spoken = " ".join(segment.text for segment in episode.user_segments)
        assert spoken == question.text()


@needs_espeak
def test_pause_is_mid_sentence_and_shorter_than_a_turn(episodes):
    episode = _by_type(episodes, "pause")
    truth = episode.ground_truth
    prefix, suffix = episode.user_segments
    assert (prefix.role, suffix.role) == ("pause_prefix", "pause_suffix")
    assert truth["pause"] == {"start_s": prefix.end_s, "end_s": suffix.start_s}
    assert 0 < suffix.start_s - prefix.end_s < truth["turn_threshold_s"]
    assert not prefix.text.endswith("?") and suffix.text.endswith("?")
    assert truth["user_turn_end_s"] == [suffix.end_s]  # the pause is not a turn end


@needs_espeak
def test_chitchat_gets_a_short_acknowledgement(episodes):
    episode = _by_type(episodes, "chitchat")
    truth = episode.ground_truth
    assert truth["response"] == "acknowledge" and truth["expected_answer"] is None
    (turn,) = episode.assistant_turns
    assert turn.kind == "acknowledge" and turn.text in ACKNOWLEDGEMENTS


@needs_espeak
def test_interruption_stops_the_assistant_within_the_unit(episodes):
    for episode in episodes + generate_episodes(3, seed=7, split="train", types=("interruption",)):
        if episode.episode_type != "interruption":
            continue
        truth = episode.ground_truth
        onset = truth["interruption_s"]
        stop_unit = math.floor(onset)
        interrupted = episode.assistant_turns[0]
        assert interrupted.kind == "describe" and interrupted.interrupted
        assert interrupted.start_s < stop_unit and truth["assistant_stop_s"] == interrupted.end_s <= stop_unit
        assert all(t.start_s < stop_unit and t.end_s <= stop_unit for t in interrupted.tokens)
        assert truth["stop_deadline_s"] == stop_unit + 1 and 0.05 <= onset - stop_unit <= 0.5
        segment = next(s for s in episode.user_segments if s.role == "interruption")
        assert segment.start_s == onset
        if truth["interruption_kind"] == "stop":
            assert len(episode.assistant_turns) == 1 and truth["must_listen"] == [[stop_unit, episode.duration_s]]
        else:
            question = SceneQuestion(truth["question"]["kind"], truth["question"]["shape"],
                                     truth["question"]["colour"])
            expected, reply = answer_question(episode.scene.state_at(segment.end_s), question)
            assert truth["expected_answer"] == expected and episode.assistant_turns[1].text == reply
            assert episode.assistant_turns[1].start_s > segment.end_s


@needs_espeak
def test_watch_event_time_is_the_colour_change_and_alert_is_proactive(episodes):
    for episode in episodes + generate_episodes(3, seed=11, split="heldout", types=("watch",)):
        if episode.episode_type != "watch":
            continue
        truth = episode.ground_truth
        event_s, target = truth["event_s"], truth["event"]
        colour = lambda t: episode.scene.state_at(t).find(target["object_id"]).colour  # noqa: E731
        assert colour(event_s) == target["colour"] == truth["watch"]["colour"]
        request_start = episode.user_segments[0].start_s
        assert all(colour(t) != target["colour"] for t in range(int(request_start), event_s))
        assert colour(request_start) != target["colour"]
        alert = episode.assistant_turns[-1]
        assert alert.kind == "alert" and alert.text == f"The square is {target['colour']} now."
        assert event_s <= alert.tokens[0].start_s < event_s + 1
        before = [t for t in episode.assistant_tokens if episode.assistant_turns[0].end_s <= t.start_s < event_s]
        assert not before  # no false alarm between the acknowledgement and the event
        assert event_s < episode.duration_s


@needs_espeak
def test_duplex_sample_serializes_with_speak_units_where_expected(episodes):
    tokenizer = default_tokenizer()
    speak_id = tokenizer.convert_tokens_to_ids("<|speak|>")
    listen_id = tokenizer.convert_tokens_to_ids("<|listen|>")
    for episode in episodes:
        serialized = serialize_duplex(episode_to_duplex_sample(episode), tokenizer)
        units = serialized.units
        assert len(units) == episode.duration_s
        assert all(unit.has_frame for unit in units)
        for turn in episode.assistant_turns:
            unit = units[math.floor(turn.start_s)]
            assert unit.speak and unit.text_ids
            assert serialized.labels[unit.decision_pos] == speak_id
        emitted = [i for unit in units for i in unit.text_token_indices]
        assert emitted == list(range(len(episode.assistant_tokens)))
        for low, high in episode.ground_truth["must_listen"]:
            for unit in units[math.ceil(low) : math.floor(high)]:
                assert not unit.speak and serialized.labels[unit.decision_pos] == listen_id
        n_turns = sum(unit.end_of_turn for unit in units)
        assert n_turns == len(episode.assistant_turns)
    # with 25 Hz speech codes of the assistant track the sample serializes too and every code is emitted
    episode = _by_type(episodes, "watch")
    codes = np.random.default_rng(0).integers(0, 6561, episode.duration_s * 25)
    serialized = serialize_duplex(episode_to_duplex_sample(episode, speech_codes=codes), tokenizer)
    emitted_codes = [code for unit in serialized.units for code in unit.speech_codes]
    assert emitted_codes and set(emitted_codes) <= set(codes.tolist())
    assert serialized.units[episode.ground_truth["event_s"]].speak


@needs_espeak
def test_heldout_split_uses_other_voices_and_streams():
    heldout = generate_episodes(4, seed=0, split="heldout")
    train = generate_episodes(4, seed=0, split="train", types=("chitchat",))
    assert all(e.user_voice.name in HELDOUT_VOICE_NAMES for e in heldout)
    assert all(e.user_voice.name in TRAIN_VOICE_NAMES for e in train)
    assert all(e.ground_truth["user_voice"]["name"] == e.user_voice.name for e in heldout)
    assert heldout[0].episode_id == "heldout-0-00000"
    assert all(e.ground_truth["assistant_voice"] == heldout[0].ground_truth["assistant_voice"] for e in train)


@needs_espeak
def test_save_load_round_trip_and_cli(episodes, tmp_path):
    path = save_episodes(episodes[:3], tmp_path / "data")
    loaded = load_episodes(tmp_path / "data")
    assert len(loaded) == 3 and os.path.isfile(path)
    for original, restored in zip(episodes, loaded):
        assert restored.episode_id == original.episode_id and restored.duration_s == original.duration_s
        assert np.array_equal(restored.user_audio, original.user_audio)
        assert np.array_equal(restored.assistant_audio, original.assistant_audio)
        assert restored.assistant_tokens == original.assistant_tokens
        assert restored.ground_truth == original.ground_truth and restored.scene == original.scene
        assert restored.user_segments == original.user_segments and restored.user_voice == original.user_voice
        for (t0, a), (t1, b) in zip(original.frames, restored.frames):
            assert t0 == t1 and isinstance(b, Image.Image) and np.array_equal(np.asarray(a), np.asarray(b))
    with pytest.raises(DatasetError, match="episodes.jsonl"):
        load_episodes(tmp_path / "nothing")
    main(["--out", str(tmp_path / "cli"), "--n", "2", "--seed", "5", "--split", "heldout", "--types", "chitchat"])
    cli = load_episodes(tmp_path / "cli")
    assert [e.episode_id for e in cli] == ["heldout-5-00000", "heldout-5-00001"]
    assert all(e.episode_type == "chitchat" for e in cli)
