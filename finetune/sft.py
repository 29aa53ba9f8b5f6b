"""`python -m finetune.sft --config finetune/examples/NAME.yaml`: supervised fine-tuning with TRL + PEFT.

Uses `finetune.trainer.OmniSFTTrainer`, TRL's `SFTTrainer` plus the speech-decoder loss for batches that carry
speech targets (collators `speech`, `duplex`); text-only batches take TRL's path unchanged. The trainer's fused LM head (`model(**batch, fused_lm_head=True)`) runs
`model.model` (which merges image and audio features itself and returns `last_hidden_state`) and projects only the
labelled positions through `lm_head`. TRL cannot prepare multimodal rows, so the recipe always sets
`remove_unused_columns=False`, `dataset_kwargs={"skip_prepare_dataset": True}` and `max_length=None`, and a
collator from `finetune.collators` builds the batches (media decoded per batch).

Multi-GPU: `accelerate launch --config_file finetune/accelerate/<ddp|zero2|zero3|fsdp2>.yaml -m finetune.sft ...`.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import torch

from .collators import build_collator, dataset_loader, takes_speech_tokenizer
from .config import Recipe, RecipeError, load_recipe
from .data import default_media_root
from .presets import PresetError, check_preset_applies, freeze_for_preset, get_preset, lora_config

# TRL must not tokenize, truncate or drop the raw `messages` column: the collator does all of that.
REQUIRED_SFT_ARGS = {
    "remove_unused_columns": False,
    "dataset_kwargs": {"skip_prepare_dataset": True},
    "max_length": None,
}


def build_sft_config(recipe: Recipe, output_dir: str | None = None):
    """`trl.SFTConfig` from the recipe's `sft:` mapping plus the settings multimodal collation needs.

    On a machine without CUDA the defaults become `use_cpu=True, bf16=False` (SFTConfig defaults to bf16).
    """
    from trl import SFTConfig

    kwargs: dict[str, Any] = dict(recipe.sft)
    kwargs.pop("resume_from_checkpoint", None)
    for key, value in REQUIRED_SFT_ARGS.items():
        if key in kwargs and kwargs[key] != value:
            raise RecipeError(f"sft.{key} must be {value!r} for multimodal collation, the recipe sets {kwargs[key]!r}")
        kwargs[key] = value
    if output_dir is not None:
        kwargs["output_dir"] = output_dir
    if not kwargs.get("output_dir"):
        raise RecipeError("recipe needs sft.output_dir (or pass --output_dir)")
    kwargs.setdefault("report_to", [])
    has_cuda = torch.cuda.is_available()
    kwargs.setdefault("use_cpu", not has_cuda)
    if kwargs["use_cpu"] or not has_cuda:
        kwargs.setdefault("bf16", False)
    else:
        kwargs.setdefault("bf16", torch.cuda.is_bf16_supported())
    return SFTConfig(**kwargs)


def load_model(recipe: Recipe):
    from minicpmo import MiniCPMOForConditionalGeneration

    return MiniCPMOForConditionalGeneration.from_pretrained(recipe.model, dtype=getattr(torch, recipe.dtype))


def load_processor(recipe: Recipe):
    """The checkpoint's processor; a checkpoint without processor files gets the packaged default one."""
    from minicpmo import MiniCPMOProcessor

    source = recipe.processor or recipe.model
    try:
        return MiniCPMOProcessor.from_pretrained(source)
    except (OSError, ValueError):
        if recipe.processor is not None:
            raise
        return MiniCPMOProcessor.from_defaults()


def prepare_model(model, recipe: Recipe):
    """Freeze per preset. Returns the `LoraConfig` for LoRA presets (TRL wraps the model), else None."""
    preset = get_preset(recipe.preset)
    if preset.uses_lora:
        check_preset_applies(model, preset)
        return lora_config(preset, **recipe.lora)
    if recipe.lora:
        raise PresetError(f"preset {preset.name!r} trains in place; remove the `lora:` section")
    freeze_for_preset(model, preset)
    return None


def model_speech_tokenizer(model):
    """The model's S3 speech tokenizer (`token2wav.speech_tokenizer`, through a PEFT wrapper), or None without one."""
    if hasattr(model, "get_base_model"):
        model = model.get_base_model()
    return getattr(getattr(model, "token2wav", None), "speech_tokenizer", None)


def recipe_training_data(recipe: Recipe, processor, speech_tokenizer=None):
    """The recipe's training rows (loaded by its collator's loader) and its collator (media under the data folder
    unless `data.media_root` says otherwise). A collator registered as taking a speech tokenizer gets
    `speech_tokenizer` (to encode target audio; see `model_speech_tokenizer`)."""
    train_dataset = dataset_loader(recipe.collator_name)(recipe.train_data)
    media_root = recipe.media_root or default_media_root(recipe.train_data)
    options = dict(recipe.collator_kwargs)
    if takes_speech_tokenizer(recipe.collator_name):
        options.setdefault("speech_tokenizer", speech_tokenizer)
    collator = build_collator(recipe.collator_name, processor, media_root=media_root, **options)
    return train_dataset, collator


def build_trainer(recipe: Recipe, output_dir: str | None = None, model=None, processor=None, callbacks=None,
                  train_dataset=None, data_collator=None):
    """An `OmniSFTTrainer` (an `SFTTrainer`) ready to `train()`; `model` / `processor` may be passed in, and so may
    `train_dataset` + `data_collator` (both, e.g. data mixed from several recipes) instead of the recipe's data.
    The recipe's collator is built with the model's speech tokenizer when it takes one; a collator passed in is
    used as it is (the trainer never changes it)."""
    from .trainer import OmniSFTTrainer

    if (train_dataset is None) != (data_collator is None):
        raise RecipeError("pass train_dataset and data_collator together, or neither (the recipe's data is used)")
    args = build_sft_config(recipe, output_dir)
    model = load_model(recipe) if model is None else model
    processor = load_processor(recipe) if processor is None else processor
    peft_config = prepare_model(model, recipe)
    eval_dataset = dataset_loader(recipe.collator_name)(recipe.eval_data) if recipe.eval_data else None
    if train_dataset is None:
        train_dataset, data_collator = recipe_training_data(recipe, processor, model_speech_tokenizer(model))
    return OmniSFTTrainer(
        model=model,
        args=args,
        data_collator=data_collator,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        processing_class=processor,
        peft_config=peft_config,
        callbacks=callbacks,
        speech_loss_weight=recipe.speech_loss_weight,
        text_loss_weight=recipe.text_loss_weight,
        labelled_logits_only=recipe.labelled_logits_only,
    )


def save_merged(trainer, out_dir: str | Path) -> Path:
    """Fold the LoRA weights into the base model and write a plain checkpoint (+ processor) to `out_dir`."""
    model = trainer.model
    if not hasattr(model, "merge_and_unload"):
        raise PresetError("merge_adapter needs a LoRA preset: this run trained the weights in place")
    merged = model.merge_and_unload()
    out_dir = Path(out_dir)
    if trainer.accelerator.is_main_process:
        merged.save_pretrained(out_dir)
        trainer.processing_class.save_pretrained(out_dir)
    return out_dir


def _parse_resume(value: Any) -> bool | str | None:
    if value in (None, False, "false", "False", ""):
        return None
    if value in (True, "true", "True", "latest"):
        return True
    return str(value)


def main(argv: list[str] | None = None):
    parser = argparse.ArgumentParser(prog="python -m finetune.sft", description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True, help="recipe YAML (see finetune/README.md)")
    parser.add_argument("--output_dir", help="overrides sft.output_dir")
    parser.add_argument("--model", help="overrides model:")
    parser.add_argument(
        "--resume_from_checkpoint", nargs="?", const="latest",
        help="resume from a checkpoint folder, or from the latest one in output_dir when given without a value",
    )
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override, e.g. sft.max_steps=5")
    args = parser.parse_args(argv)
    overrides = list(args.set) + ([f"model={args.model}"] if args.model else [])
    recipe = load_recipe(args.config, overrides)
    resume = _parse_resume(args.resume_from_checkpoint or recipe.sft.get("resume_from_checkpoint"))
    trainer = build_trainer(recipe, output_dir=args.output_dir)
    result = trainer.train(resume_from_checkpoint=resume)
    trainer.save_model()
    trainer.log_metrics("train", result.metrics)
    trainer.save_metrics("train", result.metrics)
    trainer.save_state()
    if recipe.merge_adapter:
        save_merged(trainer, Path(trainer.args.output_dir) / "merged")
    return trainer, result


if __name__ == "__main__":
    main()
