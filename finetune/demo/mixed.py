"""Rehearsal: one trainer over several recipes' data, each batch drawn from one of them.

Duplex SFT alone makes the model forget turn-based chat (after the duplex stage the demo model answered scene
questions in chat with empty text). The last demo stage therefore trains on duplex sessions and scene questions
together. Batches stay homogeneous — each recipe's own collator builds them — so the dataset's rows are whole
pre-grouped batches (the trainer runs with batch size 1 and `GroupedBatchCollator` unwraps them).
"""

from __future__ import annotations

import json

import numpy as np

from minicpmo.errors import TrainingError


class MixedDataError(TrainingError):
    """No data, or a batch size that is not positive."""


def grouped_batches(sources: dict[str, object], batch_sizes: dict[str, int], seed: int = 0):
    """A `datasets.Dataset` whose rows are whole batches: `source` (the name) and `rows` (the batch's rows as JSON,
    since the sources' rows have different schemas). Every source's rows are shuffled and cut into its batch size,
    and the batches of all sources interleaved in a seeded random order (each row appears once per epoch)."""
    import datasets

    if not sources:
        raise MixedDataError("need at least one data source")
    rng = np.random.default_rng(seed)
    items: list[tuple[str, str]] = []
    for name, rows in sources.items():
        size = int(batch_sizes[name])
        if size < 1 or len(rows) == 0:
            raise MixedDataError(f"source {name!r} needs rows and a batch size >= 1, got {len(rows)}, {size}")
        order = rng.permutation(len(rows))
        items += [(name, json.dumps([rows[int(i)] for i in order[start:start + size]]))
                  for start in range(0, len(order), size)]
    items = [items[int(i)] for i in rng.permutation(len(items))]
    return datasets.Dataset.from_dict({"source": [name for name, _ in items], "rows": [rows for _, rows in items]})


class GroupedBatchCollator:
    """[{source, rows}] (batch size 1) -> the batch that the source's collator builds from its rows (each source's
    collator built complete, speech tokenizer included: see `finetune.sft.recipe_training_data`)."""

    def __init__(self, collators: dict[str, object]):
        self.collators = collators

    def __call__(self, items: list[dict]) -> dict:
        if len(items) != 1:
            raise MixedDataError(f"grouped batches need per_device_train_batch_size=1, got {len(items)} items")
        return self.collators[items[0]["source"]](json.loads(items[0]["rows"]))


__all__ = ["GroupedBatchCollator", "MixedDataError", "grouped_batches"]
