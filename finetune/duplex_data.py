"""Full-duplex training sessions (JSONL, one recorded session per line) -> `DuplexSample` (media decoded lazily).

    {"id": "s1",
     "user_audio": "media/user.wav",                      # the user's side of the session (any rate, mono-mixed)
     "frames": [{"time": 0.0, "image": "media/f0.png"}],  # optional camera frames on the session clock
     "assistant_words": [{"word": "Hello", "start": 1.0, "end": 1.4}, ...],   # word times, or
     "assistant_tokens": [{"id": 9707, "start": 1.0, "end": 1.2}, ...],       # token ids with times
     "assistant_speech": {"audio": "media/assistant.wav", "start": 1.0},      # or {"codes": [...], "start": 1.0}
     "ref_audio": "media/voice.wav",                      # optional voice reference (system prompt audio)
     "system_prompt": "Streaming Omni Conversation."}     # optional

Times are seconds from the session start. Words are tokenized one by one (a space is put before every word
except the first of a turn, where a turn starts after `turn_gap_s` of assistant silence), and a word's time span
is split evenly over its tokens. `assistant_speech.start` is when the first code plays (25 codes per second).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from minicpmo.processing.duplex_serializer_minicpmo import DuplexSample, TimedToken
from minicpmo.processing.media_loading_minicpmo import load_audio, load_image

from .data import ConversationFormatError, load_rows, resolve_media_path
from .speech_targets import encode_speech, speech_target_of


class DuplexFormatError(ConversationFormatError):
    """A duplex session row that does not follow the format (names the row and the problem)."""


def load_duplex_sessions(source: str | os.PathLike, split: str = "train"):
    """A `datasets.Dataset` of duplex session rows from a .jsonl file or a `save_to_disk` folder."""
    path = Path(source)
    dataset = load_rows(source, split, DuplexFormatError)
    columns = set(dataset.column_names)
    if "user_audio" not in columns or not columns & {"assistant_words", "assistant_tokens"}:
        raise DuplexFormatError(
            f"{str(path)!r} has columns {sorted(columns)}; duplex sessions need 'user_audio' and 'assistant_words' "
            "or 'assistant_tokens'"
        )
    if len(dataset) == 0:
        raise DuplexFormatError(f"{str(path)!r} holds no sessions")
    return dataset


def _timed(entry: Any, keys: tuple[str, ...], where: str) -> tuple:
    if not isinstance(entry, dict) or any(entry.get(key) is None for key in keys):
        raise DuplexFormatError(f"{where}: expected a mapping with {list(keys)}, got {entry!r}")
    return tuple(entry[key] for key in keys)


def words_to_tokens(words: list[dict], tokenizer, turn_gap_s: float, where: str) -> list[TimedToken]:
    """Word times -> token times: each word's span split evenly over its tokens."""
    tokens: list[TimedToken] = []
    previous_end = None
    for index, entry in enumerate(words):
        word, start, end = _timed(entry, ("word", "start", "end"), f"{where}, assistant_words[{index}]")
        start, end = float(start), float(end)
        new_turn = previous_end is None or start - previous_end >= turn_gap_s
        text = word if new_turn or word[:1].isspace() else " " + word
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        if not ids:
            raise DuplexFormatError(f"{where}, assistant_words[{index}]: word {word!r} has no tokens")
        step = (end - start) / len(ids)
        tokens += [TimedToken(int(token), start + k * step, start + (k + 1) * step) for k, token in enumerate(ids)]
        previous_end = end
    return tokens


def session_from_row(row: dict, tokenizer, media_root=None, speech_tokenizer=None, turn_gap_s: float = 1.0,
                     index: int = 0) -> DuplexSample:
    """Decode one row's media and times into a `DuplexSample` (speech as codes, encoded here when given as audio)."""
    where = f"session {row.get('id', index)}"
    if not row.get("user_audio"):
        raise DuplexFormatError(f"{where}: needs 'user_audio' (a path to the user's audio)")
    audio = load_audio(resolve_media_path(row["user_audio"], media_root))
    frames = [
        (float(time_s), load_image(resolve_media_path(image, media_root)))
        for time_s, image in (
            _timed(entry, ("time", "image"), f"{where}, frames[{k}]") for k, entry in enumerate(row.get("frames") or [])
        )
    ]
    if row.get("assistant_tokens"):
        tokens = [
            TimedToken(int(token), float(start), float(end))
            for token, start, end in (
                _timed(entry, ("id", "start", "end"), f"{where}, assistant_tokens[{k}]")
                for k, entry in enumerate(row["assistant_tokens"])
            )
        ]
    else:
        tokens = words_to_tokens(row.get("assistant_words") or [], tokenizer, turn_gap_s, where)
    codes, codes_start = None, 0.0
    speech = speech_target_of(row, "assistant_speech")
    if speech:
        codes = encode_speech(speech, speech_tokenizer, media_root, where)
        codes_start = float(speech.get("start", 0.0))
    extra = {}
    if row.get("system_prompt"):
        extra["system_prompt"] = row["system_prompt"]
    ref_audio = load_audio(resolve_media_path(row["ref_audio"], media_root)) if row.get("ref_audio") else None
    return DuplexSample(
        audio_16k=audio, frames=frames, assistant_tokens=tokens, speech_codes=codes,
        speech_codes_start_s=codes_start, ref_audio=ref_audio, **extra,
    )


__all__ = ["DuplexFormatError", "load_duplex_sessions", "session_from_row", "words_to_tokens"]
