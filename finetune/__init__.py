"""Fine-tuning recipes for MiniCPM-o 4.5: chat data format, collators, training presets, TRL/PEFT runner.

Run from the repository root (this folder is not installed with the `minicpmo` package):

    python -m minicpmo.export --tiny runs/minicpmo-tiny
    python -m finetune.sft --config finetune/examples/tiny_lora_llm.yaml

See finetune/README.md. `finetune.sft` and `finetune.trainer` (which import TRL) are loaded only when used;
collators `speech` (speech_collator) and `duplex` (duplex_collator) are imported when built.
"""

from .collators import (
    COLLATORS,
    CollatorConfigError,
    TurnBasedCollator,
    build_collator,
    dataset_loader,
    register_collator,
)
from .config import Recipe, RecipeError, load_recipe, recipe_from_dict
from .data import ConversationFormatError, load_conversations, normalize_conversation
from .labels import IGNORE_INDEX, ChatTokenIds, LabelMaskError, assistant_only_labels
from .presets import PRESETS, PresetError, TrainingPreset, freeze_for_preset, get_preset, lora_config

__all__ = [
    "COLLATORS",
    "ChatTokenIds",
    "CollatorConfigError",
    "ConversationFormatError",
    "IGNORE_INDEX",
    "LabelMaskError",
    "PRESETS",
    "PresetError",
    "Recipe",
    "RecipeError",
    "TrainingPreset",
    "TurnBasedCollator",
    "assistant_only_labels",
    "build_collator",
    "dataset_loader",
    "freeze_for_preset",
    "get_preset",
    "load_conversations",
    "load_recipe",
    "lora_config",
    "normalize_conversation",
    "recipe_from_dict",
    "register_collator",
]
