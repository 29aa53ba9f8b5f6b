"""Quantized loading: the LLM (and optionally the speech decoder) with int8 or int4 weights, through transformers'
own `quantization_config`; the vision and audio encoders, their projectors and token2wav keep their float dtype.

    from minicpmo import MiniCPMOForConditionalGeneration, quantization_config
    model = MiniCPMOForConditionalGeneration.from_pretrained(DIR, quantization_config=quantization_config("int8"))
    model.save_pretrained(OUT)          # a quantized checkpoint; from_pretrained(OUT) loads it quantized again

Why these modules stay float: the encoders are small next to the 8B LLM (SigLIP 0.4B, Whisper 0.3B) and token2wav
(0.3B) runs a flow-matching ODE whose errors compound over its steps; the LLM holds ~85 % of the weights.

Backends: torchao (the `[quant]` extra) for "int8" (`Int8WeightOnlyConfig`: int8 weights, one scale per output
row) and "int4" (`IntxWeightOnlyConfig` with int4 values in groups of `group_size`). On CPU torchao 0.18 keeps
int4 values unpacked in int8 storage (its packed int4 layouts need a GPU or the mslk kernels), so "int4" saves the
same memory as "int8" there while rounding like int4; "nf4" is bitsandbytes' 4-bit NormalFloat (packed, 0.5 byte
per weight; bitsandbytes 0.50's CPU backend runs it, loaded with `device_map="cpu"`).
"""

from __future__ import annotations

from .errors import ConfigError

KEPT_IN_FLOAT = ("model.vpm", "model.resampler", "model.apm", "model.audio_projection_layer", "token2wav")
SPEECH_DECODER = "tts"
WEIGHT_KINDS = ("int8", "int4", "nf4")


class QuantizationError(ConfigError):
    """An unknown weight kind, a bad group size, or a quantization backend that is not installed."""


def quantization_config(weights: str = "int8", speech_decoder: bool = False, group_size: int = 128):
    """A transformers quantization config for `from_pretrained(..., quantization_config=...)`.

    Args:
        weights: "int8" (torchao, per-row scales), "int4" (torchao, per-group scales) or "nf4" (bitsandbytes).
        speech_decoder: also quantize the speech decoder (the `tts` module); it stays float by default.
        group_size: the group of input features sharing one scale for "int4" (must divide every quantized layer's
            input size: 128 for the full-size model, 32 for the tiny test config).
    """
    if weights not in WEIGHT_KINDS:
        raise QuantizationError(f"weights must be one of {WEIGHT_KINDS}, got {weights!r}")
    if int(group_size) < 1:
        raise QuantizationError(f"group_size must be >= 1, got {group_size}")
    kept = list(KEPT_IN_FLOAT) + ([] if speech_decoder else [SPEECH_DECODER])
    if weights == "nf4":
        return _bitsandbytes_config(kept)
    try:
        import torch
        from torchao.quantization import Int8WeightOnlyConfig, IntxWeightOnlyConfig, PerGroup
        from transformers import TorchAoConfig
    except ImportError as error:
        raise QuantizationError(f"{weights!r} weights need torchao: pip install 'minicpmo[quant]' ({error})") from None
    if weights == "int8":
        quant_type = Int8WeightOnlyConfig()
    else:
        quant_type = IntxWeightOnlyConfig(weight_dtype=torch.int4, granularity=PerGroup(int(group_size)))
    return TorchAoConfig(quant_type=quant_type, modules_to_not_convert=kept)


def _bitsandbytes_config(kept: list[str]):
    import importlib.util

    if importlib.util.find_spec("bitsandbytes") is None:
        raise QuantizationError("'nf4' weights need bitsandbytes (pip install bitsandbytes) with a backend for "
                                "the model's device")
    import torch
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16,
                              llm_int8_skip_modules=kept)


def quantized_modules(model) -> dict[str, str]:
    """{module name: weight class} of every linear layer whose weight is not a plain float tensor."""
    import torch

    found = {}
    for name, module in model.named_modules():
        weight = getattr(module, "weight", None)
        if isinstance(module, torch.nn.Linear) or type(module).__name__.startswith("Linear4bit"):
            if weight is not None and (type(weight).__name__ not in ("Parameter", "Tensor")
                                       or not weight.dtype.is_floating_point):
                found[name] = type(weight).__name__
    return found


__all__ = ["KEPT_IN_FLOAT", "QuantizationError", "WEIGHT_KINDS", "quantization_config", "quantized_modules"]
