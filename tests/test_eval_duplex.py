"""Duplex metrics (Full-Duplex-Bench style) on hand-made events, and the `python -m minicpmo.eval_duplex` CLI."""

import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402

from minicpmo.duplex import metrics as dm  # noqa: E402
from minicpmo.synthetic import espeak_available  # noqa: E402


def _truth(episode_type, duration_s, turn_ends, speak_windows, must_listen, assistant_turns, **extra):
    truth = {
        "episode_type": episode_type, "duration_s": duration_s, "unit_seconds": 1.0,
        "user_turn_end_s": turn_ends, "must_listen": must_listen, "assistant_turns": assistant_turns,
        "speak_windows": [
            {"kind": kind, "earliest_s": start, "deadline_s": start + 0.8} for kind, start in speak_windows
        ],
        "expected_answer": None, "event_s": None, "interruption_s": None, "pause": None,
    }
    truth.update(extra)
    return truth


def _turn(text, start_s, end_s, interrupted=False):
    return {"text": text, "kind": "reply", "start_s": start_s, "end_s": end_s, "interrupted": interrupted}


QUESTION = _truth("question", 8, [3.4], [("answer", 3.4)], [[1.2, 3.4]], [_turn("There are two circles.", 3.9, 5.3)],
                  expected_answer="two")
PAUSE = _truth("pause", 9, [4.4], [("answer", 4.4)], [[1.5, 4.4]], [_turn("Yes, there is a square.", 4.8, 6.0)],
               expected_answer="yes", pause={"start_s": 2.0, "end_s": 2.9})
INTERRUPTION = _truth("interruption", 12, [3.2, 7.5], [("describe", 3.2)], [[6.0, 12.0]],
                      [_turn("I see a red square and", 3.6, 6.0, interrupted=True)], interruption_s=6.3,
                      stop_deadline_s=7.0)
WATCH = _truth("watch", 12, [3.0], [("acknowledge", 3.0), ("alert", 9.0)], [[1.0, 3.0], [4.6, 9.0]],
               [_turn("Okay, I am watching.", 3.5, 4.6), _turn("The square is red now.", 9.2, 10.4)],
               expected_answer="red", event_s=9)
EPISODES = (QUESTION, PAUSE, INTERRUPTION, WATCH)


def _constant(truth, action):
    return [{"unit": k, "time_s": float(k), "action": action, "text": "blah" if action == "speak" else "",
             "end_of_turn": False} for k in range(truth["duration_s"])]


def _shifted(truth, units):
    """Oracle behaviour `units` seconds late (text moves with its units)."""
    events = dm.oracle_events(truth)
    late = [dict(e, action="listen", text="", end_of_turn=False) for e in events]
    for event in events:
        target = event["unit"] + units
        if event["action"] == "speak" and target < len(late):
            late[target].update(action="speak", text=event["text"], end_of_turn=event["end_of_turn"])
    return late


def _score(make_events):
    per = [dm.episode_metrics(make_events(truth), truth) for truth in EPISODES]
    return per, dm.aggregate(per)


# ---------------------------------------------------------------- answers


@pytest.mark.parametrize("reply, expected, correct", [
    ("There are 2 circles.", "two", True),
    ("There are two circles.", "2", True),
    ("There are no squares.", "zero", True),
    ("I see none.", "zero", True),
    ("There are two or three circles.", "two", False),
    ("There are three circles.", "two", False),
    ("No, there is no square.", "no", True),
    ("Yes, there is a square.", "no", False),
    ("The circle is RED.", "red", True),
    ("It is red or blue.", "red", False),
    ("", "red", False),
    ("over the rainbow", "the rainbow", True),
])
def test_answer_matching_treats_digits_and_number_words_alike_and_rejects_hedges(reply, expected, correct):
    assert dm.answer_matches(reply, expected) is correct


# ---------------------------------------------------------------- oracle and bad behaviour


def test_oracle_events_reach_perfect_scores():
    per, metrics = _score(dm.oracle_events)
    assert metrics["answer_accuracy"] == 1.0 and metrics["n_answers"] == 2
    assert metrics["takeover_rate"] == 1.0 and metrics["n_turn_ends"] == 4
    # latency = first speaking unit start + 1 s unit delay - turn end: units 3, 4, 3, 3 for ends 3.4, 4.4, 3.2, 3.0
    assert metrics["takeover_latency_median_s"] == pytest.approx(0.7)  # median of 0.6, 0.6, 0.8, 1.0
    assert metrics["pause_takeover_rate"] == 0.0
    assert metrics["interruption_speaking_rate"] == 1.0 and metrics["interruption_stopped_rate"] == 1.0
    assert metrics["interruption_stop_latency_median_s"] == pytest.approx(7.0 - 6.3)
    assert metrics["proactive_hit_rate"] == 1.0 and metrics["proactive_delay_mean_s"] == pytest.approx(1.0)
    assert metrics["proactive_alert_correct"] == 1.0
    assert metrics["false_alarms_per_minute"] == 0.0 and metrics["must_listen_violations_per_minute"] == 0.0
    assert all(row["passed"] for row in dm.check_targets(metrics))
    replies = [turn["reply"] for episode in per for turn in episode["turns"] if "reply" in turn]
    assert replies == ["There are two circles.", "Yes, there is a square."]


def test_always_listening_takes_no_turns_and_raises_no_alarms():
    per, metrics = _score(lambda truth: _constant(truth, "listen"))
    assert metrics["answer_accuracy"] == 0.0 and metrics["takeover_rate"] == 0.0
    assert metrics["takeover_latency_median_s"] is None
    assert metrics["pause_takeover_rate"] == 0.0
    assert metrics["interruption_speaking_rate"] == 0.0 and metrics["interruption_stop_latency_median_s"] is None
    assert metrics["proactive_hit_rate"] == 0.0 and metrics["false_alarms_per_minute"] == 0.0
    passed = {row["metric"]: row["passed"] for row in dm.check_targets(metrics)}
    assert passed["answer_accuracy"] is False and passed["interruption_stop_latency_median_s"] is None
    assert passed["pause_takeover_rate"] is True and passed["false_alarms_per_minute"] is True


def test_always_speaking_takes_over_pauses_never_stops_and_false_alarms():
    per, metrics = _score(lambda truth: _constant(truth, "speak"))
    assert metrics["takeover_rate"] == 1.0 and metrics["answer_accuracy"] == 0.0
    assert metrics["pause_takeover_rate"] == 1.0
    interruption = per[2]["interruption"]
    assert interruption["speaking_at_onset"] and not interruption["stopped"]
    assert interruption["latency_s"] == pytest.approx(12 + 1 - 6.3)  # censored one unit past the end
    # watch: units 1-2 lie in [1, 3] and units 5-8 in [4.6, 9] -> two runs over 12 s
    assert per[3]["false_alarms"] == 2 and metrics["false_alarms_per_minute"] == pytest.approx(10.0)
    assert metrics["proactive_hit_rate"] == 1.0 and metrics["proactive_alert_correct"] == 0.0
    failed = {row["metric"] for row in dm.check_targets(metrics) if row["passed"] is False}
    assert failed == {"answer_accuracy", "pause_takeover_rate", "interruption_stop_latency_median_s",
                      "false_alarms_per_minute"}


def test_late_behaviour_raises_latency_and_misses_the_event():
    per, metrics = _score(lambda truth: _shifted(truth, 4))
    oracle = dm.aggregate([dm.episode_metrics(dm.oracle_events(t), t) for t in EPISODES])
    assert metrics["takeover_rate"] == 0.0  # 4 units late starts outside the 3 s take-over window
    assert metrics["proactive_hit_rate"] == 0.0
    per, metrics = _score(lambda truth: _shifted(truth, 1))
    assert metrics["takeover_latency_median_s"] == pytest.approx(oracle["takeover_latency_median_s"] + 1)
    assert metrics["proactive_hit_rate"] == 1.0 and metrics["proactive_delay_mean_s"] == pytest.approx(2.0)
    assert metrics["interruption_stop_latency_median_s"] == pytest.approx(8.0 - 6.3)
    assert not dm.episode_metrics(_shifted(WATCH, 2), WATCH)["proactive"]["hit"]  # unit 11 is past [9, 11)
    late = dm.episode_metrics(_shifted(WATCH, 2), WATCH, dm.MetricSettings(proactive_tolerance_s=4.0))
    assert late["proactive"]["hit"] and late["proactive"]["delay_s"] == pytest.approx(3.0)


def test_wrong_reply_text_is_scored_wrong_and_a_pause_barge_in_counts():
    events = dm.oracle_events(QUESTION)
    events[3]["text"] = "There are three circles."
    assert dm.episode_metrics(events, QUESTION)["turns"][0]["correct"] is False
    events = dm.oracle_events(PAUSE)
    events[2].update(action="speak", text="Is")  # unit [2, 3) has heard the pause start at 2.0
    metrics = dm.episode_metrics(events, PAUSE)
    assert metrics["pause_taken_over"] and metrics["must_listen_violations"] == 1
    events = dm.oracle_events(PAUSE)
    events[1].update(action="speak", text="Hm")  # unit [1, 2) ended before the pause: not a pause take-over
    assert dm.episode_metrics(events, PAUSE)["pause_taken_over"] is False


def test_bad_input_raises_typed_errors():
    with pytest.raises(dm.MetricInputError, match="action 'talk'"):
        dm.read_units([{"time_s": 0.0, "action": "talk"}])
    with pytest.raises(dm.MetricInputError, match="not after the previous unit"):
        dm.read_units([{"time_s": 1.0, "action": "listen"}, {"time_s": 1.0, "action": "listen"}])
    with pytest.raises(dm.MetricInputError, match="numeric 'time_s'"):
        dm.read_units([{"action": "listen"}])
    with pytest.raises(dm.MetricInputError, match="lacks"):
        dm.episode_metrics([], {"episode_type": "question"})
    with pytest.raises(dm.MetricInputError, match="takeover_window_s"):
        dm.MetricSettings(takeover_window_s=0)
    with pytest.raises(dm.MetricInputError, match="empty"):
        dm.answer_matches("two", "  ")


# ---------------------------------------------------------------- generated episodes and the CLI


needs_espeak = pytest.mark.skipif(not espeak_available(), reason="espeak-ng is not installed")


@needs_espeak
def test_oracle_is_perfect_on_generated_heldout_episodes():
    from minicpmo.synthetic import generate_episodes

    episodes = generate_episodes(5, 11, split="heldout")
    metrics = dm.aggregate([dm.episode_metrics(dm.oracle_events(e.ground_truth), e.ground_truth) for e in episodes])
    assert all(row["passed"] for row in dm.check_targets(metrics)), metrics


def test_evaluate_rejects_an_empty_set_and_a_bad_plot_index():
    from minicpmo.duplex.evaluate import EvaluationError, evaluate, pick_plot_episode

    with pytest.raises(EvaluationError, match="at least one episode"):
        evaluate(None, None, [])
    with pytest.raises(EvaluationError, match="out of range"):
        pick_plot_episode([], 3)


@needs_espeak
def test_cli_writes_report_and_timeline(tmp_path, capsys):
    from minicpmo.duplex.evaluate import main
    from minicpmo.export import main as export_main

    model_dir, out = tmp_path / "tiny", tmp_path / "eval"
    export_main(["--tiny", str(model_dir)])
    report = main(["--model", str(model_dir), "--n", "2", "--seed", "3", "--types", "pause", "chitchat",
                   "--out", str(out)])
    printed = capsys.readouterr().out
    assert "pause handling take-over rate" in printed and "oracle" in printed
    saved = json.loads((out / "report.json").read_text())
    assert saved["n_episodes"] == 2 and saved["episode_types"] == {"pause": 1, "chitchat": 1}
    assert saved["metrics"] == report["metrics"] and len(saved["targets"]) == len(dm.TARGETS)
    assert saved["metrics"]["n_pauses"] == 1 and saved["metrics"]["n_watch"] == 0
    assert saved["metrics"]["answer_accuracy"] in (0.0, 1.0) and 0.0 <= saved["metrics"]["takeover_rate"] <= 1.0
    assert all(row["passed"] is not False for row in dm.check_targets(saved["oracle_metrics"]))
    for episode in saved["per_episode"]:
        assert [e["unit"] for e in episode["events"]] == list(range(int(episode["duration_s"])))
        assert {e["action"] for e in episode["events"]} <= {"listen", "speak"}
    assert saved["controls"]["generate_audio"] is False
    png = (out / "timeline.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    assert saved["timeline"]["episode_id"] in {e["episode_id"] for e in saved["per_episode"]}
