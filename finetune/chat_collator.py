"""`collator: turn_based`: rows of chat data -> model inputs with assistant-only labels; media decoded per batch.

`TurnBasedCollator` covers turn-based multimodal chat with text answers; `speech_collator.SpeechCollator` builds on
it for spoken answers. Collators are looked up by name in the registry of collators.py.
"""

from __future__ import annotations

import os
from typing import Any

import torch

from minicpmo.processing.chat_template_minicpmo import messages_have_audio
from minicpmo.processing.media_loading_minicpmo import expand_video_items, load_audio, load_image
from minicpmo.special_tokens import MiniCPMOSpecialTokens

from .data import normalize_conversation
from .errors import CollatorConfigError
from .labels import ChatTokenIds, assistant_only_labels

TTS_BOS = MiniCPMOSpecialTokens.token_string("tts_bos")
TTS_EOS = MiniCPMOSpecialTokens.token_string("tts_eos")


def _as_generated_answer(message: dict) -> dict:
    """An answer as the model writes it after a `<|tts_bos|>` prompt: `<|tts_bos|>TEXT<|tts_eos|>` (once)."""
    text = "".join(item["text"] for item in message["content"])
    if text.startswith(TTS_BOS):
        return message
    return {**message, "content": [{"type": "text", "text": TTS_BOS + text + TTS_EOS}]}


def follows_audio(messages: list[dict], index: int) -> bool:
    """chat() prompts the answer at `index` with `<|tts_bos|>` when an earlier message holds audio."""
    return messages_have_audio(messages[:index])


class TurnBasedCollator:
    """Turn-based multimodal SFT batches; loss on assistant tokens only (`labels` -100 elsewhere).

    Output: `input_ids`/`attention_mask`/`labels` [B, L] (right padded), and when the batch has them
    `pixel_values` [N_slices, 3, 14, L_max*14] + `tgt_sizes` [N_slices, 2], `input_features` [N_audio, 80, T]
    + `input_features_mask` [N_audio, T]. Video items become 1-fps frames + 1-s audio (omni mode).
    """

    def __init__(
        self,
        processor,
        media_root: str | os.PathLike | None = None,
        max_slice_nums: int | None = None,
        max_length: int | None = None,
        last_turn_only: bool = False,
        enable_thinking: bool = False,
    ):
        self.processor = processor
        self.media_root = media_root
        self.max_slice_nums = max_slice_nums
        self.max_length = max_length
        self.last_turn_only = last_turn_only
        self.enable_thinking = enable_thinking
        self.token_ids = ChatTokenIds.from_tokenizer(processor.tokenizer)

    def render(self, messages: list[dict]) -> tuple[str, list[Any], list[Any]]:
        """Prompt text with media patterns, plus the decoded images (PIL) and 16 kHz audio in reading order.

        An answer that follows audio (a video's sound included) is written `<|tts_bos|>TEXT<|tts_eos|>`, as the model
        generates it after the prompt chat() builds for that conversation; the labels mask the `<|tts_bos|>`.
        """
        messages, has_video = expand_video_items(messages)
        messages = [
            _as_generated_answer(message) if message["role"] == "assistant" and follows_audio(messages, index) else message
            for index, message in enumerate(messages)
        ]
        text = self.processor.apply_chat_template(
            messages, tokenize=False, omni_mode=has_video, enable_thinking=self.enable_thinking
        )
        images, audio = [], []
        for message in messages:
            for item in message["content"]:
                if item["type"] == "image":
                    images.append(load_image(item.get("image", item.get("path"))))
                elif item["type"] == "audio":
                    audio.append(load_audio(item.get("audio", item.get("path")), item.get("sampling_rate")))
        return text, images, audio

    def conversation(self, row: dict, index: int) -> list[dict]:
        """One row's validated messages (media paths resolved); assistant messages must be text here."""
        where = f"row {row.get('id', index)}"
        messages = normalize_conversation(row["messages"], self.media_root, row=row.get("id", index))
        for message in messages:
            if message["role"] != "assistant":
                continue
            if any(item["type"] != "text" for item in message["content"]):
                raise CollatorConfigError(
                    f"{where}: assistant messages must be text for the turn-based collator "
                    "(speech answers need a speech collator)"
                )
            text = "".join(item["text"] for item in message["content"])
            if TTS_BOS in text or TTS_EOS in text:
                raise CollatorConfigError(f"{where}: assistant text must not contain {TTS_BOS} / {TTS_EOS}")
        return messages

    def encode(self, conversations: list[list[dict]]) -> dict[str, torch.Tensor]:
        """Normalised conversations -> the padded batch with assistant-only `labels` (media decoded here)."""
        texts, images, audio, turns = [], [], [], []
        for messages in conversations:
            text, sample_images, sample_audio = self.render(messages)
            texts.append(text)
            images.append(sample_images)
            audio.append(sample_audio)
            turns.append(sum(message["role"] == "assistant" for message in messages))
        processor_kwargs = {"max_length": self.max_length}
        if self.max_slice_nums is not None:
            processor_kwargs["max_slice_nums"] = self.max_slice_nums
        batch = self.processor(
            text=texts,
            images=images if any(images) else None,
            audio=audio if any(audio) else None,
            padding_side="right",
            return_tensors="pt",
            **processor_kwargs,
        )
        batch = dict(batch)
        batch["labels"] = assistant_only_labels(
            batch["input_ids"], batch["attention_mask"], self.token_ids, turns, self.last_turn_only
        )
        return batch

    def __call__(self, rows: list[dict]) -> dict[str, torch.Tensor]:
        return self.encode([self.conversation(row, index) for index, row in enumerate(rows)])


__all__ = ["TTS_BOS", "TTS_EOS", "TurnBasedCollator", "follows_audio"]
