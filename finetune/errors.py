"""Errors shared by the collators and their registry; this module imports nothing from finetune/."""

from __future__ import annotations

from minicpmo.errors import ConfigError


class CollatorConfigError(ConfigError):
    """Unknown collator name or options, or a row the chosen collator cannot take."""


__all__ = ["CollatorConfigError"]
