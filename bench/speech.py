"""Speech-output speed on CPU (run by hand; prints a table).

    python bench/speech.py                # tiny and full-size speech decoder / token2wav (random weights)
    python bench/speech.py --sizes tiny

Rows:
- speech decoder codes/s: greedy codes from the speech-token decoder (25 codes = 1 s of speech), EOS masked;
- token2wav real-time factor (compute time / audio duration, lower is better) with 5 and 10 ODE steps, offline and
  streaming (25-code hops), for 4 s of speech;
- time to first audio of a streaming `chat(..., generate_audio=True, stream=True)` on the tiny model.
"""

import argparse
import time

import torch

from minicpmo import MiniCPMOForConditionalGeneration, MiniCPMOProcessor, official_config, tiny_config
from minicpmo.audio_utils import INPUT_SAMPLE_RATE, OUTPUT_SAMPLE_RATE
from minicpmo.special_tokens import SPEECH_CODEBOOK_SIZE
from minicpmo.modeling.modeling_speech_decoder import MiniCPMOSpeechDecoder, SpeechSamplingConfig
from minicpmo.configuration.configuration_presets import tiny_token2wav_config
from minicpmo.configuration.configuration_token2wav import Token2WavConfig
from minicpmo.modeling.modeling_token2wav import MiniCPMOToken2Wav
from minicpmo.voices import load_voice


def bench_decoder(config, n_codes=100):
    torch.manual_seed(0)
    decoder = MiniCPMOSpeechDecoder(config).eval()
    text = torch.randint(0, 1000, (12,))
    hidden = torch.randn(12, config.llm_dim)
    sampling = SpeechSamplingConfig(do_sample=False, min_new_codes=n_codes, max_new_codes=n_codes)
    decoder.generate_codes(text, hidden, SpeechSamplingConfig(do_sample=False, min_new_codes=5, max_new_codes=5))
    start = time.perf_counter()
    codes = decoder.generate_codes(text, hidden, sampling)
    return codes.numel() / (time.perf_counter() - start)


def bench_token2wav(config, voice_wav, seconds=4.0):
    torch.manual_seed(0)
    t2w = MiniCPMOToken2Wav(config).eval()
    voice = t2w.prepare_voice(voice_wav, INPUT_SAMPLE_RATE)
    codes = torch.randint(0, SPEECH_CODEBOOK_SIZE, (int(seconds * 25),))
    rows = {}
    with torch.inference_mode():
        for steps in (5, 10):
            start = time.perf_counter()
            wav = t2w.synthesize(codes, voice, n_timesteps=steps)
            offline = (time.perf_counter() - start) / (wav.numel() / OUTPUT_SAMPLE_RATE)
            state = t2w.start_stream(voice, n_timesteps=steps)
            start = time.perf_counter()
            first, total = None, 0
            for hop in range(0, codes.numel(), 25):
                out, state = t2w.push(codes[hop : hop + 25], state, end_of_turn=hop + 25 >= codes.numel())
                total += out.numel()
                if first is None and out.numel():
                    first = time.perf_counter() - start
            streaming = (time.perf_counter() - start) / (total / OUTPUT_SAMPLE_RATE)
            rows[steps] = (offline, streaming, first)
    return rows


def bench_first_audio(processor, voice_wav):
    torch.manual_seed(0)
    model = MiniCPMOForConditionalGeneration(tiny_config()).eval()
    msgs = [{"role": "user", "content": [{"type": "text", "text": "Tell me about the weather today."}]}]
    start = time.perf_counter()
    for chunk in model.chat(msgs, processor=processor, generate_audio=True, stream=True, ref_audio=voice_wav,
                            max_new_tokens=40, min_new_tokens=40, n_timesteps=5,
                            speech_sampling=SpeechSamplingConfig(do_sample=False, min_new_codes=25),
                            max_codes_per_chunk=50):
        if chunk.audio.size:
            return time.perf_counter() - start
    return float("nan")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", nargs="+", default=["tiny", "full"], choices=["tiny", "full"])
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    voice = load_voice("en_dlc")
    lines = ["| size | speech decoder codes/s | token2wav steps | RTF offline | RTF streaming | first audio (s) |",
             "|---|---|---|---|---|---|"]
    for size in args.sizes:
        tts_config = tiny_config().tts_config if size == "tiny" else official_config().tts_config
        t2w_config = tiny_token2wav_config() if size == "tiny" else Token2WavConfig()
        codes_per_s = bench_decoder(tts_config)
        for steps, (offline, streaming, first) in bench_token2wav(t2w_config, voice).items():
            lines.append(f"| {size} | {codes_per_s:.1f} | {steps} | {offline:.3f} | {streaming:.3f} | {first:.3f} |")
    ttfa = bench_first_audio(MiniCPMOProcessor.from_defaults(), voice)
    print("\n".join(lines))
    print(f"\nstreaming chat, tiny model: time to first audio {ttfa:.2f} s "
          f"(10-token text chunks, 5 ODE steps)")
    print(f"torch {torch.__version__}, {args.threads} threads, fp32, CPU; RTF < 1 is faster than real time")



if __name__ == "__main__":
    main()
