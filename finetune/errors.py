"""Errors shared by the collators and their registry; this module imports nothing from finetune/."""

from __future__ import annotations


class CollatorConfigError(ValueError):
    """Unknown collator name or options, or a row the chosen collator cannot take."""


__all__ = ["CollatorConfigError"]
