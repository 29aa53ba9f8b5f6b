"""Synthetic duplex episodes with machine-readable ground truth for Full-Duplex-Bench style metrics.

Episode types (every one starts with `lead_in` silence; times in seconds on one session clock):
- "question": the user asks about the scene; the assistant answers `takeover_delay` after the user stops.
- "pause": the same question spoken in two fragments with a mid-sentence pause (shorter than
  `turn_threshold_s`); the assistant keeps listening through the pause and answers after the second fragment.
- "chitchat": the user says something that is not a question; the assistant gives a short acknowledgement
  (a fixed small set of phrases, no scene content) after the take-over delay.
- "interruption": the user asks for a description; during the long reply the user cuts in at `interruption_s`,
  inside unit k = floor(interruption_s) with >= 0.5 s of speech in that unit. The assistant's text stops at the
  unit boundary k (tokens that would start at or after k are dropped, the last kept one is clipped to k): the
  decision of unit k is taken after hearing its audio, so unit k is the first listen unit (stop deadline k + 1).
  Sub-kind "stop" ("wait, stop please.") ends the exchange; sub-kind "question" is a new question that the
  assistant answers after the user finishes.
- "watch": the user asks "tell me when the <shape> turns <colour>"; the assistant acknowledges; distractor
  changes (other objects, even to the watched colour, or the target to another colour) happen before the event;
  at the event second `event_s` (first frame that shows it) the assistant speaks proactively within that unit.

The scene never changes between the start of a question and the end of its answer, so the answer is the one for
`state_at(user_turn_end)`. `ground_truth["must_listen"]` lists windows in which no assistant token may start;
`ground_truth["speak_windows"]` lists when a reply must start (earliest, deadline).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
from PIL import Image

from minicpmo.errors import SyntheticDataError
from minicpmo.processing.duplex_serializer_minicpmo import TimedToken

from .alignment import align_tokens
from .scenes import (
    COLOURS,
    SceneEvent,
    SceneQuestion,
    SceneTimeline,
    answer_question,
    describe,
    random_distractor_event,
    random_question,
    random_scene,
    render,
)
from .speech import SAMPLE_RATE, Utterance, Voice, synthesize


EPISODE_TYPES = ("question", "pause", "chitchat", "interruption", "watch")
ASSISTANT_VOICE = Voice("en-us+m3", 175)
CHITCHAT_LINES = (
    "I had a really nice walk this morning.",
    "My coffee is getting cold again.",
    "I think it might rain later today.",
    "I just finished reading a good book.",
    "The weekend went by so fast.",
    "I am trying to learn how to cook pasta.",
)
ACKNOWLEDGEMENTS = ("That sounds nice.", "I see.", "Oh, that is good to hear.", "Okay, got it.")
WATCH_ACKNOWLEDGEMENTS = ("Okay, I will keep an eye on it.", "Sure, I will tell you.", "Okay, I am watching.")
DESCRIBE_REQUESTS = ("Can you describe what you see?", "Tell me what is in the picture.")
STOP_LINES = ("Wait, stop please.", "Okay, stop, that is enough.", "Hold on, stop.")


class EpisodeError(SyntheticDataError):
    """An episode request that cannot be generated (unknown type, bad timing config)."""


@dataclass(frozen=True)
class TimingConfig:
    """Timing ranges (seconds, drawn uniformly) and rendering settings of generated episodes."""

    lead_in_s: tuple[float, float] = (1.0, 2.5)
    takeover_delay_s: tuple[float, float] = (0.3, 0.8)
    pause_s: tuple[float, float] = (0.6, 1.2)
    turn_threshold_s: float = 1.5  # a mid-sentence pause is always shorter than this
    alert_delay_s: tuple[float, float] = (0.1, 0.5)
    event_wait_s: tuple[int, int] = (2, 5)  # whole seconds from the end of the watch request/ack to the event
    tail_s: tuple[float, float] = (1.0, 2.0)
    min_duration_s: int = 8
    unit_seconds: float = 1.0
    image_size: int = 224
    noise_std: float = 1e-3
    user_gain: tuple[float, float] = (0.6, 1.0)

    def validate(self) -> None:
        if self.pause_s[1] >= self.turn_threshold_s:
            raise EpisodeError(f"pause_s {self.pause_s} must stay below turn_threshold_s={self.turn_threshold_s}")
        if self.unit_seconds != 1.0:
            raise EpisodeError("episodes use 1 s units (frames at 1 fps, events at whole seconds)")
        for name in ("lead_in_s", "takeover_delay_s", "pause_s", "alert_delay_s", "tail_s", "user_gain"):
            low, high = getattr(self, name)
            if not 0 <= low <= high:
                raise EpisodeError(f"{name} must be a (low, high) range with 0 <= low <= high, got {(low, high)}")
        if self.alert_delay_s[1] >= 1.0:
            raise EpisodeError("alert_delay_s must stay below 1 s so the alert starts in the event's unit")


@dataclass
class UserSegment:
    """One stretch of user speech placed on the session clock."""

    text: str
    role: str  # question | pause_prefix | pause_suffix | chitchat | describe_request | interruption | watch_request
    start_s: float
    end_s: float


@dataclass
class AssistantTurn:
    """One assistant reply: its text as spoken (truncated if interrupted) and its timed tokens."""

    text: str
    kind: str  # answer | acknowledge | describe | alert
    start_s: float
    end_s: float
    tokens: list[TimedToken]
    interrupted: bool = False


@dataclass
class Episode:
    """A generated session. Audio tracks are float32 [duration_s * 16000]; `frames` are (t, image) at t = 0, 1, ..."""

    episode_id: str
    episode_type: str
    duration_s: int
    user_voice: Voice
    user_audio: np.ndarray
    assistant_audio: np.ndarray
    frames: list[tuple[float, Image.Image]]
    scene: SceneTimeline
    user_segments: list[UserSegment]
    assistant_turns: list[AssistantTurn]
    ground_truth: dict
    sample_rate: int = SAMPLE_RATE

    @property
    def assistant_tokens(self) -> list[TimedToken]:
        return [token for turn in self.assistant_turns for token in turn.tokens]

    @property
    def assistant_text(self) -> str:
        return " ".join(turn.text for turn in self.assistant_turns)


def _uniform(rng: np.random.Generator, bounds: tuple[float, float]) -> float:
    return float(rng.uniform(bounds[0], bounds[1]))


@dataclass
class _Builder:
    """Collects placed speech and replies, then renders the tracks, frames and ground truth."""

    rng: np.random.Generator
    tokenizer: object
    user_voice: Voice
    config: TimingConfig
    scene: SceneTimeline
    user_gain: float = 1.0
    user_placed: list[tuple[Utterance, UserSegment]] = field(default_factory=list)
    assistant_placed: list[tuple[Utterance, AssistantTurn]] = field(default_factory=list)

    def user(self, text: str, role: str, start_s: float) -> UserSegment:
        utterance = synthesize(text, self.user_voice, gain=self.user_gain)
        segment = UserSegment(text, role, start_s, start_s + utterance.duration_s)
        self.user_placed.append((utterance, segment))
        return segment

    def reply(self, text: str, kind: str, start_s: float) -> AssistantTurn:
        utterance = synthesize(text, ASSISTANT_VOICE)
        tokens = align_tokens(utterance, self.tokenizer, offset_s=start_s)
        turn = AssistantTurn(text, kind, start_s, start_s + utterance.duration_s, tokens)
        self.assistant_placed.append((utterance, turn))
        return turn

    def truncate(self, turn: AssistantTurn, cut_s: float) -> None:
        """Interrupt `turn` at `cut_s`: drop tokens that start at or after it, clip the rest and the audio."""
        kept = [token for token in turn.tokens if token.start_s < cut_s]
        turn.tokens = [TimedToken(t.token_id, t.start_s, min(t.end_s, cut_s)) for t in kept]
        turn.text = self.tokenizer.decode([t.token_id for t in kept]).strip()
        turn.end_s = min(turn.end_s, cut_s)
        turn.interrupted = True

    def delay(self) -> float:
        return _uniform(self.rng, self.config.takeover_delay_s)

    def content_end(self) -> float:
        ends = [seg.end_s for _, seg in self.user_placed] + [turn.end_s for _, turn in self.assistant_placed]
        return max(ends)

    def _track(self, placed, duration_s: int, end_attr: str = "end_s") -> np.ndarray:
        track = np.zeros(duration_s * SAMPLE_RATE, dtype=np.float32)
        for utterance, item in placed:
            first = int(round(item.start_s * SAMPLE_RATE))
            last = min(first + utterance.audio.shape[0], int(round(getattr(item, end_attr) * SAMPLE_RATE)))
            track[first:last] += utterance.audio[: last - first]
        return track

    def finish(self, episode_id: str, episode_type: str, duration_s: int, truth: dict) -> Episode:
        user_audio = self._track(self.user_placed, duration_s)
        if self.config.noise_std > 0:
            user_audio += self.rng.normal(0.0, self.config.noise_std, user_audio.shape).astype(np.float32)
        assistant_audio = self._track(self.assistant_placed, duration_s)
        frames = [
            (float(t), render(self.scene.state_at(t), self.config.image_size)) for t in range(duration_s)
        ]
        segments = [segment for _, segment in self.user_placed]
        turns = [turn for _, turn in self.assistant_placed]
        truth = {
            "episode_type": episode_type,
            "duration_s": duration_s,
            "unit_seconds": self.config.unit_seconds,
            "user_voice": {"name": self.user_voice.name, "speed": self.user_voice.speed},
            "assistant_voice": {"name": ASSISTANT_VOICE.name, "speed": ASSISTANT_VOICE.speed},
            "turn_threshold_s": self.config.turn_threshold_s,
            "user_segments": [vars(segment).copy() for segment in segments],
            "assistant_turns": [
                {"text": t.text, "kind": t.kind, "start_s": t.start_s, "end_s": t.end_s, "interrupted": t.interrupted}
                for t in turns
            ],
            "question": None,
            "expected_answer": None,
            "expected_reply": None,
            "event_s": None,
            "event": None,
            "interruption_s": None,
            "interruption_kind": None,
            "stop_deadline_s": None,
            "assistant_stop_s": None,
            "pause": None,
            **truth,
        }
        return Episode(
            episode_id, episode_type, duration_s, self.user_voice, user_audio, assistant_audio, frames, self.scene,
            segments, turns, truth,
        )


def _duration(builder: _Builder, minimum_end: float = 0.0) -> int:
    end = max(builder.content_end(), minimum_end) + _uniform(builder.rng, builder.config.tail_s)
    return max(builder.config.min_duration_s, int(math.ceil(end)))


def _add_distractors(builder: _Builder, times: list[int], count: int, protected: tuple[int, ...] = ()) -> None:
    rng = builder.rng
    if not times or count <= 0:
        return
    chosen = sorted(rng.choice(times, size=min(count, len(times)), replace=False).tolist())
    for time_s in chosen:
        event = random_distractor_event(rng, builder.scene, int(time_s), protected)
        if event is not None:
            builder.scene.add_event(event)


def _question_dict(question: SceneQuestion, asked_at_s: float) -> dict:
    return {"kind": question.kind, "shape": question.shape, "colour": question.colour, "text": question.text(),
            "asked_at_s": asked_at_s}


def _takeover_window(builder: _Builder, user_end: float, kind: str) -> dict:
    return {"kind": kind, "earliest_s": user_end, "deadline_s": user_end + builder.config.takeover_delay_s[1]}


def _question_episode(builder: _Builder, split_pause: bool) -> tuple[int, dict]:
    rng, config = builder.rng, builder.config
    start = _uniform(rng, config.lead_in_s)
    _add_distractors(builder, list(range(1, int(math.floor(start)) + 1)), int(rng.integers(0, 2)))
    question = random_question(rng, builder.scene.state_at(start))
    text = question.text()
    truth: dict = {}
    if split_pause:
        words = text.split()
        cut = int(rng.integers(1, len(words) - 1)) if len(words) > 2 else 1
        prefix = builder.user(" ".join(words[:cut]), "pause_prefix", start)
        pause = _uniform(rng, config.pause_s)
        suffix = builder.user(" ".join(words[cut:]), "pause_suffix", prefix.end_s + pause)
        truth["pause"] = {"start_s": prefix.end_s, "end_s": suffix.start_s}
        user_end = suffix.end_s
    else:
        user_end = builder.user(text, "question", start).end_s
    expected, reply_text = answer_question(builder.scene.state_at(user_end), question)
    reply = builder.reply(reply_text, "answer", user_end + builder.delay())
    duration = _duration(builder)
    _add_distractors(builder, list(range(int(math.floor(reply.end_s)) + 1, duration)), int(rng.integers(0, 2)))
    truth.update(
        question=_question_dict(question, user_end),
        expected_answer=expected,
        expected_reply=reply_text,
        response="answer",
        user_turn_end_s=[user_end],
        must_listen=[[start, user_end]],
        speak_windows=[_takeover_window(builder, user_end, "answer")],
    )
    return duration, truth


def _chitchat_episode(builder: _Builder) -> tuple[int, dict]:
    rng = builder.rng
    start = _uniform(rng, builder.config.lead_in_s)
    segment = builder.user(str(rng.choice(CHITCHAT_LINES)), "chitchat", start)
    ack = builder.reply(str(rng.choice(ACKNOWLEDGEMENTS)), "acknowledge", segment.end_s + builder.delay())
    duration = _duration(builder)
    _add_distractors(builder, list(range(1, duration)), int(rng.integers(0, 3)))
    truth = dict(
        response="acknowledge",
        expected_reply=ack.text,
        user_turn_end_s=[segment.end_s],
        must_listen=[[start, segment.end_s]],
        speak_windows=[_takeover_window(builder, segment.end_s, "acknowledge")],
    )
    return duration, truth


def _interruption_episode(builder: _Builder) -> tuple[int, dict]:
    rng = builder.rng
    start = _uniform(rng, builder.config.lead_in_s)
    _add_distractors(builder, list(range(1, int(math.floor(start)) + 1)), int(rng.integers(0, 2)))
    request = builder.user(str(rng.choice(DESCRIBE_REQUESTS)), "describe_request", start)
    state = builder.scene.state_at(request.end_s)
    reply = builder.reply(describe(state), "describe", request.end_s + builder.delay())
    first_unit = int(math.floor(reply.start_s)) + 1  # cut in after 1..3 units of the reply (keeps episodes short)
    units = list(range(first_unit, min(first_unit + 3, int(math.floor(reply.end_s - 0.5)) + 1)))
    if not units:
        raise EpisodeError(f"description reply of {reply.end_s - reply.start_s:.2f} s is too short to interrupt")
    stop_unit = int(rng.choice(units))
    onset = stop_unit + float(rng.uniform(0.05, 0.5))
    builder.truncate(reply, float(stop_unit))
    kind = str(rng.choice(("stop", "question")))
    truth: dict = dict(
        interruption_s=onset,
        interruption_kind=kind,
        stop_deadline_s=float(stop_unit + 1),
        assistant_stop_s=reply.end_s,
        expected_reply=None,
    )
    if kind == "stop":
        interruption = builder.user(str(rng.choice(STOP_LINES)), "interruption", onset)
        truth.update(response="listen", user_turn_end_s=[request.end_s, interruption.end_s],
                     must_listen=[[float(stop_unit), interruption.end_s + builder.config.turn_threshold_s]])
        # the interrupting user says stop: the rest of the episode stays silent for the assistant
        duration = _duration(builder, interruption.end_s + builder.config.turn_threshold_s)
        truth["must_listen"][0][1] = float(duration)
    else:
        question = random_question(rng, state)
        interruption = builder.user(question.text(), "interruption", onset)
        expected, reply_text = answer_question(builder.scene.state_at(interruption.end_s), question)
        # >= 1 s after the cut so the serializer sees two assistant turns (its turn_gap_s)
        builder.reply(reply_text, "answer", max(interruption.end_s + builder.delay(), reply.end_s + 1.0))
        truth.update(
            response="answer",
            question=_question_dict(question, interruption.end_s),
            expected_answer=expected,
            expected_reply=reply_text,
            user_turn_end_s=[request.end_s, interruption.end_s],
            must_listen=[[float(stop_unit), interruption.end_s]],
        )
        duration = _duration(builder)
    truth["speak_windows"] = [_takeover_window(builder, request.end_s, "describe")]
    if kind == "question":
        truth["speak_windows"].append(_takeover_window(builder, interruption.end_s, "answer"))
    last_protected = builder.content_end()
    _add_distractors(builder, list(range(int(math.floor(last_protected)) + 1, duration)), int(rng.integers(0, 2)))
    return duration, truth


def _watch_episode(builder: _Builder) -> tuple[int, dict]:
    rng, config = builder.rng, builder.config
    start = _uniform(rng, config.lead_in_s)
    state = builder.scene.state_at(start)
    shape = "square"  # the only shape that is unique in every scene (appearing objects are circles/triangles)
    target = state.by_shape(shape)[0]
    colour = str(rng.choice([c for c in COLOURS if c != target.colour]))
    request = builder.user(f"Tell me when the {shape} turns {colour}.", "watch_request", start)
    ack = builder.reply(str(rng.choice(WATCH_ACKNOWLEDGEMENTS)), "acknowledge", request.end_s + builder.delay())
    watch_from = max(request.end_s, ack.end_s)
    event_s = int(math.ceil(watch_from)) + int(rng.integers(config.event_wait_s[0], config.event_wait_s[1] + 1))
    between = list(range(int(math.floor(start)) + 1, event_s))
    protect = (target.object_id,)
    _add_distractors(builder, between, int(rng.integers(1, 3)), protect)
    if between and rng.random() < 0.5:  # the target changes first to a colour that is not the watched one
        time_s = int(rng.choice(between))
        current = builder.scene.state_at(time_s).find(target.object_id).colour
        other = [c for c in COLOURS if c not in (colour, current)]
        if not any(e.time_s == time_s and e.object_id == target.object_id for e in builder.scene.events):
            builder.scene.add_event(SceneEvent(time_s, "colour", target.object_id, colour=str(rng.choice(other))))
    builder.scene.add_event(SceneEvent(event_s, "colour", target.object_id, colour=colour))
    alert_text = f"The {shape} is {colour} now."
    alert = builder.reply(alert_text, "alert", event_s + _uniform(rng, config.alert_delay_s))
    duration = _duration(builder, event_s + 1.0)
    truth = dict(
        response="alert",
        expected_reply=alert.text,
        expected_answer=colour,
        event_s=event_s,
        event={"object_id": target.object_id, "shape": shape, "colour": colour},
        watch={"shape": shape, "colour": colour, "requested_at_s": request.end_s},
        user_turn_end_s=[request.end_s],
        must_listen=[[start, request.end_s], [ack.end_s, float(event_s)]],
        speak_windows=[_takeover_window(builder, request.end_s, "acknowledge"),
                       {"kind": "alert", "earliest_s": float(event_s), "deadline_s": float(event_s + 1)}],
    )
    return duration, truth


def generate_episode(
    rng: np.random.Generator,
    episode_type: str,
    tokenizer,
    user_voice: Voice,
    episode_id: str = "episode",
    config: TimingConfig | None = None,
) -> Episode:
    """One episode of `episode_type` (see EPISODE_TYPES) drawn from `rng`, spoken by `user_voice`."""
    if episode_type not in EPISODE_TYPES:
        raise EpisodeError(f"unknown episode type {episode_type!r}; expected one of {EPISODE_TYPES}")
    config = config or TimingConfig()
    config.validate()
    builder = _Builder(rng, tokenizer, user_voice, config, random_scene(rng),
                       user_gain=_uniform(rng, config.user_gain))
    if episode_type in ("question", "pause"):
        duration, truth = _question_episode(builder, split_pause=episode_type == "pause")
    elif episode_type == "chitchat":
        duration, truth = _chitchat_episode(builder)
    elif episode_type == "interruption":
        duration, truth = _interruption_episode(builder)
    else:
        duration, truth = _watch_episode(builder)
    return builder.finish(episode_id, episode_type, duration, truth)
