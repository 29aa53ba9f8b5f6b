"""What to train: LoRA targets, fully trained modules and freeze presets named after the paper's stages.

A preset either asks for a PEFT LoRA adapter (`lora_target_modules`, a `re.fullmatch` regex on module names,
plus `modules_to_save` trained in full next to it) or, with no LoRA, trains in place exactly the parameters
whose names match `trainable_parameters` (everything else frozen). Parameter/module names are the model's
(`model.language_model.layers.{i}...`, `model.resampler`, `model.audio_projection_layer`, `tts...`); the
regexes allow any prefix so they also work inside wrappers.

Paper stages (MiniCPM-o 4.5 section 5): (1) speech pretraining, backbone frozen, speech decoder trained ->
`speech_pretrain`; (2) joint pretraining, everything unfrozen -> `joint_pretrain`; (3) joint SFT -> `joint_sft`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from minicpmo.errors import ConfigError

LLM_LINEAR_REGEX = (
    r"(?:.*\.)?language_model\.layers\.\d+\.(?:self_attn\.(?:q|k|v|o)_proj|mlp\.(?:gate|up|down)_proj)"
)
SPEECH_DECODER_LINEAR_REGEX = (
    r"(?:.*\.)?tts\.model\.layers\.\d+\.(?:self_attn\.(?:q|k|v|o)_proj|mlp\.(?:gate|up|down)_proj)"
)
PROJECTOR_MODULES = ("resampler", "audio_projection_layer")
SPEECH_DECODER_PARAMETERS = r"(?:.*\.)?tts\..*"
ALL_PARAMETERS = r".*"
# every parameter outside the vision tower, the resampler, the audio tower (encoders kept as they are) and token2wav
# (trained on its own losses)
OUTSIDE_ENCODERS = r"(?!(?:.*\.)?(?:vpm|resampler|apm|token2wav)\.).*"
# the same without the LLM's token embedding table (a tied head is the same parameter, so it stays fixed too)
OUTSIDE_ENCODERS_AND_EMBEDDINGS = r"(?!(?:.*\.)?language_model\.embed_tokens\.)" + OUTSIDE_ENCODERS


class PresetError(ConfigError):
    """Unknown preset, or a preset that needs a module this model does not have."""


@dataclass(frozen=True)
class TrainingPreset:
    name: str
    description: str
    lora_target_modules: str | None = None
    modules_to_save: tuple[str, ...] = ()
    trainable_parameters: str | None = None
    required_parameters: tuple[str, ...] = field(default_factory=tuple)

    @property
    def uses_lora(self) -> bool:
        return self.lora_target_modules is not None


PRESETS: dict[str, TrainingPreset] = {
    preset.name: preset
    for preset in (
        TrainingPreset(
            "lora_llm",
            "LoRA on the LLM's attention and MLP projections; encoders, projectors and speech decoder frozen",
            lora_target_modules=LLM_LINEAR_REGEX,
            required_parameters=(LLM_LINEAR_REGEX + r"\.weight",),
        ),
        TrainingPreset(
            "lora_llm_projectors",
            "LoRA on the LLM plus full training of the vision resampler and the audio projector",
            lora_target_modules=LLM_LINEAR_REGEX,
            modules_to_save=PROJECTOR_MODULES,
            required_parameters=(LLM_LINEAR_REGEX + r"\.weight",),
        ),
        TrainingPreset(
            "lora_speech_decoder",
            "LoRA on the speech decoder's attention and MLP projections only",
            lora_target_modules=SPEECH_DECODER_LINEAR_REGEX,
            required_parameters=(SPEECH_DECODER_PARAMETERS,),
        ),
        TrainingPreset(
            "speech_pretrain",
            "paper stage 1: backbone (LLM, encoders, projectors) frozen, speech decoder `tts.*` trained in full",
            trainable_parameters=SPEECH_DECODER_PARAMETERS,
            required_parameters=(SPEECH_DECODER_PARAMETERS,),
        ),
        TrainingPreset(
            "joint_pretrain",
            "paper stage 2: everything unfrozen (use DeepSpeed ZeRO-3 or FSDP2 for the full-size model)",
            trainable_parameters=ALL_PARAMETERS,
        ),
        TrainingPreset(
            "joint_sft",
            "paper stage 3: everything unfrozen, supervised chat data (same parameters as joint_pretrain)",
            trainable_parameters=ALL_PARAMETERS,
        ),
        TrainingPreset("full", "every parameter trained in place (alias of joint_sft)", trainable_parameters=ALL_PARAMETERS),
        TrainingPreset(
            "sft_frozen_encoders",
            "joint SFT with the vision tower, resampler and audio tower frozen (encoders pretrained or trained "
            "in a perception stage) and token2wav frozen: the audio projector, the LLM and the speech decoder train",
            trainable_parameters=OUTSIDE_ENCODERS,
        ),
        TrainingPreset(
            "sft_fixed_embeddings",
            "sft_frozen_encoders with the token embeddings (and a tied head) fixed: a small LLM trained from scratch "
            "with a tied head pulls together the rows of words it cannot predict yet, until it cannot tell them "
            "apart in its input either; a fixed random table keeps every word distinct",
            trainable_parameters=OUTSIDE_ENCODERS_AND_EMBEDDINGS,
        ),
    )
}


def get_preset(name: str) -> TrainingPreset:
    if name not in PRESETS:
        raise PresetError(f"unknown training preset {name!r}; choose one of {sorted(PRESETS)}")
    return PRESETS[name]


def check_preset_applies(model, preset: TrainingPreset) -> None:
    """Raise `PresetError` naming the missing module when the model lacks what the preset trains."""
    names = [name for name, _ in model.named_parameters()]
    for pattern in preset.required_parameters:
        if not any(re.fullmatch(pattern, name) for name in names):
            hint = ""
            if "tts" in pattern:
                hint = " (this model has no speech decoder: build it with init_tts=True / a checkpoint with `tts.*`)"
            raise PresetError(f"preset {preset.name!r} needs parameters matching {pattern!r}, none found{hint}")
    if preset.modules_to_save:
        modules = [name for name, _ in model.named_modules()]
        for target in preset.modules_to_save:
            if not any(name == target or name.endswith("." + target) for name in modules):
                raise PresetError(f"preset {preset.name!r} trains module {target!r}, which this model does not have")


def freeze_for_preset(model, preset: TrainingPreset) -> list[str]:
    """For a no-LoRA preset: set `requires_grad` from the regex; returns the names left trainable."""
    if preset.uses_lora:
        raise PresetError(f"preset {preset.name!r} is a LoRA preset; build its LoraConfig with lora_config()")
    check_preset_applies(model, preset)
    trainable = []
    for name, parameter in model.named_parameters():
        parameter.requires_grad_(bool(re.fullmatch(preset.trainable_parameters, name)))
        if parameter.requires_grad:
            trainable.append(name)
    return trainable


def lora_config(
    preset: TrainingPreset,
    r: int = 16,
    alpha: int = 32,
    dropout: float = 0.05,
    target_modules: str | list[str] | None = None,
    modules_to_save: list[str] | None = None,
    **extra,
):
    """`peft.LoraConfig` for a LoRA preset; `target_modules` / `modules_to_save` override the preset's."""
    from peft import LoraConfig

    if not preset.uses_lora:
        raise PresetError(f"preset {preset.name!r} trains parameters in place and takes no LoRA config")
    return LoraConfig(
        r=r,
        lora_alpha=alpha,
        lora_dropout=dropout,
        target_modules=target_modules if target_modules is not None else preset.lora_target_modules,
        modules_to_save=list(modules_to_save if modules_to_save is not None else preset.modules_to_save) or None,
        task_type="CAUSAL_LM",
        **extra,
    )


__all__ = [
    "LLM_LINEAR_REGEX",
    "PRESETS",
    "PresetError",
    "SPEECH_DECODER_LINEAR_REGEX",
    "TrainingPreset",
    "check_preset_applies",
    "freeze_for_preset",
    "get_preset",
    "lora_config",
]
