"""Train token2wav on espeak clips: the flow (codes -> mel, with CAMPPlus through it) and the HiFT vocoder.

* :func:`train_flow`: conditional flow matching for the DiT decoder together with the token encoder. Each
  clip is tokenised with the (already trained) speech tokenizer; the clips of one voice are laid end to end so
  that fixed windows of ``window_tokens`` codes (2 mel frames each) batch without padding. As at inference, the
  first ``P`` codes of a window act as the voice prompt (their mel is the condition, no loss there), the
  speaker vector comes from CAMPPlus on a *different* clip of the same voice (trained through the flow loss plus
  a small training-only speaker-ID head, which also fills its BatchNorm statistics), attention is full or
  block-causal with 25-code chunks (the streaming pattern), and mu / speaker / condition are dropped together
  with probability ``cfg_dropout`` so classifier-free guidance has an unconditional branch.
* :func:`train_vocoder`: ground-truth 24 kHz log-mel -> waveform with multi-resolution STFT + mel L1, and an
  L1 loss pulling the F0 predictor to a normalised-cross-correlation pitch track (``pitch_track``). The source
  is excited by the tracked F0 half of the time (teacher forcing) and by the predicted F0 otherwise.
* :func:`evaluate_resynthesis`: wav -> codes -> token2wav on held-out sentences; log-mel L1 to the original and
  code agreement after re-tokenising, against chance.

Nothing here changes the inference path: training calls the same submodules that ``synthesize`` chains.
CLI: ``python -m finetune.train_token2wav --out DIR [--init DIR] --flow-minutes 10 --vocoder-minutes 12``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from minicpmo.audio_utils import INPUT_SAMPLE_RATE, OUTPUT_SAMPLE_RATE
from minicpmo.errors import TrainingError
from minicpmo.modeling.audio_frontends_token2wav import fit_prompt_mel, kaldi_fbank_16k, prompt_mel_24k
from minicpmo.modeling.modeling_hift import HiFTVocoder
from minicpmo.modeling.modeling_token2wav import MiniCPMOToken2Wav

from .budgeted_loop import BudgetedLoop
from .speech_corpus import SpeechClip, check_clips

try:
    import torchaudio.functional as taf
except ImportError:  # pragma: no cover
    taf = None

OUT_RATE = OUTPUT_SAMPLE_RATE
FRAME_SAMPLES = 480  # 24 kHz samples per 50 Hz mel frame
SPEAKER_FRAMES = 100  # fbank frames (1 s) of the reference clip that CAMPPlus sees during flow training
FLOW_SIGMA_MIN = 1e-6


class Token2WavTrainingError(TrainingError, TypeError):
    """The module handed to a token2wav recipe cannot be trained as is (wrong type, dtype, missing parts)."""


def _check_module(token2wav) -> None:
    if not isinstance(token2wav, MiniCPMOToken2Wav):
        raise Token2WavTrainingError(f"token2wav must be a MiniCPMOToken2Wav, got {type(token2wav).__name__}")
    if token2wav.speech_tokenizer is None or token2wav.campplus is None:
        raise Token2WavTrainingError("train_flow needs the voice encoders (Token2WavConfig(voice_encoders=True))")
    if token2wav.flow.input_embedding.weight.dtype != torch.float32:
        raise Token2WavTrainingError("train token2wav in float32 (cast it with .float() first)")


def _resample_24k(audio: np.ndarray, rate: int) -> torch.Tensor:
    if taf is None:
        raise ImportError("token2wav training needs torchaudio")
    return taf.resample(torch.from_numpy(np.ascontiguousarray(audio, dtype=np.float32)), rate, OUT_RATE)


def _mean(values: list[float]) -> float:
    return float(np.mean(values)) if values else float("nan")


# ---------------------------------------------------------------------------------------------- flow
def _flow_data(token2wav: MiniCPMOToken2Wav, clips: list[SpeechClip]) -> dict:
    """Per voice: concatenated codes [N], their mel [2N, 80], and each clip's mean-normalised fbank [T, 80]."""
    voices: dict[str, dict] = {}
    with torch.no_grad():
        for clip in clips:
            codes = token2wav.speech_tokenizer.encode(clip.audio, clip.sample_rate)
            mel = fit_prompt_mel(prompt_mel_24k(clip.audio, clip.sample_rate), codes.numel())
            fbank = kaldi_fbank_16k(clip.audio, clip.sample_rate)
            entry = voices.setdefault(clip.voice, {"codes": [], "mel": [], "fbank": []})
            entry["codes"].append(codes)
            entry["mel"].append(mel)
            entry["fbank"].append(fbank - fbank.mean(0, keepdim=True))
    for entry in voices.values():
        entry["codes"] = torch.cat(entry["codes"])
        entry["mel"] = torch.cat(entry["mel"])
    return voices


def _speaker_crop(fbanks: list[torch.Tensor], rng: np.random.Generator) -> torch.Tensor:
    fbank = fbanks[int(rng.integers(len(fbanks)))]
    if fbank.shape[0] < SPEAKER_FRAMES:
        fbank = fbank.repeat(math.ceil(SPEAKER_FRAMES / fbank.shape[0]), 1)
    start = int(rng.integers(fbank.shape[0] - SPEAKER_FRAMES + 1))
    return fbank[start : start + SPEAKER_FRAMES]


def flow_matching_loss(
    token2wav: MiniCPMOToken2Wav,
    codes: torch.Tensor,
    target_mel: torch.Tensor,
    speaker: torch.Tensor,
    prompt_tokens: int,
    chunked: bool,
    cfg_dropout: float,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """CFM loss of one batch. codes [B, L]; target_mel [B, 80, 2L]; speaker [B, 192] (CAMPPlus output, with grad).

    The first ``prompt_tokens`` codes are the prompt: their mel is the condition and they carry no loss.
    ``chunked``: block-causal attention (prompt = block 0, then 25-code blocks) as in streaming.
    """
    flow = token2wav.flow
    batch, length = codes.shape
    up = flow.config.up_stride
    block_ids = None
    if chunked:
        chunk = token2wav.config.stream_chunk_tokens
        block_ids = torch.cat(
            [torch.zeros(prompt_tokens, dtype=torch.long), 1 + torch.arange(length - prompt_tokens) // chunk]
        ).to(codes.device)
    mu = flow.encoder_proj(flow.encoder(flow.input_embedding(codes), block_ids)).transpose(1, 2)
    spks = flow.spk_embed_affine_layer(F.normalize(speaker, dim=1))
    cond = torch.zeros_like(target_mel)
    cond[..., : up * prompt_tokens] = target_mel[..., : up * prompt_tokens]
    keep = (torch.rand(batch, generator=generator) >= cfg_dropout).to(mu.dtype).to(mu.device)
    mu, spks, cond = mu * keep[:, None, None], spks * keep[:, None], cond * keep[:, None, None]

    t = torch.rand(batch, generator=generator).to(mu.device)
    t = 1 - torch.cos(t * 0.5 * math.pi)  # the cosine schedule of inference: more samples near the noise end
    noise = torch.randn(target_mel.shape, generator=generator).to(mu.device)
    x_t = (1 - (1 - FLOW_SIGMA_MIN) * t[:, None, None]) * noise + t[:, None, None] * target_mel
    velocity_target = target_mel - (1 - FLOW_SIGMA_MIN) * noise
    mask = None
    if block_ids is not None:
        from minicpmo.modeling.modeling_flow_encoder import block_causal_mask

        mask = block_causal_mask(block_ids.repeat_interleave(up))
    velocity = flow.decoder.estimator(x_t, mu, t, spks, cond, mask)
    return F.mse_loss(velocity[..., up * prompt_tokens :], velocity_target[..., up * prompt_tokens :])


def train_flow(
    token2wav: MiniCPMOToken2Wav,
    clips: list[SpeechClip],
    budget_s: float,
    seed: int = 0,
    log=print,
    batch_size: int = 8,
    window_tokens: int = 60,
    lr: float = 1e-3,
    cfg_dropout: float = 0.2,
    speaker_weight: float = 0.1,
    max_steps: int | None = None,
) -> dict:
    """Train ``token2wav.flow`` (encoder + DiT) and ``token2wav.campplus`` in place; the tokenizer is frozen.

    Returns steps, seconds, first / final (mean of the last 20 steps) ``flow_loss`` and ``speaker_loss``.
    """
    _check_module(token2wav)
    clips = check_clips(clips)
    rng = np.random.default_rng(seed)
    generator = torch.Generator().manual_seed(seed)
    device = token2wav.device
    token2wav.speech_tokenizer.eval()
    data = _flow_data(token2wav, clips)
    min_codes = min(entry["codes"].numel() for entry in data.values())
    window = min(window_tokens, min_codes)
    if window < 4:
        raise ValueError(f"every voice needs at least 4 codes of audio for flow training, one has {min_codes}")
    names = sorted(data)
    weights = np.array([data[name]["codes"].numel() for name in names], dtype=np.float64)
    weights /= weights.sum()
    speaker_head = nn.Linear(token2wav.config.campplus.embedding_size, len(names)).to(device)
    parameters = list(token2wav.flow.parameters()) + list(token2wav.campplus.parameters())
    optimizer = torch.optim.AdamW(parameters + list(speaker_head.parameters()), lr=lr, weight_decay=0.01)

    token2wav.flow.train()
    token2wav.campplus.train()
    loop = BudgetedLoop("flow", optimizer, lr, budget_s, max_steps, warmup=50, log=log)
    for _ in loop:
        picks = rng.choice(len(names), size=batch_size, p=weights)
        codes, mels, fbanks = [], [], []
        for index in picks:
            entry = data[names[index]]
            offset = int(rng.integers(entry["codes"].numel() - window + 1))
            codes.append(entry["codes"][offset : offset + window])
            mels.append(entry["mel"][2 * offset : 2 * (offset + window)].T)
            fbanks.append(_speaker_crop(entry["fbank"], rng))
        prompt = int(rng.integers(window // 6, window // 2 + 1)) if rng.random() < 0.85 else 0
        speaker = token2wav.campplus(torch.stack(fbanks).to(device))
        loss = flow_matching_loss(
            token2wav,
            torch.stack(codes).to(device),
            torch.stack(mels).to(device),
            speaker,
            prompt,
            chunked=bool(rng.random() < 0.5),
            cfg_dropout=cfg_dropout,
            generator=generator,
        )
        speaker_loss = F.cross_entropy(speaker_head(speaker), torch.as_tensor(picks, device=device))
        total = loss + speaker_weight * speaker_loss
        optimizer.zero_grad(set_to_none=True)
        total.backward()
        nn.utils.clip_grad_norm_(parameters, 1.0)
        optimizer.step()
        loop.record(flow_loss=loss.item(), speaker_loss=speaker_loss.item())

    token2wav.flow.eval()
    token2wav.campplus.eval()
    return loop.finish(window_tokens=window)


# ---------------------------------------------------------------------------------------------- vocoder
def pitch_track(audio16k: np.ndarray, n_frames: int, fmin: float = 70.0, fmax: float = 400.0) -> torch.Tensor:
    """F0 in Hz per 50 Hz frame (0 = unvoiced) by normalised cross-correlation over a 30 ms window.

    Frame i covers samples [320 i, 320 i + 320) at 16 kHz (the 24 kHz mel's frame i). Voiced when the best
    correlation exceeds 0.6 and the frame is not near-silent; the shortest lag within 90 % of the best one is
    taken, which avoids octave-down errors.
    """
    rate, hop, width = INPUT_SAMPLE_RATE, 320, 480
    min_lag, max_lag = int(rate / fmax), int(rate / fmin)
    audio = torch.from_numpy(np.ascontiguousarray(audio16k, dtype=np.float32))
    audio = F.pad(audio, (80, n_frames * hop + width + max_lag))
    starts = torch.arange(n_frames) * hop
    index = starts[:, None] + torch.arange(width + max_lag)[None]
    frames = audio[index]  # [T, width + max_lag]
    head = frames[:, :width]
    head_energy = head.pow(2).sum(1)
    scores = []
    for lag in range(min_lag, max_lag + 1):
        tail = frames[:, lag : lag + width]
        scores.append((head * tail).sum(1) / (head_energy * tail.pow(2).sum(1)).clamp_min(1e-9).sqrt())
    scores = torch.stack(scores, 1)  # [T, lags]
    best = scores.max(1).values
    inner = scores[:, 1:-1]
    peak = (inner >= scores[:, :-2]) & (inner >= scores[:, 2:]) & (inner >= 0.9 * best[:, None])
    first = 1 + torch.where(peak.any(1), peak.float().argmax(1), inner.argmax(1))
    rows = torch.arange(scores.shape[0])
    left, centre, right = scores[rows, first - 1], scores[rows, first], scores[rows, first + 1]
    shift = 0.5 * (left - right) / (left - 2 * centre + right).clamp(max=-1e-6)  # parabolic peak refinement
    f0 = rate / (first.float() + shift.clamp(-0.5, 0.5) + min_lag)
    rms = (head_energy / width).sqrt()
    voiced = (best > 0.6) & (rms > 0.01)
    return torch.where(voiced, f0, torch.zeros_like(f0))


def log_mel_batch(wav: torch.Tensor) -> torch.Tensor:
    """Differentiable batched twin of ``prompt_mel_24k``: [B, N] 24 kHz -> [B, 80, N // 480] natural-log mel."""
    pad = (1920 - FRAME_SAMPLES) // 2
    padded = F.pad(wav[:, None], (pad, pad), mode="reflect")[:, 0]
    spec = torch.stft(
        padded, 1920, FRAME_SAMPLES, 1920, window=torch.hann_window(1920, device=wav.device), center=False,
        return_complex=True,
    )
    magnitude = torch.sqrt(spec.real.pow(2) + spec.imag.pow(2) + 1e-9)
    bank = taf.melscale_fbanks(961, 0.0, 8000.0, 80, OUT_RATE, norm="slaney", mel_scale="slaney").to(wav.device)
    return torch.log((bank.T @ magnitude).clamp(min=1e-5))


STFT_RESOLUTIONS = ((1024, 120, 600), (2048, 240, 1200), (512, 50, 240))


def multi_resolution_stft_loss(predicted: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Spectral convergence + log-magnitude L1, averaged over three STFT resolutions. [B, N] each."""
    total = predicted.new_zeros(())
    for n_fft, hop, win in STFT_RESOLUTIONS:
        window = torch.hann_window(win, device=predicted.device)
        p = torch.stft(predicted, n_fft, hop, win, window=window, return_complex=True).abs().clamp_min(1e-7)
        t = torch.stft(target, n_fft, hop, win, window=window, return_complex=True).abs().clamp_min(1e-7)
        convergence = torch.linalg.norm(t - p) / torch.linalg.norm(t).clamp_min(1e-7)
        total = total + convergence + (p.log() - t.log()).abs().mean()
    return total / len(STFT_RESOLUTIONS)


def _vocoder_data(clips: list[SpeechClip]) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Per clip: (mel [80, T], wav24 [T * 480], f0 [T])."""
    items = []
    for clip in clips:
        wav = _resample_24k(clip.audio, clip.sample_rate)
        mel = prompt_mel_24k(wav, OUT_RATE).T
        frames = mel.shape[1]
        wav = F.pad(wav, (0, max(0, frames * FRAME_SAMPLES - wav.numel())))[: frames * FRAME_SAMPLES]
        items.append((mel, wav, pitch_track(clip.audio, frames)))
    return items


def train_vocoder(
    hift: HiFTVocoder,
    clips: list[SpeechClip],
    budget_s: float,
    seed: int = 0,
    log=print,
    batch_size: int = 4,
    segment_frames: int = 32,
    lr: float = 2e-3,
    mel_weight: float = 1.0,
    f0_weight: float = 1.0,
    max_steps: int | None = None,
    f0_lr_scale: float = 2.0,
) -> dict:
    """Train the HiFT vocoder in place on ground-truth mels; returns steps, seconds, first/final losses.

    The F0 predictor learns from an L1 loss in Hz against ``pitch_track`` over whole clips, at ``f0_lr_scale`` x
    ``lr``; the decoder learns from multi-resolution STFT + log-mel losses on ``segment_frames`` windows, excited
    half the time by the true F0 and half by the predicted one (as at inference).
    """
    if not isinstance(hift, HiFTVocoder):
        raise Token2WavTrainingError(f"hift must be a HiFTVocoder, got {type(hift).__name__}")
    if hift.conv_pre.weight.dtype != torch.float32:
        raise Token2WavTrainingError("train the vocoder in float32 (cast it with .float() first)")
    clips = check_clips(clips)
    rng = np.random.default_rng(seed)
    generator = torch.Generator().manual_seed(seed)
    device = hift.conv_pre.weight.device
    data = _vocoder_data(clips)
    segment = min(segment_frames, min(item[0].shape[1] for item in data))
    f0_parameters = list(hift.f0_predictor.parameters())
    f0_ids = {id(p) for p in f0_parameters}
    groups = [
        {"params": [p for p in hift.parameters() if id(p) not in f0_ids], "scale": 1.0},
        {"params": f0_parameters, "scale": f0_lr_scale},  # its output is in Hz: a larger step reaches speech F0 sooner
    ]
    optimizer = torch.optim.AdamW(groups, lr=lr, betas=(0.8, 0.99), weight_decay=0.01)

    hift.train()
    loop = BudgetedLoop("vocoder", optimizer, lr, budget_s, max_steps, warmup=50, log=log)
    for _ in loop:
        mels, wavs, f0s, f0_errors = [], [], [], []
        for index in rng.integers(len(data), size=batch_size):
            mel, wav, f0 = data[index]
            # the F0 loss sees the whole clip: the predictor is a few small convs, and a 12-32 frame segment is
            # mostly one voiced/unvoiced state, too few frames for a stable step
            f0_errors.append((hift.f0_predictor(mel[None].to(device))[0] - f0.to(device)).abs())
            offset = int(rng.integers(mel.shape[1] - segment + 1))
            mels.append(mel[:, offset : offset + segment])
            wavs.append(wav[offset * FRAME_SAMPLES : (offset + segment) * FRAME_SAMPLES])
            f0s.append(f0[offset : offset + segment])
        mel, wav, f0 = torch.stack(mels).to(device), torch.stack(wavs).to(device), torch.stack(f0s).to(device)
        with torch.no_grad():
            predicted_f0 = hift.f0_predictor(mel)
        f0_loss = torch.cat(f0_errors).mean() / 50.0
        excitation_f0 = f0 if rng.random() < 0.5 else predicted_f0
        source = hift.m_source(excitation_f0, generator=generator if device.type == "cpu" else None)
        output = hift.decode(mel, source)
        stft_loss = multi_resolution_stft_loss(output, wav)
        mel_loss = (log_mel_batch(output)[..., :segment] - mel).abs().mean()
        loss = stft_loss + mel_weight * mel_loss + f0_weight * f0_loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        # only the waveform side is clipped: clipped with it, the F0 head's steps were rescaled at random (and its
        # L1 loss already bounds the gradient at its output)
        nn.utils.clip_grad_norm_(groups[0]["params"], 5.0)
        optimizer.step()
        loop.record(stft_loss=stft_loss.item(), mel_loss=mel_loss.item(), f0_l1_hz=f0_loss.item() * 50.0)

    hift.eval()
    return loop.finish()


# ---------------------------------------------------------------------------------------------- evaluation
def _digits(codes: torch.Tensor, levels: list[int]) -> torch.Tensor:
    out, rest = [], codes.clone()
    for level in levels:
        out.append(rest % level)
        rest = rest // level
    return torch.stack(out, -1)


@torch.no_grad()
def evaluate_resynthesis(
    token2wav: MiniCPMOToken2Wav,
    clips: list[SpeechClip],
    reference: SpeechClip,
    out_dir: str | None = None,
    n_examples: int = 3,
    scorer: MiniCPMOToken2Wav | None = None,
    seed: int = 0,
) -> dict:
    """wav -> codes -> ``token2wav.synthesize`` with ``reference`` as the voice, on held-out ``clips``.

    mel_l1: mean |log-mel(resynth) - log-mel(original)| (24 kHz, 80 bins); code_agreement: share of positions
    where ``scorer``'s tokenizer (default: this model's) gives the resynthesised audio the same code as the
    original, with ``chance_agreement`` = sum_c p(c)^2 over the originals' codes; digit_agreement: the same per
    FSQ digit. ``out_dir``: the first ``n_examples`` (original, resynthesis) pairs as 24 kHz wavs.
    """
    import soundfile

    clips = check_clips(clips)
    scorer = scorer if scorer is not None else token2wav
    levels = scorer.config.speech_tokenizer.fsq_levels
    voice = token2wav.prepare_voice(reference.audio, reference.sample_rate)
    mel_l1, same, same_digits, total, all_codes = [], 0, 0, 0, []
    if out_dir:
        os.makedirs(out_dir, exist_ok=True)
    for index, clip in enumerate(clips):
        codes = token2wav.speech_tokenizer.encode(clip.audio, clip.sample_rate)
        wav = token2wav.synthesize(codes, voice, generator=torch.Generator().manual_seed(seed + index))
        original = _resample_24k(clip.audio, clip.sample_rate)
        mel_a, mel_b = prompt_mel_24k(wav, OUT_RATE), prompt_mel_24k(original, OUT_RATE)
        frames = min(mel_a.shape[0], mel_b.shape[0])
        mel_l1.append((mel_a[:frames] - mel_b[:frames]).abs().mean().item())

        reference_codes = scorer.speech_tokenizer.encode(clip.audio, clip.sample_rate)
        back = scorer.speech_tokenizer.encode(taf.resample(wav, OUT_RATE, INPUT_SAMPLE_RATE), INPUT_SAMPLE_RATE)
        n = min(reference_codes.numel(), back.numel())
        same += int((reference_codes[:n] == back[:n]).sum())
        same_digits += int((_digits(reference_codes[:n], levels) == _digits(back[:n], levels)).sum())
        total += n
        all_codes.append(reference_codes)
        if out_dir and index < n_examples:
            stem = os.path.join(out_dir, f"heldout_{index:02d}")
            soundfile.write(stem + "_original.wav", original.numpy(), OUT_RATE)
            soundfile.write(stem + "_resynth.wav", wav.numpy(), OUT_RATE)
            with open(stem + ".txt", "w") as handle:
                handle.write(clip.text + "\n")
    codes = torch.cat(all_codes)
    _, counts = codes.unique(return_counts=True)
    p = counts.double() / counts.sum()
    digits = _digits(codes, levels)
    digit_share = [digits[:, d].bincount().double() / len(codes) for d in range(len(levels))]
    digit_chance = float(np.mean([(share**2).sum() for share in digit_share]))
    return {
        "clips": len(clips),
        "mel_l1": _mean(mel_l1),
        "code_agreement": same / max(1, total),
        "chance_agreement": float((p**2).sum()),
        "digit_agreement": same_digits / max(1, total * len(levels)),
        "digit_chance": digit_chance,
    }


# ---------------------------------------------------------------------------------------------- CLI
def main(argv: list[str] | None = None) -> dict:
    from minicpmo.configuration.configuration_presets import demo_token2wav_config
    from minicpmo.synthetic.episodes import ASSISTANT_VOICE

    from .speech_corpus import assistant_reference_clip, build_speech_corpus, heldout_sentences, make_clip
    from .train_speech_tokenizer import load_token2wav, save_token2wav, train_speech_tokenizer

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True, help="folder for token2wav.safetensors, config, metrics, examples")
    parser.add_argument("--init", help="a folder saved by train_speech_tokenizer / this script (else: demo config)")
    parser.add_argument("--tokenizer-minutes", type=float, default=6.0, help="used only without --init")
    parser.add_argument("--flow-minutes", type=float, default=10.0)
    parser.add_argument("--vocoder-minutes", type=float, default=12.0)
    parser.add_argument("--budget-minutes", type=float, help="shorthand: split this total 6 : 10 : 12")
    parser.add_argument("--clips", type=int, default=400)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    if args.budget_minutes is not None:
        share = args.budget_minutes / (28.0 if args.init is None else 22.0)
        args.tokenizer_minutes, args.flow_minutes, args.vocoder_minutes = 6 * share, 10 * share, 12 * share
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)

    t0 = time.monotonic()
    clips = build_speech_corpus(args.clips, seed=args.seed, log=print)
    heldout = [make_clip(text, ASSISTANT_VOICE) for text in heldout_sentences(seed=args.seed)]
    reference = assistant_reference_clip()
    print(f"corpus: {len(clips)} clips, {sum(c.duration_s for c in clips) / 60:.1f} min ({time.monotonic() - t0:.0f}s)")
    untrained = MiniCPMOToken2Wav(demo_token2wav_config()).eval()
    metrics: dict = {}
    if args.init:
        token2wav = load_token2wav(args.init)
    else:
        token2wav = MiniCPMOToken2Wav(demo_token2wav_config())
        untrained.load_state_dict(token2wav.state_dict())
        metrics["tokenizer"] = train_speech_tokenizer(
            token2wav.speech_tokenizer, clips, args.tokenizer_minutes * 60, seed=args.seed, eval_clips=heldout
        )
    metrics["flow"] = train_flow(token2wav, clips, args.flow_minutes * 60, seed=args.seed)
    metrics["vocoder"] = train_vocoder(token2wav.hift_original, clips, args.vocoder_minutes * 60, seed=args.seed)
    save_token2wav(token2wav, args.out)
    metrics["eval_trained"] = evaluate_resynthesis(token2wav, heldout, reference, os.path.join(args.out, "examples"))
    metrics["eval_untrained"] = evaluate_resynthesis(untrained, heldout, reference, scorer=token2wav)
    metrics["total_seconds"] = round(time.monotonic() - t0, 1)
    print(json.dumps(metrics, indent=1))
    with open(os.path.join(args.out, "token2wav_metrics.json"), "w") as handle:
        json.dump(metrics, handle, indent=1)
    return metrics


if __name__ == "__main__":
    main()
