"""Training-side serializer of a duplex (Omni-Flow) session: time-aligned streams -> one token sequence of units.

Input is a recorded session on one clock: the user's 16 kHz audio, camera frames with their times, the
assistant's text tokens with start/end times and the assistant's 25 Hz speech codes. Output is the exact
sequence the live loop builds (see duplex_layout_minicpmo), with labels on the generated part of every unit.

Rules (paper "TAIL", official §6 and §8):
- Units are `unit_seconds` long; unit k covers [k*U, (k+1)*U) and shows the latest frame with time <= k*U.
- Text: a token whose start time falls in unit k is emitted in unit k. A unit holds at most
  `max_speak_tokens_per_unit` decision ids, `<|speak|>` and `<|chunk_eos|>` included (the official 20 decode
  steps), so at most max-2 text ids (`<|turn_eos|>` counts as one). Tokens that do not fit wait, in order, for
  the next unit; so do tokens that start inside the first `force_listen_count` units (those are always listen
  units). A unit never mixes two turns.
- Turns: a new turn starts where the gap between one token's end and the next token's start is >= `turn_gap_s`.
- Speech: token j owns the codes from its start to the next token's start (the turn's last token: to its end).
  After unit k, the speech of the turn's emitted tokens is released except that of the last `lookahead_tokens`
  of them (bounded look-ahead: their speech is deferred until more text is known); once the turn's last token
  has been emitted, everything is released. Each speaking unit takes the next at most `codes_per_unit` released
  codes (25 = 1 s), first in first out.
- A turn stays open (speaking units, possibly with no text) until its text and all of its speech have been
  emitted; the unit that completes it carries `<|turn_eos|>`. Units outside any turn are listen units.
- If text or speech is still pending after the recorded audio ends, silent units (zero audio) are appended.

Audio features (`collate_duplex`) are those the live loop computes, not one isolated 1-s piece per unit: the unit
audio goes through the inference front end (`StreamingMelProcessor`, exact mode, 1-s chunks, first chunk left-padded
to 1035 ms) and the emitted chunks are grouped into pieces at the points where the streaming Whisper cache resets
(`needs_cache_reset`; every 29 units with 1500 positions). Each piece is the stitched core mel of its chunks plus
the first right-redundancy frame of its last chunk (the conv's right context; one more encoder frame that falls in
an attention chunk no real frame sees and that pooling drops, so a unit keeps exactly 10 tokens). Encoded offline
with the model's 1-s block-causal mask, unit k then gets what `encode_unit` gives it live. One seam stays: live, the
first unit after a cache reset convolves with its 2 left-redundancy mel frames, offline a piece starts with the
conv's zero padding (the encoder's offline forward has no left-context input).
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np
import torch
from PIL import Image
from transformers.feature_extraction_utils import BatchFeature

from ..audio_utils import encoder_frames_from_mel_frames, needs_cache_reset
from ..errors import DataFormatError
from ..special_tokens import IGNORE_INDEX, SPEECH_CODEBOOK_SIZE, MiniCPMOSpecialTokens  # noqa: F401 (re-exported)
from .duplex_layout_minicpmo import (
    DEFAULT_DUPLEX_SYSTEM_TEXT,
    IMAGE_SLOTS_PER_FRAME,
    DuplexTokens,
    duplex_slot_masks,
    system_prefix_ids,
    unit_decision_ids,
    unit_input_ids,
)
from .feature_extraction_minicpmo import (
    SAMPLING_RATE,
    UnsupportedSamplingRateError,
    audio_token_count,
    frames_to_token_count,
    validate_waveform,
)
from .image_processing_minicpmo import stack_patch_strips
from .streaming_mel_minicpmo import StreamingMelProcessor


SPEECH_CODE_RATE = 25  # S3 speech codes per second


class DuplexSampleError(DataFormatError):
    """A duplex training sample that cannot be serialized; the message names the problem."""


class InvalidTimedTokenError(DuplexSampleError):
    """An assistant token with a bad time span (end < start, negative or non-finite) or a layout token id."""


class UnsortedTokensError(DuplexSampleError):
    """Assistant tokens are not sorted by start time."""


class TimelineMismatchError(DuplexSampleError):
    """Tokens or frames lie outside the recorded audio, or the unit length does not fit the 16 kHz audio."""


class SpeechCodesMismatchError(DuplexSampleError):
    """Speech codes that do not cover the assistant's tokens, hold invalid values, or come without tokens."""


@dataclass(frozen=True)
class TimedToken:
    """One assistant text token and the time span (seconds, session clock) in which it is spoken."""

    token_id: int
    start_s: float
    end_s: float


@dataclass
class DuplexSample:
    """A recorded duplex session on one clock (seconds from the session start).

    `speech_codes` are the assistant's 25 Hz speech codes; code i covers
    [speech_codes_start_s + i/25, speech_codes_start_s + (i+1)/25). None trains text only.
    """

    audio_16k: Any
    frames: list[tuple[float, Image.Image]] = field(default_factory=list)
    assistant_tokens: list[TimedToken] = field(default_factory=list)
    speech_codes: Sequence[int] | np.ndarray | None = None
    speech_codes_start_s: float = 0.0
    system_prompt: str = DEFAULT_DUPLEX_SYSTEM_TEXT
    ref_audio: Any = None
    sampling_rate: int = SAMPLING_RATE


@dataclass
class DuplexUnit:
    """Where one unit sits in the sequence and what it carries.

    Positions index `DuplexSerialized.input_ids`; `end_pos` is exclusive (one past `</unit>`).
    Token indices index `DuplexSample.assistant_tokens`.
    """

    index: int
    start_s: float
    start_pos: int
    decision_pos: int
    end_pos: int
    has_frame: bool
    speak: bool
    forced_listen: bool
    end_of_turn: bool
    turn_index: int | None
    text_ids: list[int]
    text_token_indices: list[int]
    tts_condition_positions: list[int]  # text and <|turn_eos|> positions whose LLM hidden states feed the TTS
    speech_codes: list[int]
    code_token_indices: list[int]  # for each code, the index of the token whose speech it is


@dataclass
class DuplexSerialized:
    """A serialized session. `input_ids`, `labels` and the slot masks have shape [L]."""

    input_ids: torch.LongTensor
    labels: torch.LongTensor
    image_slot_mask: torch.BoolTensor
    audio_slot_mask: torch.BoolTensor
    system_length: int
    units: list[DuplexUnit]
    audio_chunks: list[np.ndarray]  # raw float32 16 kHz audio of each unit, the last ones zero-padded
    unit_frames: list[Image.Image | None]
    ref_audio: np.ndarray | None
    unit_seconds: float

    def model_inputs(
        self, processor, return_tensors: str | None = "pt", max_source_positions: int | None = None
    ) -> BatchFeature:
        """Model inputs of this one session (batch of 1), audio as the live loop encodes it; see `collate_duplex`."""
        return collate_duplex(
            [self], processor, return_tensors=return_tensors, max_source_positions=max_source_positions
        )


@dataclass(frozen=True)
class DuplexSerializerOptions:
    """The options of `serialize_duplex`, one object for the serializer and the duplex collator."""

    unit_seconds: float = 1.0
    max_speak_tokens_per_unit: int = 20
    lookahead_tokens: int = 2
    codes_per_unit: int | None = None  # default: 25 per second of unit
    force_listen_count: int = 0
    turn_gap_s: float = 1.0
    image_slots: int = IMAGE_SLOTS_PER_FRAME

    @property
    def resolved_codes_per_unit(self) -> int:
        """Speech codes per unit, with the 25-per-second default applied (and the unit geometry checked)."""
        return _check_unit_geometry(self.unit_seconds, self.codes_per_unit)[2]

    def as_kwargs(self) -> dict:
        return {name: getattr(self, name) for name in self.__dataclass_fields__}


_DEFAULTS = DuplexSerializerOptions()  # serialize_duplex's keyword defaults are these, not a second copy


def _check_unit_geometry(unit_seconds: float, codes_per_unit: int | None) -> tuple[int, int, int]:
    """(samples per unit, audio slots per unit, codes per unit)."""
    if not (isinstance(unit_seconds, (int, float)) and math.isfinite(unit_seconds) and unit_seconds > 0):
        raise TimelineMismatchError(f"unit_seconds must be a positive number, got {unit_seconds!r}")
    samples = unit_seconds * SAMPLING_RATE
    if abs(samples - round(samples)) > 1e-6:
        raise TimelineMismatchError(f"unit_seconds={unit_seconds} is not a whole number of 16 kHz samples")
    samples = int(round(samples))
    slots = audio_token_count(samples)
    if slots < 1:
        raise TimelineMismatchError(f"unit_seconds={unit_seconds} is too short to yield one audio token")
    if codes_per_unit is None:
        codes = unit_seconds * SPEECH_CODE_RATE
        if abs(codes - round(codes)) > 1e-6:
            raise TimelineMismatchError(
                f"unit_seconds={unit_seconds} is not a whole number of 25 Hz speech codes; pass codes_per_unit"
            )
        codes_per_unit = int(round(codes))
    if int(codes_per_unit) < 1:
        raise DuplexSampleError(f"codes_per_unit must be >= 1, got {codes_per_unit}")
    return samples, slots, int(codes_per_unit)


def _check_tokens(tokens: Sequence[TimedToken], layout: DuplexTokens, duration_s: float) -> None:
    previous_start = -math.inf
    for index, token in enumerate(tokens):
        if not isinstance(token, TimedToken):
            raise InvalidTimedTokenError(f"assistant_tokens[{index}] must be a TimedToken, got {type(token).__name__}")
        start, end = float(token.start_s), float(token.end_s)
        if not (math.isfinite(start) and math.isfinite(end)) or start < 0:
            raise InvalidTimedTokenError(f"assistant_tokens[{index}] has a bad time span ({start}, {end})")
        if end < start:
            raise InvalidTimedTokenError(f"assistant_tokens[{index}] ends before it starts ({start} > {end})")
        if start < previous_start:
            raise UnsortedTokensError(
                f"assistant_tokens are not sorted by start time: token {index} starts at {start} s, "
                f"before token {index - 1} ({previous_start} s)"
            )
        if int(token.token_id) in layout.layout_ids:
            raise InvalidTimedTokenError(
                f"assistant_tokens[{index}] is the layout token id {token.token_id}; turn/chunk markers are added "
                "by the serializer"
            )
        if start >= duration_s:
            raise TimelineMismatchError(
                f"assistant_tokens[{index}] starts at {start} s, after the end of the {duration_s:.3f} s of audio"
            )
        previous_start = start


def _check_frames(frames, duration_s: float) -> list[tuple[float, Image.Image]]:
    checked = []
    for index, entry in enumerate(frames):
        if not (isinstance(entry, (tuple, list)) and len(entry) == 2 and isinstance(entry[1], Image.Image)):
            raise DuplexSampleError(f"frames[{index}] must be a (time_s, PIL.Image) pair")
        time_s = float(entry[0])
        if not math.isfinite(time_s) or time_s < 0 or time_s >= duration_s:
            raise TimelineMismatchError(
                f"frames[{index}] has time {time_s} s, outside the {duration_s:.3f} s of audio"
            )
        checked.append((time_s, entry[1]))
    return sorted(checked, key=lambda pair: pair[0])


def _split_turns(tokens: Sequence[TimedToken], turn_gap_s: float) -> list[int]:
    """Turn index of every token: a new turn starts after a silence of at least `turn_gap_s`."""
    turns, turn = [], 0
    for index, token in enumerate(tokens):
        if index and token.start_s - tokens[index - 1].end_s >= turn_gap_s:
            turn += 1
        turns.append(turn)
    return turns


def _code_index(time_s: float, codes_start_s: float) -> int:
    return int(math.floor((time_s - codes_start_s) * SPEECH_CODE_RATE + 0.5))


def _code_ownership(
    tokens: Sequence[TimedToken], turns: list[int], codes: np.ndarray | None, codes_start_s: float
) -> list[tuple[int, int]]:
    """[first, end) code indices of each token's speech (all empty without codes)."""
    if codes is None:
        return [(0, 0)] * len(tokens)
    spans = []
    for index, token in enumerate(tokens):
        first = _code_index(token.start_s, codes_start_s)
        last_of_turn = index + 1 == len(tokens) or turns[index + 1] != turns[index]
        end = _code_index(token.end_s if last_of_turn else tokens[index + 1].start_s, codes_start_s)
        spans.append((first, max(first, end)))
    if spans:
        low, high = spans[0][0], max(end for _, end in spans)
        if low < 0 or high > len(codes):
            raise SpeechCodesMismatchError(
                f"speech codes cover [{codes_start_s:.3f}, {codes_start_s + len(codes) / SPEECH_CODE_RATE:.3f}) s "
                f"({len(codes)} codes) but the assistant speaks from {tokens[0].start_s:.3f} s to "
                f"{max(t.end_s for t in tokens):.3f} s"
            )
    return spans


def _check_codes(codes, has_tokens: bool) -> np.ndarray | None:
    if codes is None:
        return None
    array = np.asarray(codes)
    if array.ndim != 1 or (array.size and not np.issubdtype(array.dtype, np.integer)):
        raise SpeechCodesMismatchError(f"speech_codes must be a 1-D integer sequence, got shape {array.shape}")
    if array.size and (array.min() < 0 or array.max() >= SPEECH_CODEBOOK_SIZE):
        raise SpeechCodesMismatchError(
            f"speech codes must lie in [0, {SPEECH_CODEBOOK_SIZE}), got values in [{array.min()}, {array.max()}]"
        )
    if array.size and not has_tokens:
        raise SpeechCodesMismatchError("speech codes were given but there are no assistant tokens they could voice")
    return array.astype(np.int64)


@dataclass
class _TurnState:
    """Speech bookkeeping of the open turn."""

    turn: int
    token_indices: list[int]  # all tokens of the turn, in order
    emitted: int = 0  # how many of them have been emitted as text
    code_cursor: int = 0  # next code index to emit


def _plan_units(
    tokens: Sequence[TimedToken],
    turns: list[int],
    ownership: list[tuple[int, int]],
    n_audio_units: int,
    unit_seconds: float,
    text_capacity: int,
    codes_per_unit: int,
    lookahead_tokens: int,
    force_listen_count: int,
) -> list[dict]:
    """Decide, unit by unit, listen/speak, the text token indices, end of turn and the emitted code range."""
    tail_unit = [int(math.floor(token.start_s / unit_seconds + 1e-9)) for token in tokens]
    turn_members: dict[int, list[int]] = {}
    for index, turn in enumerate(turns):
        turn_members.setdefault(turn, []).append(index)
    queue, next_token, state, plans = deque(), 0, None, []
    max_units = n_audio_units + len(tokens) + sum(end - start for start, end in ownership) // codes_per_unit + 4
    k = 0
    while k < n_audio_units or queue or next_token < len(tokens) or state is not None:
        if k >= max_units:  # cannot happen: every speaking unit emits text, codes or ends its turn
            raise DuplexSampleError("duplex serialization did not converge; please report this sample")
        while next_token < len(tokens) and tail_unit[next_token] <= k:
            queue.append(next_token)
            next_token += 1
        forced = k < force_listen_count
        if forced or (state is None and not queue):
            plans.append(dict(speak=False, forced=forced, text=[], end_of_turn=False, turn=None, codes=(0, 0)))
            k += 1
            continue
        if state is None:
            turn = turns[queue[0]]
            members = turn_members[turn]
            state = _TurnState(turn, members, code_cursor=ownership[members[0]][0])
        text = []
        while queue and len(text) < text_capacity and turns[queue[0]] == state.turn:
            text.append(queue.popleft())
        state.emitted += len(text)
        text_done = state.emitted == len(state.token_indices)
        turn_code_end = ownership[state.token_indices[-1]][1]
        if text_done:
            released = turn_code_end
        else:
            held_from = state.emitted - lookahead_tokens  # index (in the turn) of the first held-back token
            released = ownership[state.token_indices[held_from]][0] if held_from > 0 else state.code_cursor
        take = max(0, min(codes_per_unit, released - state.code_cursor))
        codes = (state.code_cursor, state.code_cursor + take)
        state.code_cursor += take
        end_of_turn = text_done and state.code_cursor >= turn_code_end and len(text) < text_capacity
        plans.append(dict(speak=True, forced=False, text=text, end_of_turn=end_of_turn, turn=state.turn, codes=codes))
        if end_of_turn:
            state = None
        k += 1
    return plans


def serialize_duplex(
    sample: DuplexSample,
    tokenizer,
    unit_seconds: float = _DEFAULTS.unit_seconds,
    max_speak_tokens_per_unit: int = _DEFAULTS.max_speak_tokens_per_unit,
    lookahead_tokens: int = _DEFAULTS.lookahead_tokens,
    codes_per_unit: int | None = _DEFAULTS.codes_per_unit,
    force_listen_count: int = _DEFAULTS.force_listen_count,
    turn_gap_s: float = _DEFAULTS.turn_gap_s,
    image_slots: int = _DEFAULTS.image_slots,
) -> DuplexSerialized:
    """Serialize a recorded duplex session into the official unit layout with TAIL text/speech assignment.

    `codes_per_unit` defaults to 25 per second of unit. `lookahead_tokens` bounds how many of the latest text
    tokens have their speech deferred to a later unit. Labels equal `input_ids` on `<|listen|>`, `<|speak|>`,
    text, `<|turn_eos|>` and `<|chunk_eos|>` and are -100 elsewhere (system prompt, slots, `<unit>`, `</unit>`).
    """
    checked = _check_sample(sample, tokenizer, unit_seconds, max_speak_tokens_per_unit, lookahead_tokens,
                            codes_per_unit, force_listen_count, turn_gap_s)
    plans = _plan_units(
        checked.tokens, checked.turns, checked.ownership, checked.n_audio_units, float(unit_seconds),
        int(max_speak_tokens_per_unit) - 2, checked.codes_per_unit, int(lookahead_tokens), int(force_listen_count),
    )
    return _write_layout(checked, plans, tokenizer, sample.system_prompt, float(unit_seconds), image_slots)


@dataclass
class _CheckedSample:
    """A sample after every check, with its turns and code ownership worked out."""

    layout: DuplexTokens
    unit_samples: int
    audio_slots: int
    codes_per_unit: int
    audio: np.ndarray
    tokens: list
    frames: list
    codes: np.ndarray | None
    ref_audio: np.ndarray | None
    turns: list[int]
    ownership: list[tuple[int, int]]
    n_audio_units: int


def _check_sample(sample, tokenizer, unit_seconds, max_speak_tokens_per_unit, lookahead_tokens, codes_per_unit,
                  force_listen_count, turn_gap_s) -> _CheckedSample:
    """Every check of a sample and of the options, before anything is laid out; typed errors name the problem."""
    if not isinstance(sample, DuplexSample):
        raise DuplexSampleError(f"sample must be a DuplexSample, got {type(sample).__name__}")
    if int(sample.sampling_rate) != SAMPLING_RATE:
        raise UnsupportedSamplingRateError(
            f"duplex audio is given at {sample.sampling_rate} Hz but MiniCPM-o needs {SAMPLING_RATE} Hz; resample it"
        )
    if int(max_speak_tokens_per_unit) < 3:
        raise DuplexSampleError(
            f"max_speak_tokens_per_unit must be >= 3 (<|speak|>, one text token, <|chunk_eos|>), got "
            f"{max_speak_tokens_per_unit}"
        )
    if int(lookahead_tokens) < 0 or int(force_listen_count) < 0 or not turn_gap_s > 0:
        raise DuplexSampleError("lookahead_tokens and force_listen_count must be >= 0 and turn_gap_s > 0")
    layout = DuplexTokens.from_tokenizer(tokenizer)
    unit_samples, audio_slots, codes_per_unit = _check_unit_geometry(unit_seconds, codes_per_unit)
    audio = validate_waveform(sample.audio_16k, name="audio_16k")
    duration_s = audio.shape[0] / SAMPLING_RATE
    tokens = list(sample.assistant_tokens)
    _check_tokens(tokens, layout, duration_s)
    frames = _check_frames(sample.frames, duration_s)
    codes = _check_codes(sample.speech_codes, bool(tokens))
    ref_audio = None if sample.ref_audio is None else validate_waveform(sample.ref_audio, name="ref_audio")
    turns = _split_turns(tokens, float(turn_gap_s))
    ownership = _code_ownership(tokens, turns, codes, float(sample.speech_codes_start_s))
    return _CheckedSample(layout, unit_samples, audio_slots, codes_per_unit, audio, tokens, frames, codes, ref_audio,
                          turns, ownership, math.ceil(audio.shape[0] / unit_samples))


def _write_layout(checked: _CheckedSample, plans: list[dict], tokenizer, system_prompt: str, unit_seconds: float,
                  image_slots: int) -> DuplexSerialized:
    """The planned units in the official layout: ids, labels, slot masks, per-unit records, audio and frames."""
    layout, tokens, codes, frames = checked.layout, checked.tokens, checked.codes, checked.frames
    unit_samples = checked.unit_samples
    n_ref_slots = 0 if checked.ref_audio is None else audio_token_count(checked.ref_audio.shape[0])
    input_ids = system_prefix_ids(tokenizer, system_prompt, n_ref_slots, layout)
    system_length = len(input_ids)
    supervised = [False] * system_length
    units, chunks, unit_frames = [], [], []
    padded = np.zeros(len(plans) * unit_samples, dtype=np.float32)
    padded[: checked.audio.shape[0]] = checked.audio
    code_owner = np.full(0 if codes is None else len(codes), -1, dtype=np.int64)
    for index, (first, end) in enumerate(checked.ownership):
        code_owner[first:end] = index
    frame_cursor = 0
    for k, plan in enumerate(plans):
        start_s = k * unit_seconds
        while frame_cursor < len(frames) and frames[frame_cursor][0] <= start_s + 1e-9:
            frame_cursor += 1
        frame = frames[frame_cursor - 1][1] if frame_cursor else None
        text_ids = [int(tokens[index].token_id) for index in plan["text"]]
        head = unit_input_ids(layout, frame is not None, checked.audio_slots, image_slots)
        decision = unit_decision_ids(layout, plan["speak"], text_ids, plan["end_of_turn"])
        start_pos = len(input_ids)
        decision_pos = start_pos + len(head)
        input_ids += head + decision + [layout.unit_end]
        supervised += [False] * len(head) + [True] * len(decision) + [False]
        n_conditions = len(text_ids) + int(plan["end_of_turn"])
        first_code, end_code = plan["codes"]
        units.append(
            DuplexUnit(
                index=k,
                start_s=start_s,
                start_pos=start_pos,
                decision_pos=decision_pos,
                end_pos=len(input_ids),
                has_frame=frame is not None,
                speak=plan["speak"],
                forced_listen=plan["forced"],
                end_of_turn=plan["end_of_turn"],
                turn_index=plan["turn"],
                text_ids=text_ids,
                text_token_indices=list(plan["text"]),
                tts_condition_positions=list(range(decision_pos + 1, decision_pos + 1 + n_conditions)),
                speech_codes=[] if codes is None else codes[first_code:end_code].tolist(),
                code_token_indices=code_owner[first_code:end_code].tolist(),
            )
        )
        chunks.append(padded[k * unit_samples : (k + 1) * unit_samples].copy())
        unit_frames.append(frame)

    ids_tensor = torch.tensor(input_ids, dtype=torch.long)
    labels = torch.where(torch.tensor(supervised), ids_tensor, torch.full_like(ids_tensor, IGNORE_INDEX))
    image_mask, audio_mask = duplex_slot_masks(input_ids, layout)
    return DuplexSerialized(
        input_ids=ids_tensor,
        labels=labels,
        image_slot_mask=torch.from_numpy(image_mask),
        audio_slot_mask=torch.from_numpy(audio_mask),
        system_length=system_length,
        units=units,
        audio_chunks=chunks,
        unit_frames=unit_frames,
        ref_audio=checked.ref_audio,
        unit_seconds=unit_seconds,
    )


def streaming_audio_pieces(
    unit_audio: np.ndarray, streaming_mel: StreamingMelProcessor, max_source_positions: int
) -> list[torch.Tensor]:
    """One session's unit audio (16 kHz) -> log-mel pieces [n_mels, T_i], one per streaming Whisper cache segment.

    The audio goes through the inference front end one chunk (1 s) per call, as the live loop feeds it, and a new
    piece starts before every chunk at which `encode_unit` would empty its cache (`needs_cache_reset`). A piece is
    the core frames of its chunks plus the first right-redundancy frame of its last chunk: the conv's right context,
    which adds one encoder frame that no real frame attends to (it opens a new 1-s attention chunk) and pooling drops.
    A partial last chunk (units that are not whole seconds) is cut to its real frames and gets no right context.
    Per 1 s of audio a piece yields 100 mel frames -> 50 encoder frames -> 10 tokens.
    """
    chunk_samples, core_frames = streaming_mel.chunk_samples, streaming_mel.chunk_frames
    total_frames = unit_audio.shape[0] // streaming_mel.hop_length
    n_chunks = math.ceil(unit_audio.shape[0] / chunk_samples)
    stream = np.zeros(n_chunks * chunk_samples, dtype=np.float32)
    stream[: unit_audio.shape[0]] = unit_audio
    kept_frames_per_chunk = encoder_frames_from_mel_frames(core_frames)
    pieces, current, right_context, cached, state = [], [], [], 0, None
    for index in range(n_chunks):
        mel, state = streaming_mel.step(stream[index * chunk_samples : (index + 1) * chunk_samples], state)
        if mel is None:
            raise DuplexSampleError(
                "the streaming mel emitted no chunk for a full 1-s unit; it must pad its first chunk as the live "
                "duplex loop does (pad_first_chunk=True)"
            )
        if needs_cache_reset(cached, mel.shape[-1], max_source_positions):
            pieces.append(torch.cat(current + right_context, dim=-1))
            current, cached = [], 0
        left = 0 if index == 0 else streaming_mel.redundancy_frames
        frames = min(core_frames, total_frames - index * core_frames)
        current.append(mel[0, :, left : left + frames])
        cached += kept_frames_per_chunk
        right = left + core_frames
        right_context = [mel[0, :, right : right + 1]] if frames == core_frames and mel.shape[-1] > right else []
    pieces.append(torch.cat(current + right_context, dim=-1))
    return pieces


def _right_padded(pieces: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Mel pieces [n_mels, T_i] -> features [N, n_mels, T_max] (zero padded) and mask [N, T_max] (1 = real frame)."""
    longest = max(piece.shape[-1] for piece in pieces)
    features = torch.zeros((len(pieces), pieces[0].shape[0], longest), dtype=torch.float32)
    mask = torch.zeros((len(pieces), longest), dtype=torch.long)
    for row, piece in enumerate(pieces):
        features[row, :, : piece.shape[-1]] = piece
        mask[row, : piece.shape[-1]] = 1
    return features, mask


def collate_duplex(
    items: Sequence[DuplexSerialized],
    processor,
    return_tensors: str | None = "pt",
    pad_token_id: int | None = None,
    max_source_positions: int | None = None,
) -> BatchFeature:
    """Batch serialized sessions (right padded) with the encoder inputs the live duplex loop would compute.

    Returns `input_ids`, `attention_mask`, `labels` [B, L_max]; `input_features` [N_pieces, 80, T_max] and
    `input_features_mask` [N_pieces, T_max] with, per session in slot reading order, the reference audio (if any;
    offline features in 30 s pieces, as the live system prefix) and then the unit audio as streaming pieces (see
    `streaming_audio_pieces`: one piece per Whisper cache segment, i.e. up to 29 units = 2901 frames with 1500
    positions; 10 tokens per unit); `pixel_values` [N_frames, 3, 14, L*14] and `tgt_sizes` [N_frames, 2] for the
    unit frames as single 448-class thumbnails (max_slice_nums=1, no image id). Sessions follow one another.

    `max_source_positions` is the audio encoder's position table (`config.audio_config.max_source_positions`); None
    takes the extractor's 30 s (3000 mel frames -> 1500), Whisper's and MiniCPM-o's value. Building the streaming
    mel costs one log-mel over the (at most 30 s) buffer per unit, about 6 ms per second of audio on one CPU core.
    """
    if not items:
        raise DuplexSampleError("collate_duplex needs at least one serialized session")
    if return_tensors not in ("pt", None):
        raise DuplexSampleError(f"collate_duplex returns torch tensors; return_tensors={return_tensors!r} unsupported")
    extractor = processor.feature_extractor
    streaming_mel = StreamingMelProcessor(feature_extractor=extractor)
    if max_source_positions is None:
        max_source_positions = encoder_frames_from_mel_frames(int(extractor.nb_max_frames))
    one_unit = encoder_frames_from_mel_frames(streaming_mel.chunk_frames + 1)
    if not isinstance(max_source_positions, int) or max_source_positions <= one_unit:
        raise DuplexSampleError(
            f"max_source_positions must be an int above {one_unit} (one 1-s unit and its right context), got "
            f"{max_source_positions!r}"
        )
    if pad_token_id is None:
        pad_token_id = processor.tokenizer.convert_tokens_to_ids(MiniCPMOSpecialTokens.token_string("endoftext"))
    longest = max(int(item.input_ids.shape[0]) for item in items)
    input_ids = torch.full((len(items), longest), int(pad_token_id), dtype=torch.long)
    labels = torch.full((len(items), longest), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(items), longest), dtype=torch.long)
    pieces, frames = [], []
    for row, item in enumerate(items):
        length = int(item.input_ids.shape[0])
        input_ids[row, :length] = item.input_ids
        labels[row, :length] = item.labels
        attention_mask[row, :length] = 1
        item_pieces = []
        if item.ref_audio is not None:
            reference = extractor([item.ref_audio], return_tensors="pt")
            for features, mask in zip(reference["input_features"], reference["input_features_mask"]):
                item_pieces.append(features[:, : int(mask.sum())])
        item_pieces += streaming_audio_pieces(np.concatenate(item.audio_chunks), streaming_mel, max_source_positions)
        tokens = sum(frames_to_token_count(piece.shape[-1], extractor.audio_pool_step) for piece in item_pieces)
        if tokens != int(item.audio_slot_mask.sum()):
            raise DuplexSampleError(
                f"session {row}: {int(item.audio_slot_mask.sum())} audio slots but its audio pieces give {tokens} "
                f"tokens; duplex units must be a multiple of 0.1 s (unit_seconds={item.unit_seconds})"
            )
        pieces += item_pieces
        frames.extend(frame for frame in item.unit_frames if frame is not None)
    data: dict[str, Any] = {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
    data["input_features"], data["input_features_mask"] = _right_padded(pieces)
    if frames:
        sliced = processor.image_processor.preprocess(frames, max_slice_nums=1)
        strips = [strip for per_image in sliced["pixel_values"] for strip in per_image]
        data["pixel_values"] = torch.from_numpy(stack_patch_strips(strips))
        data["tgt_sizes"] = torch.from_numpy(np.concatenate(sliced["tgt_sizes"], axis=0).astype(np.int64))
    return BatchFeature(data=data)
