"""Recipe files: one YAML names the model, the data, the collator, the training preset and the SFTConfig.

    model: path or Hub id of a MiniCPM-o checkpoint   (e.g. a tiny export: python -m minicpmo.export --tiny DIR)
    dtype: float32 | bfloat16 | float16
    data: {train: FILE.jsonl | saved dataset folder, eval: optional, media_root: optional}
    collator: {name: turn_based, ...options of the collator}
    preset: lora_llm | lora_llm_projectors | lora_speech_decoder | speech_pretrain | joint_pretrain | joint_sft | full
            | sft_frozen_encoders | sft_fixed_embeddings
    lora: {r, alpha, dropout, target_modules, modules_to_save}      (LoRA presets only)
    sft: {...}                                                      (keyword arguments of trl.SFTConfig)
    merge_adapter: false                                            (also write OUTPUT_DIR/merged after training)
    speech_loss_weight: 1.0                                         (speech-decoder loss weight; speech/duplex)
    text_loss_weight: 1.0                                           (LM loss weight)
    labelled_logits_only: false                                     (LM head only at labelled positions: same
                                                                     loss, much faster on CPU for duplex data)

Relative paths are taken from the current directory (run recipes from the repository root).
"""

from __future__ import annotations

import copy
import os
import re
from dataclasses import dataclass, field
from typing import Any

import yaml

from minicpmo.errors import ConfigError

TOP_LEVEL_KEYS = (
    "model", "processor", "dtype", "data", "collator", "preset", "lora", "sft", "merge_adapter", "seed",
    "speech_loss_weight", "text_loss_weight", "labelled_logits_only",
)
DTYPES = ("float32", "bfloat16", "float16")


class RecipeError(ConfigError):
    """A recipe file with a missing, unknown or wrongly typed entry."""


@dataclass
class Recipe:
    model: str
    train_data: str
    processor: str | None = None
    dtype: str = "float32"
    eval_data: str | None = None
    media_root: str | None = None
    collator: dict[str, Any] = field(default_factory=lambda: {"name": "turn_based"})
    preset: str = "lora_llm"
    lora: dict[str, Any] = field(default_factory=dict)
    sft: dict[str, Any] = field(default_factory=dict)
    merge_adapter: bool = False
    speech_loss_weight: float = 1.0
    text_loss_weight: float = 1.0
    labelled_logits_only: bool = False

    @property
    def collator_name(self) -> str:
        return self.collator.get("name", "turn_based")

    @property
    def collator_kwargs(self) -> dict[str, Any]:
        return {key: value for key, value in self.collator.items() if key != "name"}


_SCIENTIFIC = re.compile(r"^[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+$")


def _fix_scientific(value: Any) -> Any:
    """PyYAML reads `2e-5` (no dot) as a string; every number-looking string becomes a float."""
    if isinstance(value, dict):
        return {key: _fix_scientific(entry) for key, entry in value.items()}
    if isinstance(value, list):
        return [_fix_scientific(entry) for entry in value]
    if isinstance(value, str) and _SCIENTIFIC.match(value):
        return float(value)
    return value


def _set_dotted(tree: dict, dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    node = tree
    for key in keys[:-1]:
        node = node.setdefault(key, {})
        if not isinstance(node, dict):
            raise RecipeError(f"cannot set {dotted!r}: {key!r} is not a mapping")
    node[keys[-1]] = value


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    """`key.sub=value` strings (value parsed as YAML) applied on a copy of the raw recipe."""
    raw = copy.deepcopy(raw)
    for override in overrides:
        if "=" not in override:
            raise RecipeError(f"override {override!r} must look like key.sub=value")
        key, value = override.split("=", 1)
        _set_dotted(raw, key.strip(), yaml.safe_load(value))
    return raw


def recipe_from_dict(raw: dict) -> Recipe:
    if not isinstance(raw, dict):
        raise RecipeError("a recipe must be a YAML mapping")
    raw = _fix_scientific(raw)
    unknown = sorted(set(raw) - set(TOP_LEVEL_KEYS))
    if unknown:
        raise RecipeError(f"unknown recipe keys {unknown}; allowed: {list(TOP_LEVEL_KEYS)}")
    if not raw.get("model"):
        raise RecipeError("recipe needs `model:` (a checkpoint folder or Hub id)")
    data = raw.get("data") or {}
    if not isinstance(data, dict) or not data.get("train"):
        raise RecipeError("recipe needs `data: {train: FILE.jsonl}`")
    dtype = raw.get("dtype", "float32")
    if dtype not in DTYPES:
        raise RecipeError(f"dtype must be one of {DTYPES}, got {dtype!r}")
    collator = raw.get("collator") or {"name": "turn_based"}
    if isinstance(collator, str):
        collator = {"name": collator}
    for key in ("lora", "sft"):
        if not isinstance(raw.get(key) or {}, dict):
            raise RecipeError(f"`{key}:` must be a mapping")
    weights = {}
    for key in ("speech_loss_weight", "text_loss_weight"):
        value = raw.get(key, 1.0)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
            raise RecipeError(f"`{key}:` must be a number >= 0, got {value!r}")
        weights[key] = float(value)
    labelled_only = raw.get("labelled_logits_only", False)
    if not isinstance(labelled_only, bool):
        raise RecipeError(f"`labelled_logits_only:` must be true or false, got {labelled_only!r}")
    sft = dict(raw.get("sft") or {})
    if "seed" in raw:
        sft.setdefault("seed", raw["seed"])
    return Recipe(
        model=str(raw["model"]),
        processor=raw.get("processor"),
        dtype=dtype,
        train_data=str(data["train"]),
        eval_data=data.get("eval"),
        media_root=data.get("media_root"),
        collator=dict(collator),
        preset=str(raw.get("preset", "lora_llm")),
        lora=dict(raw.get("lora") or {}),
        sft=sft,
        merge_adapter=bool(raw.get("merge_adapter", False)),
        labelled_logits_only=labelled_only,
        **weights,
    )


def load_recipe(path: str | os.PathLike, overrides: list[str] | None = None) -> Recipe:
    with open(path, encoding="utf-8") as handle:
        raw = yaml.safe_load(handle)
    return recipe_from_dict(_fix_scientific(apply_overrides(raw or {}, overrides or [])))


__all__ = ["Recipe", "RecipeError", "apply_overrides", "load_recipe", "recipe_from_dict"]
