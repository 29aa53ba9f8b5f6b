"""Rehearsal: one trainer over several recipes' data, each batch drawn from one of them.

Duplex SFT alone makes the model forget turn-based chat (after the duplex stage the demo model answered scene
questions in chat with empty text). The last demo stage therefore trains on duplex sessions and scene questions
together. Batches stay homogeneous — each recipe's own collator builds them — so the dataset's items are whole
pre-grouped batches (the trainer runs with batch size 1 and `GroupedBatchCollator` unwraps them).
"""

from __future__ import annotations

import numpy as np
import torch


class MixedDataError(ValueError):
    """No data, or a batch size that is not positive."""


class GroupedBatches(torch.utils.data.Dataset):
    """Items are (source name, list of rows): every source's rows shuffled and cut into its batch size, the
    batches of all sources interleaved in a seeded random order (each row appears once per epoch)."""

    def __init__(self, sources: dict[str, object], batch_sizes: dict[str, int], seed: int = 0):
        if not sources:
            raise MixedDataError("need at least one data source")
        rng = np.random.default_rng(seed)
        self.items: list[tuple[str, list]] = []
        for name, rows in sources.items():
            size = int(batch_sizes[name])
            if size < 1 or len(rows) == 0:
                raise MixedDataError(f"source {name!r} needs rows and a batch size >= 1, got {len(rows)}, {size}")
            order = rng.permutation(len(rows))
            self.items += [(name, [rows[int(i)] for i in order[start:start + size]])
                           for start in range(0, len(order), size)]
        self.items = [self.items[int(i)] for i in rng.permutation(len(self.items))]

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> tuple[str, list]:
        return self.items[index]


class GroupedBatchCollator:
    """[(name, rows)] (batch size 1) -> the batch that source `name`'s collator builds from `rows`."""

    def __init__(self, collators: dict[str, object]):
        self.collators = collators

    @property
    def speech_tokenizer(self):
        return None

    @speech_tokenizer.setter
    def speech_tokenizer(self, value):
        for collator in self.collators.values():
            if hasattr(collator, "speech_tokenizer") and collator.speech_tokenizer is None:
                collator.speech_tokenizer = value

    def __call__(self, items: list[tuple[str, list]]) -> dict:
        if len(items) != 1:
            raise MixedDataError(f"grouped batches need per_device_train_batch_size=1, got {len(items)} items")
        name, rows = items[0]
        return self.collators[name](rows)


__all__ = ["GroupedBatchCollator", "GroupedBatches", "MixedDataError"]
