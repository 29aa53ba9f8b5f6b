"""Token layout of a MiniCPM-o 4.5 duplex (Omni-Flow) session, shared by the training serializer and the live loop.

A session is a system prefix followed by one unit per second of interaction:

    <|im_start|>system\\n{text}\\n<|audio_start|> <unk>*n_ref <|audio_end|><|im_end|>
    <unit> [<image> <unk>*64 </image>] <unk>*10  <|listen|>                                  </unit>
    <unit> [<image> <unk>*64 </image>] <unk>*10  <|speak|> text... [<|turn_eos|>] <|chunk_eos|> </unit>

Audio slots inside a unit carry no `<|audio_start|>`/`<|audio_end|>`: they are the `<unk>` tokens inside a
`<unit>` span but outside an image span (`duplex_slot_masks`). Everything here works on token ids only, so the
live session can build each unit without a tokenizer call.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..errors import DuplexError
from .tokenization_minicpmo import MiniCPMOSpecialTokens


UNIT_START = MiniCPMOSpecialTokens.unit_start  # `<unit>` (151683)
UNIT_END = MiniCPMOSpecialTokens.unit_end  # `</unit>` (151684)
IMAGE_SLOTS_PER_FRAME = 64  # resampler queries of one 448-class thumbnail
AUDIO_SLOTS_PER_SECOND = 10  # Whisper 50 frames/s, pooled 5x
DEFAULT_DUPLEX_SYSTEM_TEXT = "Streaming Omni Conversation."


class DuplexLayoutError(DuplexError):
    """Token ids that do not follow the duplex unit layout (or arguments that cannot produce it)."""


@dataclass(frozen=True)
class DuplexTokens:
    """The ids the duplex layout uses; defaults are the official MiniCPM-o 4.5 values."""

    unk: int = MiniCPMOSpecialTokens.unk
    im_start: int = MiniCPMOSpecialTokens.im_start
    im_end: int = MiniCPMOSpecialTokens.im_end
    unit_start: int = MiniCPMOSpecialTokens.unit_start
    unit_end: int = MiniCPMOSpecialTokens.unit_end
    image_start: int = MiniCPMOSpecialTokens.image_start
    image_end: int = MiniCPMOSpecialTokens.image_end
    slice_start: int = MiniCPMOSpecialTokens.slice_start
    slice_end: int = MiniCPMOSpecialTokens.slice_end
    audio_start: int = MiniCPMOSpecialTokens.audio_start
    audio_end: int = MiniCPMOSpecialTokens.audio_end
    listen: int = MiniCPMOSpecialTokens.listen
    speak: int = MiniCPMOSpecialTokens.speak
    turn_eos: int = MiniCPMOSpecialTokens.turn_eos
    chunk_eos: int = MiniCPMOSpecialTokens.chunk_eos
    chunk_tts_eos: int = MiniCPMOSpecialTokens.chunk_tts_eos
    tts_bos: int = MiniCPMOSpecialTokens.tts_bos
    tts_pad: int = MiniCPMOSpecialTokens.tts_pad

    @classmethod
    def from_special_tokens(cls, special: MiniCPMOSpecialTokens) -> "DuplexTokens":
        return cls(**{name: getattr(special, name) for name in cls.__dataclass_fields__})

    @classmethod
    def from_tokenizer(cls, tokenizer) -> "DuplexTokens":
        """Resolve the ids by name through the tokenizer (raises MissingSpecialTokenError for other vocabularies)."""
        return cls.from_special_tokens(MiniCPMOSpecialTokens.from_tokenizer(tokenizer))

    @property
    def unit_terminators(self) -> tuple[int, int, int]:
        """Generated ids that end a unit's decision: `<|listen|>`, `<|chunk_eos|>`, `<|chunk_tts_eos|>`."""
        return (self.listen, self.chunk_eos, self.chunk_tts_eos)

    @property
    def layout_ids(self) -> frozenset[int]:
        """Ids with a structural meaning; they may not appear inside unit text or the system text."""
        return frozenset(
            (self.unk, self.im_start, self.im_end, self.unit_start, self.unit_end, self.image_start, self.image_end,
             self.slice_start, self.slice_end, self.audio_start, self.audio_end, self.listen, self.speak,
             self.turn_eos, self.chunk_eos, self.chunk_tts_eos)
        )


def _tokens(tokens: DuplexTokens | None) -> DuplexTokens:
    return DuplexTokens() if tokens is None else tokens


def system_prefix_ids(
    tokenizer, text: str = DEFAULT_DUPLEX_SYSTEM_TEXT, n_ref_audio_slots: int = 0, tokens: DuplexTokens | None = None
) -> list[int]:
    """System turn that opens a duplex session.

    With a reference voice: "<|im_start|>system\\n{text}\\n<|audio_start|>" + `<unk>` x n + "<|audio_end|><|im_end|>"
    (the official prefix / suffix pair). Without one (n = 0) the audio span is left out entirely:
    "<|im_start|>system\\n{text}<|im_end|>". No newline follows `<|im_end|>`: the first `<unit>` comes next.
    """
    tokens = _tokens(tokens)
    if not isinstance(text, str):
        raise DuplexLayoutError(f"system prompt text must be a string, got {type(text).__name__}")
    if int(n_ref_audio_slots) < 0:
        raise DuplexLayoutError(f"n_ref_audio_slots must be >= 0, got {n_ref_audio_slots}")
    body = tokenizer(text, add_special_tokens=False)["input_ids"]
    forbidden = sorted(set(body) & tokens.layout_ids)
    if forbidden:
        raise DuplexLayoutError(
            f"system prompt text contains layout token ids {forbidden} (e.g. <unk>, <unit>, <|audio_start|>); "
            "they would shift the placeholder slots"
        )
    if n_ref_audio_slots == 0:
        return tokenizer(f"<|im_start|>system\n{text}<|im_end|>", add_special_tokens=False)["input_ids"]
    prefix = tokenizer(f"<|im_start|>system\n{text}\n<|audio_start|>", add_special_tokens=False)["input_ids"]
    return prefix + [tokens.unk] * int(n_ref_audio_slots) + [tokens.audio_end, tokens.im_end]


def unit_input_ids(
    tokens: DuplexTokens | None,
    has_frame: bool,
    n_audio_slots: int = AUDIO_SLOTS_PER_SECOND,
    image_slots: int = IMAGE_SLOTS_PER_FRAME,
) -> list[int]:
    """The part of a unit fed before the model decides: `<unit>` [+ `<image>` 64 slots `</image>`] + audio slots.

    1 s of audio-only input is 11 ids; with one frame, 77. `tokens=None` uses the official ids.
    """
    tokens = _tokens(tokens)
    if int(n_audio_slots) < 0 or int(image_slots) < 1:
        raise DuplexLayoutError(f"need n_audio_slots >= 0 and image_slots >= 1, got {n_audio_slots}, {image_slots}")
    ids = [tokens.unit_start]
    if has_frame:
        ids += [tokens.image_start] + [tokens.unk] * int(image_slots) + [tokens.image_end]
    return ids + [tokens.unk] * int(n_audio_slots)


def unit_decision_ids(
    tokens: DuplexTokens | None, speak: bool, text_ids=(), end_of_turn: bool = False
) -> list[int]:
    """The generated part of a unit, terminator included: `<|listen|>` or `<|speak|>` text [`<|turn_eos|>`] `<|chunk_eos|>`."""
    tokens = _tokens(tokens)
    text_ids = [int(token) for token in text_ids]
    if not speak:
        if text_ids or end_of_turn:
            raise DuplexLayoutError("a listen unit carries no text and cannot end a turn")
        return [tokens.listen]
    forbidden = sorted(set(text_ids) & tokens.layout_ids)
    if forbidden:
        raise DuplexLayoutError(f"unit text contains layout token ids {forbidden}; pass plain text tokens only")
    return [tokens.speak] + text_ids + ([tokens.turn_eos] if end_of_turn else []) + [tokens.chunk_eos]


@dataclass(frozen=True)
class ParsedUnit:
    """What one `<unit>`...`</unit>` span holds."""

    has_frame: bool
    n_image_slots: int
    n_audio_slots: int
    speak: bool
    text_ids: tuple[int, ...]
    end_of_turn: bool


def parse_unit(ids, tokens: DuplexTokens | None = None) -> ParsedUnit:
    """Inverse of `unit_input_ids` + `unit_decision_ids` + `UNIT_END`; raises DuplexLayoutError on any deviation."""
    tokens = _tokens(tokens)
    ids = [int(token) for token in ids]
    if len(ids) < 3 or ids[0] != tokens.unit_start or ids[-1] != tokens.unit_end:
        raise DuplexLayoutError("a unit must start with <unit> and end with </unit>")
    pos, body = 1, ids[:-1]
    has_frame, n_image = False, 0
    if body[pos] == tokens.image_start:
        has_frame, pos = True, pos + 1
        while pos < len(body) and body[pos] == tokens.unk:
            n_image, pos = n_image + 1, pos + 1
        if pos >= len(body) or body[pos] != tokens.image_end or n_image == 0:
            raise DuplexLayoutError("unit frame must be <image>, one or more <unk> slots, </image>")
        pos += 1
    n_audio = 0
    while pos < len(body) and body[pos] == tokens.unk:
        n_audio, pos = n_audio + 1, pos + 1
    decision = body[pos:]
    if decision == [tokens.listen]:
        return ParsedUnit(has_frame, n_image, n_audio, False, (), False)
    if len(decision) < 2 or decision[0] != tokens.speak or decision[-1] != tokens.chunk_eos:
        raise DuplexLayoutError(
            "unit decision must be <|listen|> or <|speak|> text [<|turn_eos|>] <|chunk_eos|>, got ids "
            f"{decision[:6]}{'...' if len(decision) > 6 else ''}"
        )
    text = decision[1:-1]
    end_of_turn = bool(text) and text[-1] == tokens.turn_eos
    if end_of_turn:
        text = text[:-1]
    forbidden = sorted(set(text) & tokens.layout_ids)
    if forbidden:
        raise DuplexLayoutError(f"unit text contains layout token ids {forbidden}")
    return ParsedUnit(has_frame, n_image, n_audio, True, tuple(text), end_of_turn)


def unit_spans(ids, tokens: DuplexTokens | None = None) -> list[tuple[int, int]]:
    """(start, end) positions of every `<unit>`...`</unit>` span (end exclusive) in a token sequence."""
    tokens = _tokens(tokens)
    spans, start = [], None
    for position, token in enumerate(int(t) for t in ids):
        if token == tokens.unit_start:
            if start is not None:
                raise DuplexLayoutError(f"<unit> at position {position} opens inside an unclosed unit")
            start = position
        elif token == tokens.unit_end:
            if start is None:
                raise DuplexLayoutError(f"</unit> at position {position} has no matching <unit>")
            spans.append((start, position + 1))
            start = None
    if start is not None:
        raise DuplexLayoutError(f"<unit> at position {start} is never closed")
    return spans


def duplex_slot_masks(ids, tokens: DuplexTokens | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(image_slots, audio_slots) boolean masks over `ids`.

    Image slots: `<unk>` inside `<image>`/`<slice>` spans. Audio slots: `<unk>` inside an
    `<|audio_start|>`/`<|audio_end|>` span, or inside a `<unit>` span but outside any image span.
    """
    tokens = _tokens(tokens)
    ids = np.asarray(ids, dtype=np.int64).reshape(-1)

    def depth(opening, closing):
        return np.cumsum(np.isin(ids, opening)) - np.cumsum(np.isin(ids, closing))

    is_unk = ids == tokens.unk
    in_image = depth([tokens.image_start, tokens.slice_start], [tokens.image_end, tokens.slice_end]) > 0
    in_audio = depth([tokens.audio_start], [tokens.audio_end]) > 0
    in_unit = depth([tokens.unit_start], [tokens.unit_end]) > 0
    return is_unk & in_image, is_unk & (in_audio | (in_unit & ~in_image))
