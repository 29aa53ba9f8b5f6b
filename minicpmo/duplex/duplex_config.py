"""The controls of one duplex session (official §8 defaults where they exist) and what one unit returns."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from ..errors import DuplexError


class DuplexConfigError(DuplexError):
    """A duplex control out of its range; the message names the control and the value."""


@dataclass
class DuplexConfig:
    """Controls of a duplex session (official defaults where they exist)."""

    max_speak_tokens_per_unit: int = 20
    force_listen_count: int = 3
    # Added to the <|listen|> logit before a unit's first token is decoded (negative: talk more; +-1e9 forces the
    # choice). Later tokens of the unit are decoded without it.
    listen_bias: float = 0.0
    # Opt-in: decide a unit's first token between <|listen|> and <|speak|> only (argmax or sampled over the two),
    # instead of the official rule that decodes it like every other token. Models trained on the strict
    # `<|listen|>` / `<|speak|>` layout can use it to never open a unit with another token.
    restrict_decision: bool = False
    do_sample: bool = False
    temperature: float = 0.7
    top_k: int = 20
    top_p: float = 0.8
    repetition_penalty: float = 1.05
    repetition_window: int = 512
    length_penalty: float = 1.1
    generate_audio: bool = True
    n_timesteps: int = 5
    max_speech_lag_s: float = 1.0
    window_high_tokens: int = 4000
    window_low_tokens: int = 3500
    seed: int | None = None

    def __post_init__(self):
        if self.max_speak_tokens_per_unit < 2:
            raise DuplexConfigError(f"max_speak_tokens_per_unit must be >= 2, got {self.max_speak_tokens_per_unit}")
        if not 0 < self.window_low_tokens <= self.window_high_tokens:
            raise DuplexConfigError(
                f"need 0 < window_low_tokens ({self.window_low_tokens}) <= window_high_tokens "
                f"({self.window_high_tokens})"
            )
        if self.force_listen_count < 0:
            raise DuplexConfigError(f"force_listen_count must be >= 0, got {self.force_listen_count}")


@dataclass
class DuplexOutput:
    """What one unit produced. `audio` is 24 kHz float32 (None while listening or when audio is off)."""

    is_listen: bool
    text: str
    audio: np.ndarray | None
    end_of_turn: bool
    time_s: float
    timings: dict = field(default_factory=dict)
    interrupted: bool = False
    token_ids: list = field(default_factory=list)
    unit_index: int = 0

    @property
    def action(self) -> str:
        return "listen" if self.is_listen else "speak"

    def as_event(self, timings: bool = True) -> dict:
        """The unit as one timeline event (events.jsonl of a replay, the Space's live timeline)."""
        event = {"unit": self.unit_index, "time_s": self.time_s, "action": self.action, "text": self.text,
                 "end_of_turn": self.end_of_turn, "interrupted": self.interrupted}
        if timings:
            event["timings"] = {stage: round(seconds, 5) for stage, seconds in self.timings.items()}
        return event
