"""The collator registry: a recipe's `collator: NAME` -> the callable that turns rows into a batch.

Every collator is a callable `rows -> dict of tensors` built as `factory(processor, **collator_kwargs)`:
`turn_based` (chat_collator.TurnBasedCollator), `speech` (speech_collator.SpeechCollator) and `duplex`
(duplex_collator.DuplexCollator). Other modes plug in through `register_collator(name, factory)`.

Collators registered with `speech_tokenizer=True` take the S3 speech tokenizer that encodes target audio as the
keyword `speech_tokenizer`; `finetune.sft` passes the model's `token2wav.speech_tokenizer` when it builds them.
"""

from __future__ import annotations

from typing import Any, Callable

from .chat_collator import TurnBasedCollator
from .data import load_conversations
from .duplex_collator import DuplexCollator
from .duplex_data import load_duplex_sessions
from .errors import CollatorConfigError
from .speech_collator import SpeechCollator

CollatorFactory = Callable[..., Callable[[list[dict]], dict]]
DatasetLoader = Callable[..., Any]

COLLATORS: dict[str, CollatorFactory] = {
    "turn_based": TurnBasedCollator,
    "speech": SpeechCollator,
    "duplex": DuplexCollator,
}
# How a collator's training rows are loaded; collators not listed here read chat rows (`load_conversations`).
DATASET_LOADERS: dict[str, DatasetLoader] = {"duplex": load_duplex_sessions}
# Collators whose factory takes `speech_tokenizer=` (target audio encoded to S3 codes per batch).
SPEECH_TOKENIZER_COLLATORS: set[str] = {"speech", "duplex"}


def register_collator(name: str, factory: CollatorFactory, dataset_loader: DatasetLoader | None = None,
                      speech_tokenizer: bool = False) -> None:
    """Make `collator: NAME` available to recipes; `dataset_loader(path)` reads its rows when they are not chats;
    `speech_tokenizer=True` when the factory takes the model's speech tokenizer as `speech_tokenizer=`."""
    COLLATORS[name] = factory
    if dataset_loader is not None:
        DATASET_LOADERS[name] = dataset_loader
    if speech_tokenizer:
        SPEECH_TOKENIZER_COLLATORS.add(name)
    else:
        SPEECH_TOKENIZER_COLLATORS.discard(name)


def dataset_loader(name: str) -> DatasetLoader:
    """The function that loads training rows for collator `name` (chat rows by default)."""
    return DATASET_LOADERS.get(name, load_conversations)


def takes_speech_tokenizer(name: str) -> bool:
    """Whether collator `name` is built with `speech_tokenizer=`."""
    return name in SPEECH_TOKENIZER_COLLATORS


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
    "SPEECH_TOKENIZER_COLLATORS",
    "TurnBasedCollator",
    "build_collator",
    "dataset_loader",
    "register_collator",
    "takes_speech_tokenizer",
]
