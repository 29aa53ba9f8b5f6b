"""Per-token times of a spoken reply, from the word timings of its speech.

Each word's character span is mapped linearly onto its time span; characters between words (spaces,
punctuation) map onto the silence between them. A token's start/end are the times of its first/last character
boundary, so tokens are sorted, never overlap and tile the spoken words (a trailing '.' gets a zero-length span
at the end of the last word).
"""

from __future__ import annotations

import numpy as np

from minicpmo.errors import SyntheticDataError
from minicpmo.processing.duplex_serializer_minicpmo import TimedToken

from .speech import Utterance


class AlignmentError(SyntheticDataError):
    """Token offsets that cannot be aligned to the utterance (tokenizer without offsets, text mismatch)."""


def char_time_knots(utterance: Utterance, offset_s: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    """Monotone (char position, time) knots: word starts and ends, plus the text's two ends."""
    chars, times = [0.0], [offset_s + utterance.words[0].start_s]
    for word in utterance.words:
        chars += [float(word.char_start), float(word.char_end)]
        times += [offset_s + word.start_s, offset_s + word.end_s]
    chars.append(float(len(utterance.text)))
    times.append(offset_s + utterance.words[-1].end_s)
    return np.asarray(chars), np.asarray(times)


def align_tokens(utterance: Utterance, tokenizer, offset_s: float = 0.0) -> list[TimedToken]:
    """Tokenise `utterance.text` (no special tokens) and give every token its time span on the session clock."""
    encoded = tokenizer(utterance.text, add_special_tokens=False, return_offsets_mapping=True)
    ids, offsets = encoded["input_ids"], encoded.get("offset_mapping")
    if offsets is None or len(offsets) != len(ids):
        raise AlignmentError("the tokenizer must be a fast tokenizer that returns offset_mapping")
    chars, times = char_time_knots(utterance, offset_s)
    tokens = []
    for token_id, (start, end) in zip(ids, offsets):
        if not 0 <= start <= end <= len(utterance.text):
            raise AlignmentError(f"token offset ({start}, {end}) lies outside the text {utterance.text!r}")
        start_s, end_s = np.interp([start, end], chars, times)
        tokens.append(TimedToken(int(token_id), float(start_s), float(max(start_s, end_s))))
    return tokens
