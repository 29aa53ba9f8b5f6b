"""Prefill throughput and latency of the understanding path on CPU (run by hand; prints a table).

    python bench/understanding.py                 # tiny + mid-size (about 0.5B LLM) random models
    python bench/understanding.py --sizes tiny    # only the tiny model

Cases: a text prompt, one image with 1 slice and with 9 slices, 10 s of audio. Latency is the wall time of one
prefill forward (encoders + LLM, median of --repeats runs after a warm-up); tokens/s = prompt tokens / latency.
"""

import argparse
import statistics
import time

import numpy as np
import torch
from PIL import Image

from minicpmo import MiniCPMOForConditionalGeneration, MiniCPMOProcessor, tiny_config
from minicpmo.audio_utils import INPUT_SAMPLE_RATE


def mid_config():
    """Qwen2.5-0.5B-like LLM (about 0.5B parameters with the real vocabulary) and small towers."""
    return tiny_config(
        hidden_size=896,
        intermediate_size=4864,
        num_hidden_layers=24,
        num_attention_heads=14,
        num_key_value_heads=2,
        head_dim=64,
        tts_config={**tiny_config().tts_config.to_dict(), "llm_dim": 896},
        vision_config=dict(
            model_type="siglip_vision_model", hidden_size=384, intermediate_size=1536, num_hidden_layers=6,
            num_attention_heads=6, image_size=980, patch_size=14,
        ),
        audio_config=dict(
            model_type="whisper", d_model=384, encoder_layers=6, encoder_attention_heads=6, encoder_ffn_dim=1536,
            decoder_layers=1, decoder_attention_heads=6, decoder_ffn_dim=1536, num_mel_bins=80,
            max_source_positions=1500, max_target_positions=64, vocab_size=128, pad_token_id=0, bos_token_id=1,
            eos_token_id=2, decoder_start_token_id=3,
        ),
    )


def cases(processor):
    rng = np.random.default_rng(0)
    picture = Image.fromarray(rng.integers(0, 255, size=(1344, 1344, 3), dtype=np.uint8))
    audio = (0.1 * rng.standard_normal(10 * INPUT_SAMPLE_RATE)).astype(np.float32)
    question = "Please describe everything you can perceive in as much detail as possible."
    turn = "<|im_start|>user\n{}<|im_end|>\n<|im_start|>assistant\n"
    yield "text", processor(text=[turn.format(question * 4)], return_tensors="pt")
    for slices in (1, 9):
        yield f"image ({slices} slice{'s' if slices > 1 else ''})", processor(
            text=[turn.format("<image>./</image>\n" + question)], images=[[picture]], max_slice_nums=slices,
            return_tensors="pt",
        )
    yield "audio 10 s", processor(text=[turn.format("<audio>./</audio>\n" + question)], audio=[[audio]],
                                  return_tensors="pt")


def measure(model, inputs, repeats):
    with torch.inference_mode():
        model(**inputs)
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            model(**inputs, logits_to_keep=1)
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", nargs="+", default=["tiny", "mid"], choices=["tiny", "mid"])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    processor = MiniCPMOProcessor.from_defaults()
    rows = []
    for size in args.sizes:
        torch.manual_seed(0)
        model = MiniCPMOForConditionalGeneration(tiny_config() if size == "tiny" else mid_config()).eval()
        n_params = sum(p.numel() for p in model.parameters()) / 1e6
        for name, inputs in cases(processor):
            latency = measure(model, inputs, args.repeats)
            tokens = inputs["input_ids"].shape[1]
            rows.append((f"{size} ({n_params:.0f}M)", name, tokens, latency * 1000, tokens / latency))
    header = ("model", "case", "prompt tokens", "prefill ms", "tokens/s")
    print(f"| {' | '.join(header)} |\n|{'---|' * len(header)}")
    for model_name, case, tokens, ms, tps in rows:
        print(f"| {model_name} | {case} | {tokens} | {ms:.1f} | {tps:.0f} |")
    print(f"\ntorch {torch.__version__}, {args.threads} threads, fp32, CPU")


if __name__ == "__main__":
    main()
