"""Replay tab: run a recording (wav or mp4) through a fresh duplex session, unit by unit, under the model lock."""

import numpy as np

from minicpmo.audio_utils import INPUT_SAMPLE_RATE
from minicpmo.duplex.replay import OUTPUT_RATE, read_recording, replay
from minicpmo.errors import SpaceError

from .model_loading import LoadedModel
from .settings import SpaceSettings
from .tab_common import DUPLEX_SYSTEM_PROMPT

EVENT_COLUMNS = ["unit", "time_s", "action", "text", "end_of_turn", "interrupted"]


class ReplayInputError(SpaceError):
    """The uploaded recording cannot be replayed."""


def run_replay(loaded: LoadedModel, settings: SpaceSettings, path: str | None, system_prompt: str,
               ref_audio: np.ndarray | None, generate_audio: bool = True, force_listen_count: int | None = None):
    """-> (event rows for a table, 24 kHz float32 output with the input's duration)."""
    if not path:
        raise ReplayInputError("upload a .wav (or other audio) or .mp4 recording first")
    try:
        audio, frames = read_recording(path)
    except Exception as error:
        raise ReplayInputError(f"cannot read the recording: {error}") from error
    seconds = audio.shape[0] / INPUT_SAMPLE_RATE
    if seconds <= 0:
        raise ReplayInputError("the recording has no audio samples")
    if seconds > settings.replay_max_seconds:
        raise ReplayInputError(f"the recording is {seconds:.0f} s long; this Space replays at most "
                               f"{settings.replay_max_seconds:.0f} s")
    with loaded.lock:
        result = replay(
            loaded.model, loaded.processor, audio, frames, system_prompt or DUPLEX_SYSTEM_PROMPT,
            ref_audio=ref_audio if generate_audio else None, generate_audio=generate_audio,
            force_listen_count=settings.live_force_listen_count if force_listen_count is None else force_listen_count,
            listen_bias=settings.live_listen_bias, max_speak_tokens_per_unit=settings.live_max_speak_tokens,
        )
    rows = [[event[column] for column in EVENT_COLUMNS] for event in result.events]
    return rows, result.output


__all__ = ["EVENT_COLUMNS", "OUTPUT_RATE", "ReplayInputError", "run_replay"]
