"""`collator: duplex`: recorded full-duplex sessions -> Omni-Flow training batches (official §8, paper TAIL).

Each row (format in duplex_data) becomes a `DuplexSample`, is serialized by
`minicpmo.processing.duplex_serializer_minicpmo.serialize_duplex` into the unit layout the live loop builds, and
the sessions are batched by `collate_duplex` (right padded; the session audio cut into the pieces the live
Whisper cache would see, so training features match streaming inference; frames per unit). LM labels sit on
`<|listen|>` / `<|speak|>`, the unit text, `<|turn_eos|>` and `<|chunk_eos|>` only.

Speech targets (`speech_*`, see speech_targets): one unit per speaking unit, the units of an assistant turn forming
one causal speech-decoder sequence (KV and positions persist across a turn's units, as in generation). A unit is
conditioned on its text and `<|turn_eos|>` positions (`DuplexUnit.tts_condition_positions`) and predicts its codes;
EOS is a target only where generation may stop early: on the first unit of a turn or on the `<|turn_eos|>` unit,
when that unit has fewer than `codes_per_unit` codes.
"""

from __future__ import annotations

from dataclasses import replace

import torch

from minicpmo.processing.duplex_serializer_minicpmo import (
    DuplexSample,
    collate_duplex,
    DuplexSerializerOptions,
    serialize_duplex,
)

from .duplex_data import session_from_row
from .speech_targets import SpeechUnitTarget, pack_speech_targets


class DuplexCollator:
    """Rows of duplex sessions -> `input_ids` / `attention_mask` / `labels` [B, L], `input_features` [N_pieces, 80, T]
    + `input_features_mask`, optional `pixel_values` + `tgt_sizes`, and the `speech_*` targets.

    Rows are JSONL mappings (duplex_data format) or ready `DuplexSample`s (in-memory sessions, e.g. synthetic
    episodes). Serializer options are the fields of `DuplexSerializerOptions` (`unit_seconds`,
    `max_speak_tokens_per_unit`, `lookahead_tokens`, `codes_per_unit`, `force_listen_count`, `turn_gap_s`,
    `image_slots`), given as one `options` object and/or as keywords (a recipe's `collator:` keys), which override
    it; they pass through to `serialize_duplex`. `image_slots`, unless given, is the processor's
    `image_feature_size`, which must equal the model's `query_num`.
    `speech_tokenizer` (the model's `token2wav.speech_tokenizer`, which `finetune.sft` passes in) encodes
    `assistant_speech.audio`; sessions with precomputed codes need none.
    """

    def __init__(
        self,
        processor,
        media_root=None,
        speech_tokenizer=None,
        options: DuplexSerializerOptions | None = None,
        **option_values,
    ):
        self.processor = processor
        self.media_root = media_root
        self.speech_tokenizer = speech_tokenizer
        if option_values.get("image_slots") is None:
            option_values.pop("image_slots", None)
            if options is None:
                option_values["image_slots"] = processor.image_processor.image_feature_size
        options = replace(options or DuplexSerializerOptions(), **option_values)  # unknown keys: TypeError
        self.options = replace(options, turn_gap_s=float(options.turn_gap_s), image_slots=int(options.image_slots))
        self.codes_per_unit = self.options.resolved_codes_per_unit

    def serialize(self, row, index: int = 0):
        if isinstance(row, DuplexSample):
            sample = row
        else:
            sample = session_from_row(
                row, self.processor.tokenizer, self.media_root, self.speech_tokenizer, self.options.turn_gap_s, index
            )
        return serialize_duplex(sample, self.processor.tokenizer, **self.options.as_kwargs())

    def speech_units(self, serialized, row: int, first_turn_id: int) -> list[SpeechUnitTarget]:
        """Speech targets of one serialized session; turn ids continue from `first_turn_id`."""
        units, turn_ids = [], {}
        has_speech = any(unit.speech_codes for unit in serialized.units)
        if not has_speech:
            return units
        for unit in serialized.units:
            if not unit.speak:
                continue
            starts_turn = unit.turn_index not in turn_ids
            if starts_turn:
                turn_ids[unit.turn_index] = first_turn_id + len(turn_ids)
            may_stop = starts_turn or unit.end_of_turn
            units.append(SpeechUnitTarget(
                row=row,
                turn=turn_ids[unit.turn_index],
                positions=list(unit.tts_condition_positions),
                codes=list(unit.speech_codes),
                end_with_eos=may_stop and len(unit.speech_codes) < self.codes_per_unit,
                text_eos=False,
                where=f"session {row}, unit {unit.index}",
            ))
        return units

    def __call__(self, rows: list[dict]) -> dict[str, torch.Tensor]:
        serialized = [self.serialize(row, index) for index, row in enumerate(rows)]
        batch = dict(collate_duplex(serialized, self.processor))
        units: list[SpeechUnitTarget] = []
        for row, item in enumerate(serialized):
            units += self.speech_units(item, row, first_turn_id=len({unit.turn for unit in units}))
        batch.update(pack_speech_targets(units))
        return batch


__all__ = ["DuplexCollator"]
