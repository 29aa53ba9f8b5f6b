"""Duplex behaviour metrics over per-unit events and synthetic ground truth (Full-Duplex-Bench style).

Pure functions: no model, no audio. `events` are the per-unit dicts of `minicpmo.duplex.replay.replay`
(`unit`, `time_s` = start of the unit, `action` "listen" | "speak", `text`, `end_of_turn`); `ground_truth` is
`Episode.ground_truth` from `minicpmo.synthetic`.

Timing convention. A unit k covers the input [t_k, t_k + u) with u = `unit_seconds` (1 s). Its listen/speak
decision is taken after the model has heard that whole second, so the speech a speaking unit produces can be
played no earlier than t_k + u: the *playback start* of a speaking unit is t_k + u. A decision "sees" a moment t
when t < t_k + u. A unit counts as speaking when its action is "speak" (one speaking unit = 1 s of output, which
is a taken turn under the Full-Duplex-Bench rule "taken unless shorter than 1 s and at most 3 words").

Definitions (all times in seconds):
- Take-over (Full-Duplex-Bench "smooth turn-taking"): for every turn end T the assistant should answer (the
  `earliest_s` of each ground-truth speak window except proactive alerts), the take-over unit is the first speaking
  unit that sees T (t_k + u > T) and starts before T + `takeover_window_s`. Take-over rate = taken / turn ends.
  Latency = playback start - T = t_k + u - T (Full-Duplex-Bench: output speech start - user turn end, floored at 0;
  it is > 0 by construction here). Reported as median and mean over taken turns.
- Answer accuracy: for every speak window of kind "answer" (its question has `expected_answer`), the reply text is
  the text of the take-over unit and the speaking units that follow it without a listen unit in between, up to and
  including the first unit that ends the turn. It is correct when its words contain the expected answer and no
  competing value of the same kind: numbers (digits and number words are the same value, and for a number answer
  "no" / "none" mean zero, as in "There are no squares."), colours, or yes/no. A missing reply is wrong.
- Pause handling (Full-Duplex-Bench "pause handling" TOR, lower is better): a pause episode is taken over when a
  speaking unit sees the pause start (t_k + u > pause start) but ends no later than the user's final turn end
  (t_k + u <= T): the model spoke while the sentence was unfinished.
- Interruption stop latency (Full-Duplex-Bench "user interruption" / v1.5 stop latency): at onset I the model is
  speaking when the unit whose speech is playing at I (t_k + u <= I < t_k + 2u) is a speaking unit. The stop unit
  is the first listen unit that sees I; its playback start t_k + u is when the model's speech stops, and
  stop latency = t_k + u - I. A model that never stops is censored at one unit past the episode end. Only
  interruptions where the model was speaking count; `interruption_speaking_rate` says how many did.
- Proactive hit: in a watch episode the model hits when a speaking unit starts in [event_s, event_s + tolerance);
  delay = playback start of that unit - event_s. `proactive_alert_correct` checks the alert text names the
  watched colour.
- False alarms: a false alarm is a maximal run of consecutive speaking units that each lie entirely inside a
  ground-truth `must_listen` window (no assistant token may start there: the user is talking, or the model should
  be watching silently). False alarms per minute = runs in watch episodes / watch minutes;
  `must_listen_violations_per_minute` is the same count over every episode type.
"""

from __future__ import annotations

import math
import re
import statistics
from dataclasses import asdict, dataclass

from ..errors import DuplexError
from ..synthetic.scenes import COLOURS, NUMBER_WORDS


class MetricInputError(DuplexError):
    """Events or ground truth that the metrics cannot read (missing keys, unknown action, unsorted units)."""


@dataclass(frozen=True)
class MetricSettings:
    """Tolerances of the metric definitions (see the module docstring)."""

    takeover_window_s: float = 3.0
    proactive_tolerance_s: float = 2.0

    def __post_init__(self):
        for name in ("takeover_window_s", "proactive_tolerance_s"):
            if not getattr(self, name) > 0:
                raise MetricInputError(f"{name} must be > 0, got {getattr(self, name)}")


@dataclass(frozen=True)
class Target:
    """A goal for one aggregate metric: `value <op> threshold` passes."""

    metric: str
    op: str  # ">=" or "<="
    threshold: float
    label: str

    def passes(self, value) -> bool | None:
        if value is None:
            return None
        return value >= self.threshold if self.op == ">=" else value <= self.threshold


TARGETS = (
    Target("answer_accuracy", ">=", 0.8, "answer accuracy"),
    Target("takeover_rate", ">=", 0.9, "turn-taking take-over rate"),
    Target("takeover_latency_median_s", "<=", 1.5, "turn-taking latency, median (s)"),
    Target("pause_takeover_rate", "<=", 0.2, "pause handling take-over rate"),
    Target("interruption_stop_latency_median_s", "<=", 1.5, "interruption stop latency, median (s)"),
    Target("proactive_hit_rate", ">=", 0.8, "proactive hit rate"),
    Target("false_alarms_per_minute", "<=", 0.1, "proactive false alarms per minute"),
)

_ACTIONS = ("listen", "speak")
_DIGITS = {str(value): word for value, word in enumerate(NUMBER_WORDS)}
_YES_NO = ("yes", "no")


# ---------------------------------------------------------------- inputs


@dataclass(frozen=True)
class Unit:
    """One unit of the event stream, normalised."""

    start_s: float
    speaking: bool
    text: str
    end_of_turn: bool


def read_units(events: list[dict]) -> list[Unit]:
    """Validate replay events and return them as `Unit`s, in time order."""
    units = []
    for index, event in enumerate(events):
        try:
            action, start = event["action"], float(event["time_s"])
        except (KeyError, TypeError, ValueError) as error:
            raise MetricInputError(f"event {index} needs 'action' and a numeric 'time_s' ({error!r})") from error
        if action not in _ACTIONS:
            raise MetricInputError(f"event {index} has action {action!r}; expected one of {_ACTIONS}")
        if units and start <= units[-1].start_s:
            raise MetricInputError(f"event {index} starts at {start} s, not after the previous unit")
        units.append(Unit(start, action == "speak", str(event.get("text") or ""), bool(event.get("end_of_turn"))))
    return units


def _unit_seconds(ground_truth: dict) -> float:
    return float(ground_truth.get("unit_seconds", 1.0))


def _require(ground_truth: dict, *keys: str) -> None:
    missing = [key for key in keys if key not in ground_truth]
    if missing:
        raise MetricInputError(f"ground truth lacks {missing}; expected an Episode.ground_truth dict")


# ---------------------------------------------------------------- answers


def words(text: str) -> list[str]:
    """Lower-case words with digits spelled out (`3` -> `three`); punctuation dropped."""
    return [_DIGITS.get(token, token) for token in re.findall(r"[a-z0-9]+", text.lower())]


def _answer_class(expected: str) -> tuple[str, ...] | None:
    if expected in NUMBER_WORDS:
        return NUMBER_WORDS
    if expected in COLOURS:
        return tuple(COLOURS)
    if expected in _YES_NO:
        return _YES_NO
    return None


def answer_matches(reply: str, expected: str) -> bool:
    """The reply names the expected answer and no competing value of its kind (see module docstring)."""
    expected = " ".join(words(str(expected)))
    if not expected:
        raise MetricInputError("expected answer is empty")
    reply_words = words(reply)
    values = _answer_class(expected)
    if values is None:  # free-form answer: whole-word containment
        return f" {expected} " in f" {' '.join(reply_words)} "
    if values is NUMBER_WORDS:
        reply_words = ["zero" if word in ("no", "none") else word for word in reply_words]
    named = {word for word in reply_words if word in values}
    return named == {expected}


# ---------------------------------------------------------------- per-turn metrics


@dataclass(frozen=True)
class TakeOver:
    taken: bool
    unit_start_s: float | None = None
    latency_s: float | None = None


def takeover(units: list[Unit], turn_end_s: float, unit_s: float = 1.0, window_s: float = 3.0) -> TakeOver:
    """First speaking unit that has heard the turn end and starts within the window."""
    for unit in units:
        if unit.speaking and unit.start_s + unit_s > turn_end_s and unit.start_s < turn_end_s + window_s:
            return TakeOver(True, unit.start_s, max(0.0, unit.start_s + unit_s - turn_end_s))
    return TakeOver(False)


def reply_text(units: list[Unit], first_start_s: float) -> str:
    """Text of the speaking run that begins at `first_start_s`, up to the listen unit or the turn end."""
    parts = []
    for unit in units:
        if unit.start_s < first_start_s:
            continue
        if not unit.speaking:
            break
        parts.append(unit.text.strip())
        if unit.end_of_turn:
            break
    return " ".join(part for part in parts if part)


def pause_taken_over(units: list[Unit], pause_start_s: float, turn_end_s: float, unit_s: float = 1.0) -> bool:
    """A speaking unit that heard the pause start but ended before the user's sentence did."""
    return any(u.speaking and pause_start_s < u.start_s + unit_s <= turn_end_s for u in units)


@dataclass(frozen=True)
class InterruptionStop:
    speaking_at_onset: bool
    stopped: bool = False
    latency_s: float | None = None


def interruption_stop(units: list[Unit], onset_s: float, unit_s: float = 1.0) -> InterruptionStop:
    """Was the model speaking at the onset, and when does its speech stop (censored past the end)."""
    playing = [u for u in units if u.start_s + unit_s <= onset_s < u.start_s + 2 * unit_s]
    if not playing or not playing[0].speaking:
        return InterruptionStop(False)
    for unit in units:
        if not unit.speaking and unit.start_s + unit_s > onset_s:
            return InterruptionStop(True, True, unit.start_s + unit_s - onset_s)
    censored_start = (units[-1].start_s + unit_s) if units else onset_s
    return InterruptionStop(True, False, censored_start + unit_s - onset_s)


@dataclass(frozen=True)
class ProactiveHit:
    hit: bool
    delay_s: float | None = None
    text: str = ""


def proactive_hit(units: list[Unit], event_s: float, tolerance_s: float = 2.0, unit_s: float = 1.0) -> ProactiveHit:
    for unit in units:
        if unit.speaking and event_s <= unit.start_s < event_s + tolerance_s:
            return ProactiveHit(True, unit.start_s + unit_s - event_s, reply_text(units, unit.start_s))
    return ProactiveHit(False)


def false_alarms(units: list[Unit], must_listen: list, unit_s: float = 1.0) -> int:
    """Maximal runs of speaking units that each lie entirely inside a must-listen window."""
    runs, inside_run = 0, False
    for unit in units:
        violating = unit.speaking and any(
            start <= unit.start_s and unit.start_s + unit_s <= end for start, end in must_listen
        )
        if violating and not inside_run:
            runs += 1
        inside_run = violating
    return runs


# ---------------------------------------------------------------- per episode and aggregate


def episode_metrics(events: list[dict], ground_truth: dict, settings: MetricSettings | None = None) -> dict:
    """Every metric that applies to one episode (JSON-ready)."""
    settings = settings or MetricSettings()
    _require(ground_truth, "episode_type", "duration_s", "speak_windows", "must_listen", "user_turn_end_s")
    units = read_units(events)
    unit_s = _unit_seconds(ground_truth)
    episode_type = ground_truth["episode_type"]
    result: dict = {
        "episode_type": episode_type,
        "duration_s": float(ground_truth["duration_s"]),
        "speaking_units": sum(u.speaking for u in units),
        "turns": [],
        "must_listen_violations": false_alarms(units, ground_truth["must_listen"], unit_s),
    }
    for window in ground_truth["speak_windows"]:
        if window["kind"] == "alert":
            continue
        turn_end = float(window["earliest_s"])
        taken = takeover(units, turn_end, unit_s, settings.takeover_window_s)
        turn = {"kind": window["kind"], "turn_end_s": turn_end, **asdict(taken)}
        if window["kind"] == "answer" and ground_truth.get("expected_answer") is not None:
            text = reply_text(units, taken.unit_start_s) if taken.taken else ""
            turn.update(reply=text, expected_answer=ground_truth["expected_answer"],
                        correct=answer_matches(text, ground_truth["expected_answer"]))
        result["turns"].append(turn)
    if episode_type == "pause" and ground_truth.get("pause"):
        final_end = max(float(t) for t in ground_truth["user_turn_end_s"])
        result["pause_taken_over"] = pause_taken_over(units, float(ground_truth["pause"]["start_s"]), final_end, unit_s)
    if ground_truth.get("interruption_s") is not None:
        stop = interruption_stop(units, float(ground_truth["interruption_s"]), unit_s)
        result["interruption"] = {"onset_s": float(ground_truth["interruption_s"]), **asdict(stop)}
    if ground_truth.get("event_s") is not None:
        hit = proactive_hit(units, float(ground_truth["event_s"]), settings.proactive_tolerance_s, unit_s)
        expected = ground_truth.get("expected_answer")
        result["proactive"] = {
            "event_s": float(ground_truth["event_s"]), **asdict(hit),
            "alert_correct": bool(hit.hit and expected and answer_matches(hit.text, expected)),
        }
        result["false_alarms"] = result["must_listen_violations"]
    return result


def _rate(flags: list[bool]) -> float | None:
    return sum(flags) / len(flags) if flags else None


def _median(values: list[float]) -> float | None:
    return float(statistics.median(values)) if values else None


def _mean(values: list[float]) -> float | None:
    return float(statistics.fmean(values)) if values else None


def aggregate(per_episode: list[dict]) -> dict:
    """Set-level metrics from `episode_metrics` results; None where no episode measures a metric."""
    turns = [turn for episode in per_episode for turn in episode["turns"]]
    answers = [turn["correct"] for turn in turns if "correct" in turn]
    latencies = [turn["latency_s"] for turn in turns if turn["taken"]]
    pauses = [e["pause_taken_over"] for e in per_episode if "pause_taken_over" in e]
    interruptions = [e["interruption"] for e in per_episode if "interruption" in e]
    measured = [i for i in interruptions if i["speaking_at_onset"]]
    stops = [i["latency_s"] for i in measured]
    proactive = [e["proactive"] for e in per_episode if "proactive" in e]
    watch_minutes = sum(e["duration_s"] for e in per_episode if "proactive" in e) / 60.0
    all_minutes = sum(e["duration_s"] for e in per_episode) / 60.0
    return {
        "n_episodes": len(per_episode),
        "answer_accuracy": _rate(answers),
        "n_answers": len(answers),
        "takeover_rate": _rate([turn["taken"] for turn in turns]),
        "n_turn_ends": len(turns),
        "takeover_latency_median_s": _median(latencies),
        "takeover_latency_mean_s": _mean(latencies),
        "pause_takeover_rate": _rate(pauses),
        "n_pauses": len(pauses),
        "interruption_stop_latency_median_s": _median(stops),
        "interruption_stop_latency_mean_s": _mean(stops),
        "interruption_stopped_rate": _rate([i["stopped"] for i in measured]),
        "interruption_speaking_rate": _rate([i["speaking_at_onset"] for i in interruptions]),
        "n_interruptions": len(interruptions),
        "proactive_hit_rate": _rate([p["hit"] for p in proactive]),
        "proactive_delay_mean_s": _mean([p["delay_s"] for p in proactive if p["hit"]]),
        "proactive_alert_correct": _rate([p["alert_correct"] for p in proactive]),
        "n_watch": len(proactive),
        "false_alarms_per_minute": (
            sum(e["false_alarms"] for e in per_episode if "proactive" in e) / watch_minutes if proactive else None
        ),
        "must_listen_violations_per_minute": (
            sum(e["must_listen_violations"] for e in per_episode) / all_minutes if per_episode else None
        ),
    }


def check_targets(metrics: dict, targets=TARGETS) -> list[dict]:
    """One row per target: metric, label, value, op, threshold, passed (None when not measured)."""
    return [
        {"metric": t.metric, "label": t.label, "value": metrics.get(t.metric), "op": t.op, "threshold": t.threshold,
         "passed": t.passes(metrics.get(t.metric))}
        for t in targets
    ]


# ---------------------------------------------------------------- reference behaviour


def oracle_events(ground_truth: dict) -> list[dict]:
    """Events of a model that follows the ground-truth assistant turns at unit resolution.

    Unit k speaks when [k, k + u) overlaps an assistant turn; the turn's text sits on its first unit and the last
    unit ends the turn. Its metrics are the best a 1-s-unit model can reach (e.g. the latency floor).
    """
    _require(ground_truth, "duration_s", "assistant_turns")
    unit_s = _unit_seconds(ground_truth)
    n_units = int(math.ceil(float(ground_truth["duration_s"]) / unit_s))
    events = [
        {"unit": k, "time_s": k * unit_s, "action": "listen", "text": "", "end_of_turn": False, "interrupted": False}
        for k in range(n_units)
    ]
    for turn in ground_truth["assistant_turns"]:
        covered = [e for e in events if e["time_s"] < turn["end_s"] and e["time_s"] + unit_s > turn["start_s"]]
        for event in covered:
            event["action"] = "speak"
        if covered:
            covered[0]["text"] = turn["text"]
            covered[-1]["end_of_turn"] = True
    return events
