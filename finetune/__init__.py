"""Fine-tuning recipes for MiniCPM-o 4.5: chat data format, collators, training presets, TRL/PEFT runner.

Run from the repository root (this folder is not installed with the `minicpmo` package):

    python -m minicpmo.export --tiny runs/minicpmo-tiny
    python -m finetune.sft --config finetune/examples/tiny_lora_llm.yaml

See finetune/README.md. `finetune.sft` and `finetune.trainer` (which import TRL) are loaded only when used.
Collators: `chat_collator` (turn_based), `speech_collator` (speech), `duplex_collator` (duplex), registered by
name in `collators`; speech targets and their encoding in `speech_targets`; collator errors in `errors`.
"""

from .chat_collator import TurnBasedCollator
from .collators import COLLATORS, build_collator, dataset_loader, register_collator
from .errors import CollatorConfigError
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
