"""Turn-based chat data for fine-tuning: load JSONL (or a saved `datasets` folder) and normalise conversations.

One row = `{"messages": [{"role": ..., "content": ...}, ...]}`. Content is a string or a list of items
`{"type": "text", "text": ...}`, `{"type": "image", "image": PATH}`, `{"type": "audio", "audio": PATH}`,
`{"type": "video", "video": PATH.mp4}` or `{"type": "video", "frames": [PATH, ...], "audio": PATH, "fps": 1}`.
Rows hold paths only; media are decoded lazily by the collator, one batch at a time. Relative paths are
resolved against a media root (by default the folder of the JSONL file).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from minicpmo.errors import DataFormatError

ROLES = ("system", "user", "assistant", "tool")
MEDIA_KEYS = {"image": ("image", "path"), "audio": ("audio", "path"), "video": ("video", "frames", "path")}
CONTENT_TYPES = ("text", "image", "audio", "video")


class ConversationFormatError(DataFormatError):
    """A training row that does not follow the chat data format (names the row and the problem)."""


def load_rows(source: str | os.PathLike, split: str = "train", error=None):
    """A `datasets.Dataset` from a .jsonl/.json file or a `save_to_disk` folder (shared by every data format)."""
    import datasets

    error = error or ConversationFormatError
    path = Path(source)
    if path.is_dir():
        loaded = datasets.load_from_disk(str(path))
        return loaded[split] if isinstance(loaded, datasets.DatasetDict) else loaded
    if path.is_file() and path.suffix in (".jsonl", ".json"):
        return datasets.load_dataset("json", data_files=str(path), split="train")
    if not path.exists():
        raise FileNotFoundError(f"training data not found: {str(path)!r}")
    raise error(f"unsupported data file {str(path)!r}: use a .jsonl file or a folder written by Dataset.save_to_disk")


def load_conversations(source: str | os.PathLike, split: str = "train"):
    """A `datasets.Dataset` with a `messages` column, from a .jsonl/.json file or a `save_to_disk` folder."""
    path = Path(source)
    dataset = load_rows(source, split)
    if "messages" not in dataset.column_names:
        raise ConversationFormatError(
            f"{str(path)!r} has columns {dataset.column_names}; the chat format needs a 'messages' column"
        )
    if len(dataset) == 0:
        raise ConversationFormatError(f"{str(path)!r} holds no conversations")
    return dataset


def default_media_root(source: str | os.PathLike) -> Path:
    """Relative media paths in a JSONL file are read relative to the file's folder."""
    path = Path(source)
    return path if path.is_dir() else path.parent


def _resolve(value: Any, media_root: Path | None) -> Any:
    if isinstance(value, (list, tuple)):
        return [_resolve(entry, media_root) for entry in value]
    if isinstance(value, str) and media_root is not None and not os.path.isabs(value) and "://" not in value:
        return str(media_root / value)
    return value


def resolve_media_path(value: Any, media_root: str | os.PathLike | None) -> Any:
    """A media path (or list of paths) as the collators open it: relative paths joined to `media_root`."""
    return _resolve(value, Path(media_root) if media_root is not None else None)


def normalize_item(item: Any, media_root: Path | None, where: str) -> dict:
    """One content item as the processor expects it: no null fields, media paths resolved, frames -> video."""
    if isinstance(item, str):
        return {"type": "text", "text": item}
    if not isinstance(item, dict):
        raise ConversationFormatError(f"{where}: content item must be a dict or a string, got {type(item).__name__}")
    item = {key: value for key, value in item.items() if value is not None}
    item_type = item.get("type")
    if item_type not in CONTENT_TYPES:
        raise ConversationFormatError(f"{where}: unsupported content type {item_type!r}; expected one of {CONTENT_TYPES}")
    if item_type == "text":
        if not isinstance(item.get("text"), str):
            raise ConversationFormatError(f"{where}: text item needs a string 'text'")
        return item
    keys = [key for key in MEDIA_KEYS[item_type] if key in item]
    if not keys:
        raise ConversationFormatError(f"{where}: {item_type} item needs one of {MEDIA_KEYS[item_type]}: {item!r}")
    if item_type == "video" and "frames" in item:
        item["video"] = item.pop("frames")
    for key in ("image", "audio", "video", "path"):
        if key in item:
            item[key] = _resolve(item[key], media_root)
    return item


def normalize_conversation(messages: Any, media_root: str | os.PathLike | None = None, row: Any = "?") -> list[dict]:
    """Validated copy of one conversation with list contents, so the chat template and the collator agree."""
    root = Path(media_root) if media_root is not None else None
    if not isinstance(messages, (list, tuple)) or not messages:
        raise ConversationFormatError(f"row {row}: 'messages' must be a non-empty list of messages")
    normalized = []
    for index, message in enumerate(messages):
        where = f"row {row}, message {index}"
        if not isinstance(message, dict):
            raise ConversationFormatError(f"{where}: a message must be a dict with 'role' and 'content'")
        role = message.get("role")
        if role not in ROLES:
            raise ConversationFormatError(f"{where}: unknown role {role!r}; expected one of {ROLES}")
        content = message.get("content")
        if content is None:
            content = []
        elif isinstance(content, (str, dict)):
            content = [content]
        items = [normalize_item(item, root, where) for item in content]
        extra = {key: value for key, value in message.items() if key not in ("role", "content") and value is not None}
        normalized.append({"role": role, **extra, "content": items})
    if not any(message["role"] == "assistant" for message in normalized):
        raise ConversationFormatError(f"row {row}: conversation has no assistant message, so nothing to learn")
    return normalized


__all__ = [
    "CONTENT_TYPES",
    "ConversationFormatError",
    "ROLES",
    "default_media_root",
    "load_conversations",
    "normalize_conversation",
    "normalize_item",
    "resolve_media_path",
]
