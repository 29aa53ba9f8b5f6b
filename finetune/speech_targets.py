"""Speech-decoder targets: how a row's speech target becomes S3 codes (`encode_speech`, with the speech tokenizer
that encodes target audio), the targets a batch carries, and how the trainer turns them into `SpeechSegment`s.

A speech target (an assistant message's `speech`, a duplex row's `assistant_speech`) is `{"codes": [...]}`
(precomputed 25 Hz S3 codes) or `{"audio": PATH}`, encoded here by the `S3SpeechTokenizer` its collator was
built with (`finetune.sft` passes the model's `token2wav.speech_tokenizer`).

Both speech collators describe their targets as units (a turn-based spoken answer is one unit; a duplex turn is
several units in a row). A batch then carries, for U units (all tensors, so the Trainer moves them to the device):

    speech_row            [U]            batch row whose LLM hidden states condition the unit
    speech_turn           [U]            turn id; consecutive units with the same id form one causal sequence
    speech_positions      [U, n_max]     token positions (into input_ids) of the unit's spoken tokens, 0-padded
    speech_positions_mask [U, n_max]     1 on real positions
    speech_codes          [U, m_max]     target S3 codes, right padded with -100
    speech_eos            [U]            whether EOS is a target after the unit's last code
    speech_text_eos       [U]            turn-based layout (text_eos before audio_bos, config normalisation) when
                                         true, duplex unit (no text_eos, always L2-normalised) when false

The hidden state at a spoken position is the LLM's final-norm state where that token is the *input* (official §6).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from minicpmo.errors import DataFormatError
from minicpmo.processing.duplex_serializer_minicpmo import SPEECH_CODEBOOK_SIZE
from minicpmo.processing.media_loading_minicpmo import load_audio

from .data import resolve_media_path
from .labels import IGNORE_INDEX

SPEECH_KEYS = (
    "speech_row",
    "speech_turn",
    "speech_positions",
    "speech_positions_mask",
    "speech_codes",
    "speech_eos",
    "speech_text_eos",
)


class SpeechTargetError(DataFormatError):
    """A speech target that cannot be used (no codes and no audio, codes out of range, span not found...)."""


def speech_target_of(message: dict, key: str = "speech") -> dict | None:
    """A message's (or row's) speech target without null fields (datasets fills missing struct fields with None)."""
    target = message.get(key)
    if target is None:
        return None
    if not isinstance(target, dict):
        raise SpeechTargetError(f"`{key}` must be a mapping with 'audio' or 'codes', got {type(target).__name__}")
    return {name: value for name, value in target.items() if value is not None}


def encode_speech(target: dict, speech_tokenizer, media_root, where: str) -> list[int]:
    """Codes of one target: the precomputed `codes`, else `audio` (path) through the S3 speech tokenizer."""
    if "codes" in target:
        return [int(code) for code in target["codes"]]
    if "audio" not in target:
        raise SpeechTargetError(f"{where}: a speech target needs 'audio' (a wav path) or 'codes' (S3 codes)")
    if speech_tokenizer is None:
        raise SpeechTargetError(
            f"{where}: encoding target audio needs a speech tokenizer; build the collator with "
            "speech_tokenizer= (finetune.sft passes the model's token2wav.speech_tokenizer), or precompute 'codes'"
        )
    path = resolve_media_path(target["audio"], media_root)
    return speech_tokenizer.encode(load_audio(path)).tolist()


@dataclass
class SpeechUnitTarget:
    """One unit of speech supervision, before padding."""

    row: int
    turn: int
    positions: list[int]
    codes: list[int]
    end_with_eos: bool
    text_eos: bool
    where: str = field(default="?", compare=False)

    def __post_init__(self):
        bad = [code for code in self.codes if not 0 <= int(code) < SPEECH_CODEBOOK_SIZE]
        if bad:
            raise SpeechTargetError(f"{self.where}: speech codes must lie in [0, {SPEECH_CODEBOOK_SIZE}), got {bad[:5]}")


def pack_speech_targets(units: list[SpeechUnitTarget]) -> dict[str, torch.Tensor]:
    """Units -> the padded `speech_*` tensors described in the module docstring (U may be 0)."""
    longest_text = max((len(unit.positions) for unit in units), default=0)
    longest_codes = max((len(unit.codes) for unit in units), default=0)
    count = len(units)
    positions = torch.zeros(count, max(longest_text, 1), dtype=torch.long)
    positions_mask = torch.zeros(count, max(longest_text, 1), dtype=torch.bool)
    codes = torch.full((count, max(longest_codes, 1)), IGNORE_INDEX, dtype=torch.long)
    for index, unit in enumerate(units):
        positions[index, : len(unit.positions)] = torch.tensor(unit.positions, dtype=torch.long)
        positions_mask[index, : len(unit.positions)] = True
        codes[index, : len(unit.codes)] = torch.tensor([int(code) for code in unit.codes], dtype=torch.long)
    return {
        "speech_row": torch.tensor([unit.row for unit in units], dtype=torch.long),
        "speech_turn": torch.tensor([unit.turn for unit in units], dtype=torch.long),
        "speech_positions": positions,
        "speech_positions_mask": positions_mask,
        "speech_codes": codes,
        "speech_eos": torch.tensor([unit.end_with_eos for unit in units], dtype=torch.bool),
        "speech_text_eos": torch.tensor([unit.text_eos for unit in units], dtype=torch.bool),
    }


def speech_sequences(targets: dict[str, torch.Tensor], input_ids: torch.Tensor, hidden: torch.Tensor):
    """Packed targets + the batch's input_ids [B, L] and LLM hidden states [B, L, D] -> `SpeechSegment` lists,
    one list per turn, ready for `MiniCPMOSpeechDecoder.teacher_forced_forward` (gradients reach `hidden`)."""
    from minicpmo.modeling.modeling_speech_decoder import SpeechSegment

    sequences: list[list] = []
    previous_turn = None
    for unit in range(targets["speech_row"].shape[0]):
        row = int(targets["speech_row"][unit])
        positions = targets["speech_positions"][unit][targets["speech_positions_mask"][unit].bool()]
        codes = targets["speech_codes"][unit]
        text_eos = bool(targets["speech_text_eos"][unit])
        segment = SpeechSegment(
            text_ids=input_ids[row, positions.to(input_ids.device)],
            llm_hidden=hidden[row, positions.to(hidden.device)],
            codes=codes[codes != IGNORE_INDEX],
            text_eos=text_eos,
            end_with_eos=bool(targets["speech_eos"][unit]),
            normalize=None if text_eos else True,
        )
        turn = int(targets["speech_turn"][unit])
        if turn != previous_turn:
            sequences.append([])
            previous_turn = turn
        sequences[-1].append(segment)
    return sequences


__all__ = [
    "SPEECH_KEYS",
    "SpeechTargetError",
    "SpeechUnitTarget",
    "encode_speech",
    "pack_speech_targets",
    "speech_sequences",
    "speech_target_of",
]
