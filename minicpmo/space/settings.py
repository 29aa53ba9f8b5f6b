"""Space limits and generation controls, read once from environment variables.

Operators tune a deployment (live slots, idle timeout) and tests make the tiny random model speak quickly
(strong negative listen bias, short speech) without touching the code.
"""

import os
from dataclasses import dataclass

from minicpmo.errors import SpaceError


class SpaceSettingsError(SpaceError):
    """An environment variable holds a value the Space cannot use."""


def _env_number(name: str, default, kind=float):
    raw = os.environ.get(name)
    if raw is None or raw.strip() == "":
        return default
    try:
        return kind(raw)
    except ValueError as error:
        raise SpaceSettingsError(f"environment variable {name}={raw!r} is not a valid {kind.__name__}") from error


@dataclass(frozen=True)
class SpaceSettings:
    """Everything the Space reads from the environment (defaults in parentheses in each name's comment)."""

    max_live_sessions: int = 2  # MAX_LIVE_SESSIONS: concurrent duplex sessions (each holds a KV cache)
    live_idle_timeout_s: float = 120.0  # MINICPMO_LIVE_IDLE_TIMEOUT_S: close a session with no microphone input
    live_listen_bias: float = 0.0  # MINICPMO_LIVE_LISTEN_BIAS: added to the <|listen|> logit (negative: talk more)
    live_force_listen_count: int = 3  # MINICPMO_LIVE_FORCE_LISTEN: first units that always listen
    live_max_speak_tokens: int = 20  # MINICPMO_LIVE_MAX_SPEAK_TOKENS: text tokens per speaking unit
    live_max_backlog_units: int = 4  # MINICPMO_LIVE_MAX_BACKLOG: older queued units are dropped beyond this
    live_batch_wait_s: float = 0.15  # MINICPMO_LIVE_BATCH_WAIT_S: wait for the other sessions' units of a tick
    chat_max_new_tokens: int = 512  # MINICPMO_CHAT_MAX_NEW_TOKENS
    chat_max_speech_codes: int | None = None  # MINICPMO_CHAT_MAX_SPEECH_CODES: cap on speech codes (25 per s)
    replay_max_seconds: float = 180.0  # MINICPMO_REPLAY_MAX_SECONDS: longest replay (it holds the model lock)

    def __post_init__(self):
        if self.max_live_sessions < 1:
            raise SpaceSettingsError(f"MAX_LIVE_SESSIONS must be >= 1, got {self.max_live_sessions}")
        if self.live_idle_timeout_s <= 0:
            raise SpaceSettingsError(f"MINICPMO_LIVE_IDLE_TIMEOUT_S must be > 0, got {self.live_idle_timeout_s}")
        if self.live_max_backlog_units < 1:
            raise SpaceSettingsError(f"MINICPMO_LIVE_MAX_BACKLOG must be >= 1, got {self.live_max_backlog_units}")
        if not 0 <= self.live_batch_wait_s <= 1:
            raise SpaceSettingsError(f"MINICPMO_LIVE_BATCH_WAIT_S must be in [0, 1], got {self.live_batch_wait_s}")
        if self.chat_max_new_tokens < 1:
            raise SpaceSettingsError(f"MINICPMO_CHAT_MAX_NEW_TOKENS must be >= 1, got {self.chat_max_new_tokens}")

    @classmethod
    def from_env(cls) -> "SpaceSettings":
        codes = _env_number("MINICPMO_CHAT_MAX_SPEECH_CODES", None, int)
        return cls(
            max_live_sessions=_env_number("MAX_LIVE_SESSIONS", 2, int),
            live_idle_timeout_s=_env_number("MINICPMO_LIVE_IDLE_TIMEOUT_S", 120.0),
            live_listen_bias=_env_number("MINICPMO_LIVE_LISTEN_BIAS", 0.0),
            live_force_listen_count=_env_number("MINICPMO_LIVE_FORCE_LISTEN", 3, int),
            live_max_speak_tokens=_env_number("MINICPMO_LIVE_MAX_SPEAK_TOKENS", 20, int),
            live_max_backlog_units=_env_number("MINICPMO_LIVE_MAX_BACKLOG", 4, int),
            live_batch_wait_s=_env_number("MINICPMO_LIVE_BATCH_WAIT_S", 0.15),
            chat_max_new_tokens=_env_number("MINICPMO_CHAT_MAX_NEW_TOKENS", 512, int),
            chat_max_speech_codes=codes,
            replay_max_seconds=_env_number("MINICPMO_REPLAY_MAX_SECONDS", 180.0),
        )
