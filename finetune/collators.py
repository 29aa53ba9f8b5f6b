"""Batch collators: rows of chat data -> model inputs with labels. Media are decoded here, per batch.

`TurnBasedCollator` covers turn-based multimodal chat (text answers); `speech` (speech_collator.SpeechCollator)
adds speech-decoder targets to it and `duplex` (duplex_collator.DuplexCollator) serializes full-duplex sessions.
Other modes plug in through `register_collator(name, factory)`; a recipe picks one with `collator: NAME`.
Every collator is a callable `rows -> dict of tensors` built as `factory(processor, **collator_kwargs)`.
"""

from __future__ import annotations

import os
from typing import Any, Callable

import torch

from minicpmo.processing.media_loading_minicpmo import expand_video_items, load_audio, load_image

from .data import normalize_conversation
from .labels import ChatTokenIds, assistant_only_labels


class CollatorConfigError(ValueError):
    """Unknown collator name or options."""


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
        """Prompt text with media patterns, plus the decoded images (PIL) and 16 kHz audio in reading order."""
        messages, has_video = expand_video_items(messages)
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
        messages = normalize_conversation(row["messages"], self.media_root, row=row.get("id", index))
        for message in messages:
            if message["role"] == "assistant" and any(item["type"] != "text" for item in message["content"]):
                raise CollatorConfigError(
                    f"row {row.get('id', index)}: assistant messages must be text for the turn-based collator "
                    "(speech answers need a speech collator)"
                )
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


CollatorFactory = Callable[..., Callable[[list[dict]], dict]]
DatasetLoader = Callable[..., Any]


def _speech_collator(processor, **kwargs):
    from .speech_collator import SpeechCollator

    return SpeechCollator(processor, **kwargs)


def _duplex_collator(processor, **kwargs):
    from .duplex_collator import DuplexCollator

    return DuplexCollator(processor, **kwargs)


def _load_duplex_sessions(source, split: str = "train"):
    from .duplex_data import load_duplex_sessions

    return load_duplex_sessions(source, split)


COLLATORS: dict[str, CollatorFactory] = {
    "turn_based": TurnBasedCollator,
    "speech": _speech_collator,
    "duplex": _duplex_collator,
}
# How a collator's training rows are loaded; collators not listed here read chat rows (`load_conversations`).
DATASET_LOADERS: dict[str, DatasetLoader] = {"duplex": _load_duplex_sessions}


def register_collator(name: str, factory: CollatorFactory, dataset_loader: DatasetLoader | None = None) -> None:
    """Make `collator: NAME` available to recipes; `dataset_loader(path)` reads its rows when they are not chats."""
    COLLATORS[name] = factory
    if dataset_loader is not None:
        DATASET_LOADERS[name] = dataset_loader


def dataset_loader(name: str) -> DatasetLoader:
    """The function that loads training rows for collator `name` (chat rows by default)."""
    from .data import load_conversations

    return DATASET_LOADERS.get(name, load_conversations)


def build_collator(name: str, processor, **kwargs):
    if name not in COLLATORS:
        raise CollatorConfigError(f"unknown collator {name!r}; registered: {sorted(COLLATORS)}")
    try:
        return COLLATORS[name](processor, **kwargs)
    except TypeError as error:
        raise CollatorConfigError(f"bad options for collator {name!r}: {error}") from error


__all__ = [
    "COLLATORS",
    "CollatorConfigError",
    "DATASET_LOADERS",
    "TurnBasedCollator",
    "build_collator",
    "dataset_loader",
    "register_collator",
]
