"""`collator: speech`: turn-based chat whose assistant answers are also spoken (speech-decoder targets).

Row format (finetune/README.md, "Speech output"): an assistant message carries its speech target as
`"speech": {"audio": "media/answer.wav"}` (encoded to S3 codes here, per batch) or `"speech": {"codes": [...]}`
(precomputed 25 Hz S3 codes). The voice reference is an audio item of the system message.

The spoken answer is rendered as the model generates it with `use_tts_template=True`:
`<|im_start|>assistant\\n<think>\\n\\n</think>\\n\\n<|tts_bos|>TEXT<|tts_eos|><|im_end|>`. Text labels are those of
`TurnBasedCollator` (which masks `<|tts_bos|>`: it belongs to the generation prompt), so TEXT, `<|tts_eos|>` and
`<|im_end|>` are learned. The speech decoder is conditioned on TEXT's tokens and the LLM hidden states at their
positions (official §6), which the batch carries as `speech_*` tensors (see speech_targets).
"""

from __future__ import annotations

from typing import Any

import torch

from minicpmo.special_tokens import MiniCPMOSpecialTokens

from .chat_collator import TTS_BOS, TTS_EOS, TurnBasedCollator
from .data import normalize_conversation
from .errors import CollatorConfigError
from .labels import assistant_spans
from .speech_targets import SpeechTargetError, SpeechUnitTarget, encode_speech, pack_speech_targets, speech_target_of


class SpeechCollator(TurnBasedCollator):
    """Turn-based batch (`TurnBasedCollator` keys and labels) + speech-decoder targets (`speech_*`, see
    speech_targets): one unit per spoken assistant answer, text_eos layout, EOS after the last code.

    `speech_tokenizer` (an `S3SpeechTokenizer`, e.g. the model's `token2wav.speech_tokenizer`, which `finetune.sft`
    passes in) encodes target audio; rows with precomputed codes need none. `require_voice_reference` insists on a
    system audio item in every row that has speech.
    """

    def __init__(self, processor, media_root=None, speech_tokenizer=None, require_voice_reference: bool = True,
                 **kwargs: Any):
        super().__init__(processor, media_root=media_root, **kwargs)
        self.speech_tokenizer = speech_tokenizer
        self.require_voice_reference = require_voice_reference
        special = MiniCPMOSpecialTokens.from_tokenizer(processor.tokenizer)
        self.tts_bos_id = special.tts_bos
        self.tts_eos_id = special.tts_eos

    def conversation(self, row: dict, index: int) -> list[dict]:
        """Validated messages with every spoken answer wrapped as `<|tts_bos|>TEXT<|tts_eos|>`."""
        where = f"row {row.get('id', index)}"
        messages = normalize_conversation(row["messages"], self.media_root, row=row.get("id", index))
        spoken = 0
        for message in messages:
            target = speech_target_of(message) if message["role"] == "assistant" else None
            if message["role"] != "assistant":
                message.pop("speech", None)
                continue
            if any(item["type"] != "text" for item in message["content"]):
                raise CollatorConfigError(
                    f"{where}: assistant content must be text; put the answer's audio in `speech: {{audio: ...}}`"
                )
            if target is None:
                continue
            text = "".join(item["text"] for item in message["content"])
            if TTS_BOS in text or TTS_EOS in text:
                raise SpeechTargetError(f"{where}: assistant text must not contain {TTS_BOS} / {TTS_EOS}")
            message["content"] = [{"type": "text", "text": TTS_BOS + text + TTS_EOS}]
            spoken += 1
        if spoken and self.require_voice_reference:
            system = messages[0] if messages[0]["role"] == "system" else None
            if system is None or not any(item["type"] == "audio" for item in system["content"]):
                raise SpeechTargetError(
                    f"{where}: a spoken answer needs a voice reference, an audio item in the system message "
                    "(or set collator option require_voice_reference: false)"
                )
        return messages

    def __call__(self, rows: list[dict]) -> dict[str, torch.Tensor]:
        conversations = [self.conversation(row, index) for index, row in enumerate(rows)]
        batch = self.encode(conversations)
        units, turn = [], 0
        for row_index, (row, messages) in enumerate(zip(rows, conversations)):
            where = f"row {row.get('id', row_index)}"
            targets = [speech_target_of(message) for message in row["messages"] if message.get("role") == "assistant"]
            spans = self._answer_spans(batch["input_ids"][row_index].tolist(), len(targets), where)
            for target, span in zip(targets, spans):
                if target is None:
                    continue
                if span is None:
                    raise SpeechTargetError(f"{where}: a spoken answer has no {TTS_BOS} ... {TTS_EOS} span (truncated?)")
                codes = encode_speech(target, self.speech_tokenizer, self.media_root, where)
                units.append(SpeechUnitTarget(row_index, turn, list(range(*span)), codes, True, True, where))
                turn += 1
        batch.update(pack_speech_targets(units))
        return batch

    def _answer_spans(self, ids: list[int], expected: int, where: str) -> list[tuple[int, int] | None]:
        """Per assistant answer: [start, end) of its text between `<|tts_bos|>` and `<|tts_eos|>`, or None."""
        spans = []
        for start, end in assistant_spans(ids, self.token_ids):
            stop = next((index for index in range(start, end) if ids[index] == self.tts_eos_id), None)
            spans.append((start, stop) if ids[start - 1] == self.tts_bos_id and stop is not None else None)
        if len(spans) != expected:
            raise SpeechTargetError(f"{where}: found {len(spans)} assistant answers in the tokens, {expected} in the row")
        return spans


__all__ = ["SpeechCollator"]
