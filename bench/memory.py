"""Memory of a full-duplex session: the full-size model accounted on the meta device, the mid config measured.

    python bench/memory.py                       # full-size table (seconds), then mid-config RSS per option (minutes)
    python bench/memory.py --skip-measured       # the full-size table only

Full size (no weights needed: every module is built on the meta device): weights per component under bf16 / int8
/ int4 (the LLM's linear layers quantized as `minicpmo.quantization_config` does: int8 with one bf16 scale per
output row, int4 packed two per byte with a bf16 scale and zero point per 128 inputs; the token table, encoders,
speech decoder and token2wav in bf16), the KV cache of a 10-minute duplex session (bounded by the session's
sliding window; unbounded beside it), and the activations of one unit: the peak of live intermediate tensors while
the vision tower encodes a 448-px frame, the audio encoder 1 s, and the LLM prefills a unit against a full window,
measured by a dispatch mode that counts every new tensor's bytes until it is freed (meta tensors have no data, so
this is exact bookkeeping of the eager graph, not an estimate by formula). Compared with the paper's "< 12 GB".

Measured: the mid config (0.63B LLM) saved once, then loaded in a fresh process under each option (fp32, bf16,
torchao int8, torchao int4) and stepped through 20 duplex units; RSS after loading and peak RSS (ru_maxrss).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import weakref
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

GIB = 2**30
SESSION_UNITS = 600  # 10 minutes of 1-s units


class LiveTensorBytes(TorchDispatchMode):
    """Counts the bytes of every tensor an op creates (not views, not in-place results) until it is garbage
    collected; `peak` is the most alive at once."""

    def __init__(self):
        super().__init__()
        self.live = 0
        self.peak = 0

    def _release(self, nbytes: int) -> None:
        self.live -= nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {a.untyped_storage()._cdata for a in torch.utils._pytree.tree_leaves((args, kwargs))
                  if isinstance(a, torch.Tensor)}
        for tensor in torch.utils._pytree.tree_leaves(out):  # a view or an in-place result shares an input's storage
            if isinstance(tensor, torch.Tensor) and tensor.untyped_storage()._cdata not in inputs:
                nbytes = tensor.numel() * tensor.element_size()
                self.live += nbytes
                self.peak = max(self.peak, self.live)
                weakref.finalize(tensor, self._release, nbytes)
        return out


def full_size_model():
    from minicpmo import MiniCPMOForConditionalGeneration, official_config
    from minicpmo.configuration.configuration_token2wav import Token2WavConfig

    with torch.device("meta"):
        config = official_config()
        config.token2wav_config = Token2WavConfig().to_dict()
        model = MiniCPMOForConditionalGeneration(config).to(torch.bfloat16).eval()
    return model


def components(model) -> dict[str, list[tuple[str, torch.nn.Parameter]]]:
    groups = {"LLM": [], "vision (SigLIP + resampler)": [], "audio (Whisper + projector)": [], "speech decoder": [],
              "token2wav": []}
    for name, param in model.named_parameters():
        if name.startswith(("model.language_model.", "lm_head.")):
            groups["LLM"].append((name, param))
        elif name.startswith(("model.vpm.", "model.resampler.")):
            groups["vision (SigLIP + resampler)"].append((name, param))
        elif name.startswith(("model.apm.", "model.audio_projection_layer.")):
            groups["audio (Whisper + projector)"].append((name, param))
        elif name.startswith("tts."):
            groups["speech decoder"].append((name, param))
        elif name.startswith("token2wav."):
            groups["token2wav"].append((name, param))
        else:
            raise ValueError(f"parameter {name} belongs to no component")
    return groups


def weight_bytes(model, option: str) -> dict[str, float]:
    """Bytes per component; the LLM's linear weights per `option` (bf16, int8, int4), everything else bf16."""
    linear_weights = {f"{name}.weight" for name, module in model.named_modules()
                      if isinstance(module, torch.nn.Linear) and name.startswith(("model.language_model.", "lm_head"))}
    sizes = {}
    for group, params in components(model).items():
        total = 0.0
        for name, param in params:
            if option == "bf16" or name not in linear_weights:
                total += 2 * param.numel()
            elif option == "int8":
                total += param.numel() + 2 * param.shape[0]  # int8 values + a bf16 scale per output row
            else:
                total += param.numel() / 2 + 2 * 2 * param.numel() / 128  # packed int4 + bf16 scale and zero per 128
        sizes[group] = total
    return sizes


def unit_positions(model) -> dict[str, int]:
    """Positions one duplex unit appends to the cache (a listening unit with a frame, and a speaking one)."""
    import numpy as np
    from PIL import Image

    from minicpmo import MiniCPMOProcessor

    processor = MiniCPMOProcessor.from_defaults()
    frame = Image.fromarray(np.zeros((448, 448, 3), dtype=np.uint8))
    inputs, _ = processor.duplex_unit(np.zeros(16000, dtype=np.float32), frame)
    prefill = int(inputs["input_ids"].shape[-1])
    return {"prefill with frame": prefill, "listening unit": prefill + 2, "speaking unit (20 tokens)": prefill + 22}


def kv_bytes(config, positions: int) -> float:
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    return 2 * text.num_hidden_layers * text.num_key_value_heads * text.head_dim * 2 * positions


@torch.no_grad()
def unit_activations(model, unit_len: int, cache_len: int) -> dict[str, float]:
    """Peak live bytes of intermediate tensors (meta device) for each stage of one unit."""
    from transformers import DynamicCache

    text = model.config.get_text_config()
    peaks = {}
    pixel = torch.zeros(1, 3, 14, 448 * 448 // 14, device="meta", dtype=torch.bfloat16)
    tgt = torch.tensor([[32, 32]])
    vision = model.model.vpm
    with LiveTensorBytes() as mode:  # one whole frame has no padded patches: the tower runs without a mask
        hidden = vision.embeddings(pixel, tgt)
        hidden = vision.encoder(inputs_embeds=hidden, attention_mask=None).last_hidden_state
        vision.post_layernorm(hidden)
    peaks["vision tower (448-px frame)"] = mode.peak
    mel = torch.zeros(1, model.config.audio_config.num_mel_bins, 100, device="meta", dtype=torch.bfloat16)
    audio = model.model.apm
    with LiveTensorBytes() as mode:  # 1 s is one attention chunk: every frame sees every other, so no mask
        hidden = audio._convolve(mel)
        audio._run_layers(hidden + audio.embed_positions.weight[: hidden.shape[1]], None)
    peaks["audio encoder (1 s)"] = mode.peak
    cache = DynamicCache(config=text)
    shape = (1, text.num_key_value_heads, cache_len, text.head_dim)
    for layer in range(text.num_hidden_layers):
        cache.update(torch.zeros(shape, device="meta", dtype=torch.bfloat16),
                     torch.zeros(shape, device="meta", dtype=torch.bfloat16), layer)
    embeds = torch.zeros(1, unit_len, text.hidden_size, device="meta", dtype=torch.bfloat16)
    positions = torch.arange(cache_len, cache_len + unit_len, device="meta")[None]
    with LiveTensorBytes() as mode:
        hidden = model.model.language_model(inputs_embeds=embeds, past_key_values=cache, position_ids=positions,
                                            use_cache=True).last_hidden_state
        model.lm_head(hidden[:, -1:])
    # the cache's grown K/V (cache_len + unit_len positions) are new tensors too: they are the KV row, not here
    peaks["LLM prefill (unit vs full window) + head"] = mode.peak - kv_bytes(text, cache_len + unit_len)
    return peaks


def full_size_table() -> None:
    from minicpmo.duplex import DuplexConfig

    model = full_size_model()
    window = DuplexConfig()
    units = unit_positions(model)
    per_unit = units["listening unit"]
    window_positions = window.window_high_tokens + units["speaking unit (20 tokens)"]
    unbounded_positions = 200 + SESSION_UNITS * per_unit
    acts = unit_activations(model, units["prefill with frame"], window.window_high_tokens)
    kv = {"KV cache, 10-min session, sliding window (bf16)": kv_bytes(model.config, window_positions),
          "KV cache, 10-min session, no window (bf16)": kv_bytes(model.config, unbounded_positions)}
    print(f"\nFull size (meta device): unit = {units} positions; window {window.window_high_tokens} -> "
          f"{window.window_low_tokens} tokens; 10 min = {SESSION_UNITS} units")
    print("| component | params (M) | bf16 GiB | int8 GiB | int4 GiB |")
    print("|---|---|---|---|---|")
    sizes = {option: weight_bytes(model, option) for option in ("bf16", "int8", "int4")}
    for group, params in components(model).items():
        count = sum(p.numel() for _, p in params) / 1e6
        print(f"| {group} | {count:.0f} | " + " | ".join(f"{sizes[o][group] / GIB:.2f}" for o in sizes) + " |")
    for name, value in kv.items():
        print(f"| {name} | | {value / GIB:.2f} | {value / GIB:.2f} | {value / GIB:.2f} |")
    peak_act = max(acts.values())
    for name, value in acts.items():
        print(f"| activations: {name} | | {value / GIB:.3f} | | |")
    print("| **total** (weights + windowed KV + largest unit stage) | | " + " | ".join(
        f"**{(sum(sizes[o].values()) + kv['KV cache, 10-min session, sliding window (bf16)'] + peak_act) / GIB:.2f}**"
        for o in sizes) + " |")
    print("Paper's claim: full duplex in < 12 GB.")


MEASURE = r"""
import json, resource, sys, numpy as np, torch
from minicpmo import MiniCPMOForConditionalGeneration, MiniCPMOProcessor, quantization_config
folder, option = sys.argv[1], sys.argv[2]
def rss():
    return int(open('/proc/self/status').read().split('VmRSS:')[1].split()[0]) / 1024
torch.set_num_threads(2)
kwargs = {"fp32": dict(dtype=torch.float32), "bf16": dict(dtype=torch.bfloat16),
          "int8": dict(quantization_config=quantization_config("int8")),
          "int4": dict(quantization_config=quantization_config("int4", group_size=64))}[option]
before = rss()
model = MiniCPMOForConditionalGeneration.from_pretrained(folder, **kwargs).eval()
loaded = rss()
session = model.duplex_session(MiniCPMOProcessor.from_defaults(), force_listen_count=0, generate_audio=False)
rng = np.random.default_rng(0)
for k in range(20):
    session.config.listen_bias = -1e9 if k % 4 == 0 else 1e9
    session.step((0.1 * rng.standard_normal(16000)).astype(np.float32))
print(json.dumps({"import": before, "loaded": loaded, "after_20_units": rss(),
                  "peak": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def measured_table() -> None:
    sys.path.insert(0, str(Path(__file__).parent))
    from duplex import mid_config

    from minicpmo import MiniCPMOForConditionalGeneration

    rows = {}
    with tempfile.TemporaryDirectory() as folder:
        torch.manual_seed(0)
        MiniCPMOForConditionalGeneration(mid_config()).save_pretrained(folder)
        for option in ("fp32", "bf16", "int8", "int4"):
            result = subprocess.run([sys.executable, "-c", MEASURE, folder, option], capture_output=True, text=True,
                                    env={**os.environ, "HF_HUB_OFFLINE": "1"})
            if result.returncode != 0:
                rows[option] = {"error": result.stderr.strip().splitlines()[-1]}
            else:
                rows[option] = json.loads(result.stdout.strip().splitlines()[-1])
            print(option, rows[option], flush=True)
    print("\nMid config (0.63B LLM), CPU, 20 duplex units, speech output off")
    print("| option | RSS after import MB | RSS loaded MB | RSS after 20 units MB | peak RSS MB |")
    print("|---|---|---|---|---|")
    for option, row in rows.items():
        if "error" in row:
            print(f"| {option} | failed: {row['error']} | | | |")
        else:
            print(f"| {option} | {row['import']:.0f} | {row['loaded']:.0f} | {row['after_20_units']:.0f} | "
                  f"{row['peak']:.0f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--skip-measured", action="store_true", help="only the full-size meta-device table")
    args = parser.parse_args()
    full_size_table()
    if not args.skip_measured:
        measured_table()


if __name__ == "__main__":
    main()
