"""Train the S3 speech tokenizer (encoder + FSQ) so its 25 Hz codes carry the spoken content.

Objective, all through the straight-through FSQ output (``quantized`` = project_out(rounded digits)):

* CTC on the clip's espeak phonemes from a small conv head: the codes must tell the phonemes apart;
* L1 reconstruction of the 128-bin input log-mel (4 frames per code) from a conv head: the codes keep
  what the phonemes do not (timing, pitch contour), which the flow needs to rebuild the mel;
* on silent stretches, the pre-rounding FSQ values are pulled to the digits of code 4218, the silence code
  that token2wav streaming prepends to every turn, so silence means the same to the tokenizer and the flow.

Both heads live in :class:`TokenizerTrainingHeads`, are built per call and never join the tokenizer's
state dict. Training stops at ``budget_s`` wall time (checked every step) or ``max_steps``.

CLI: ``python -m finetune.train_speech_tokenizer --out DIR --budget-minutes 6`` builds the demo token2wav,
trains its tokenizer on a fresh espeak corpus and saves the whole token2wav (see ``save_token2wav``).
"""

from __future__ import annotations

import argparse
import json
import os

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from minicpmo.errors import TrainingError
from minicpmo.modeling.modeling_speech_tokenizer import S3_SILENCE_CODE, S3SpeechTokenizer, log_mel_128

from .budgeted_loop import BudgetedLoop
from .speech_corpus import SpeechClip, build_speech_corpus, check_clips

SAMPLES_PER_CODE = 640  # 16 kHz / 25 Hz
MEL_FRAMES_PER_CODE = 4
SILENCE_PEAK = 0.005  # a code step whose samples all stay below this is silence (clips peak at 0.5)


class TokenizerTrainingError(TrainingError, TypeError):
    """The tokenizer handed to the recipe cannot be trained as is (wrong type or dtype)."""


def silence_digits(codebook_levels: list[int], code: int = S3_SILENCE_CODE) -> torch.Tensor:
    """FSQ digits (each in {-(L-1)/2 .. (L-1)/2}, dimension 0 least significant) of ``code``."""
    digits = []
    for level in codebook_levels:
        digits.append(code % level - (level - 1) // 2)
        code //= level
    return torch.tensor(digits, dtype=torch.float32)


def _silence_hinge(bounded: torch.Tensor, digits: torch.Tensor, margin: float = 0.25) -> torch.Tensor:
    """Squared hinge that is zero once every bounded value rounds to its digit with ``margin`` to spare.

    (A plain MSE to the digits would chase tanh to +-1, i.e. infinite pre-activations, and saturate FSQ.)
    """
    distance = (bounded - digits).abs()
    return F.relu(distance - (0.5 - margin)).pow(2).mean()


class TokenizerTrainingHeads(nn.Module):
    """Training-only heads on the quantized features [B, n, C]: phoneme CTC logits and 4-frame mel reconstruction."""

    def __init__(self, width: int, n_phonemes: int, hidden: int = 128, n_mels: int = 128):
        super().__init__()
        self.n_mels = n_mels
        self.ctc = nn.Sequential(
            nn.Conv1d(width, hidden, 3, padding=1), nn.GELU(), nn.Conv1d(hidden, n_phonemes + 1, 1)
        )
        self.recon = nn.Sequential(
            nn.Conv1d(width, hidden, 3, padding=1), nn.GELU(), nn.Conv1d(hidden, MEL_FRAMES_PER_CODE * n_mels, 1)
        )

    def forward(self, quantized: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """-> (CTC log-probs [B, n, P + 1], mel [B, 128, 4 n])."""
        x = quantized.transpose(1, 2)
        log_probs = self.ctc(x).transpose(1, 2).log_softmax(-1)
        mel = self.recon(x)  # [B, 4 * 128, n]
        batch, _, n = mel.shape
        mel = mel.view(batch, MEL_FRAMES_PER_CODE, self.n_mels, n).permute(0, 2, 3, 1).reshape(batch, self.n_mels, -1)
        return log_probs, mel


def _phoneme_vocab(clips: list[SpeechClip]) -> dict[str, int]:
    """Phoneme -> id (1..P; 0 is the CTC blank)."""
    return {p: i + 1 for i, p in enumerate(sorted({p for clip in clips for p in clip.phonemes}))}


def _silent_codes(audio: np.ndarray, n_codes: int) -> torch.Tensor:
    padded = np.zeros(n_codes * SAMPLES_PER_CODE, np.float32)
    padded[: min(audio.size, padded.size)] = audio[: padded.size]
    return torch.from_numpy(np.abs(padded).reshape(n_codes, SAMPLES_PER_CODE).max(axis=1) < SILENCE_PEAK)


def _edit_distance(a: list[int], b: list[int]) -> int:
    row = list(range(len(b) + 1))
    for i, x in enumerate(a, 1):
        previous, row[0] = row[0], i
        for j, y in enumerate(b, 1):
            previous, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, previous + (x != y))
    return row[-1]


def code_usage(speech_tokenizer: S3SpeechTokenizer, clips: list[SpeechClip]) -> dict:
    """Distinct codes, code perplexity and the share of silent steps coded 4218, over ``clips``."""
    counts: dict[int, int] = {}
    silent_total = silent_hits = 0
    for clip in clips:
        codes = speech_tokenizer.encode(clip.audio, clip.sample_rate)
        for code in codes.tolist():
            counts[code] = counts.get(code, 0) + 1
        silent = _silent_codes(clip.audio, codes.numel())
        silent_total += int(silent.sum())
        silent_hits += int((codes[silent] == S3_SILENCE_CODE).sum())
    freq = np.array(list(counts.values()), dtype=np.float64)
    freq /= freq.sum()
    return {
        "distinct_codes": len(counts),
        "code_perplexity": float(np.exp(-(freq * np.log(freq)).sum())),
        "silence_as_4218": silent_hits / max(1, silent_total),
    }


def train_speech_tokenizer(
    speech_tokenizer: S3SpeechTokenizer,
    clips_16k: list[SpeechClip],
    budget_s: float,
    seed: int = 0,
    log=print,
    batch_size: int = 8,
    lr: float = 1e-3,
    max_steps: int | None = None,
    recon_weight: float = 1.0,
    silence_weight: float = 4.0,
    eval_clips: list[SpeechClip] | None = None,
) -> dict:
    """Train ``speech_tokenizer`` in place on 16 kHz clips with phonemes; returns metrics.

    Metrics: steps, seconds, first/final (mean of the last 20 steps) ``ctc_loss`` / ``recon_loss`` /
    ``silence_loss``, code usage on up to 100 clips (``distinct_codes``, ``code_perplexity``,
    ``silence_as_4218``) and, with ``eval_clips``, the greedy CTC phoneme error rate ``eval_per``.
    """
    if not isinstance(speech_tokenizer, S3SpeechTokenizer):
        raise TokenizerTrainingError(
            f"speech_tokenizer must be an S3SpeechTokenizer, got {type(speech_tokenizer).__name__}"
        )
    if speech_tokenizer.quantizer.project_in.weight.dtype != torch.float32:
        raise TokenizerTrainingError("train the speech tokenizer in float32 (cast it with .float() first)")
    clips = check_clips(clips_16k)
    if eval_clips is not None:
        eval_clips = check_clips(eval_clips)
    device = speech_tokenizer.device
    vocab = _phoneme_vocab(clips + (eval_clips or []))
    width = speech_tokenizer.config.n_state
    torch.manual_seed(seed)
    heads = TokenizerTrainingHeads(width, len(vocab)).to(device)
    parameters = list(speech_tokenizer.parameters()) + list(heads.parameters())
    optimizer = torch.optim.AdamW(parameters, lr=lr, weight_decay=0.01)
    target_digits = silence_digits(speech_tokenizer.config.fsq_levels).to(device)
    rng = np.random.default_rng(seed)

    speech_tokenizer.train()
    loop = BudgetedLoop("tokenizer", optimizer, lr, budget_s, max_steps, warmup=30, log=log)
    for _ in loop:
        batch = [clips[i] for i in rng.choice(len(clips), size=min(batch_size, len(clips)), replace=False)]
        mels, silent, targets = [], [], []
        for clip in batch:
            audio = clip.audio
            if rng.random() < 0.3:  # light noise: re-tokenising resynthesised audio must still work
                audio = audio + rng.normal(0, rng.uniform(0.001, 0.01), audio.shape).astype(np.float32)
            mel = log_mel_128(audio, clip.sample_rate, device=device)
            n_codes = (mel.shape[-1] + 3) // MEL_FRAMES_PER_CODE
            mels.append(mel)
            silent.append(_silent_codes(clip.audio, n_codes))
            targets.append(torch.tensor([vocab[p] for p in clip.phonemes], dtype=torch.long))
        mel_lengths = torch.tensor([m.shape[-1] for m in mels], device=device)
        padded = nn.utils.rnn.pad_sequence([m.T for m in mels], batch_first=True).transpose(1, 2)
        output = speech_tokenizer(padded, mel_lengths)
        lengths = output.lengths
        valid = torch.arange(output.codes.shape[1], device=device)[None] < lengths[:, None]
        log_probs, recon = heads(output.quantized * valid[..., None])

        ctc = F.ctc_loss(
            log_probs.transpose(0, 1),
            torch.cat(targets).to(device),
            lengths,
            torch.tensor([t.numel() for t in targets], device=device),
            zero_infinity=True,
        )
        frame_valid = torch.arange(padded.shape[-1], device=device)[None] < mel_lengths[:, None]
        recon = recon[..., : padded.shape[-1]]
        recon_loss = ((recon - padded).abs().mean(1) * frame_valid).sum() / frame_valid.sum()
        bounded = speech_tokenizer.quantizer.bound(speech_tokenizer.quantizer.project_in(output.features))
        silent_mask = nn.utils.rnn.pad_sequence(silent, batch_first=True).to(device)[:, : bounded.shape[1]] & valid
        if silent_mask.any():
            silence_loss = _silence_hinge(bounded[silent_mask], target_digits)
        else:
            silence_loss = bounded.sum() * 0.0
        loss = ctc + recon_weight * recon_loss + silence_weight * silence_loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(parameters, 1.0)
        optimizer.step()
        loop.record(ctc_loss=ctc.item(), recon_loss=recon_loss.item(), silence_loss=silence_loss.item())

    speech_tokenizer.eval()
    heads.eval()
    with torch.no_grad():
        extra = code_usage(speech_tokenizer, clips[:100])
        if eval_clips:
            extra["eval_per"] = phoneme_error_rate(speech_tokenizer, heads, eval_clips, vocab)
    return loop.finish(phonemes=len(vocab), **extra)


@torch.no_grad()
def phoneme_error_rate(speech_tokenizer, heads: TokenizerTrainingHeads, clips: list[SpeechClip], vocab: dict) -> float:
    """Greedy CTC decoding of the codes' features vs the espeak phonemes: edits / reference length."""
    edits = total = 0
    for clip in clips:
        mel = log_mel_128(clip.audio, clip.sample_rate, device=speech_tokenizer.device)
        output = speech_tokenizer(mel[None])
        best = heads(output.quantized)[0][0].argmax(-1).tolist()
        decoded = [p for i, p in enumerate(best) if p != 0 and (i == 0 or p != best[i - 1])]
        reference = [vocab[p] for p in clip.phonemes]
        edits += _edit_distance(decoded, reference)
        total += len(reference)
    return edits / max(1, total)


# ---------------------------------------------------------------------------------------------- CLI
def save_token2wav(token2wav, out_dir: str) -> None:
    """``token2wav.safetensors`` (state dict) + ``token2wav_config.json`` (``Token2WavConfig.to_dict``)."""
    from safetensors.torch import save_file

    os.makedirs(out_dir, exist_ok=True)
    state = {key: value.detach().contiguous() for key, value in token2wav.state_dict().items()}
    save_file(state, os.path.join(out_dir, "token2wav.safetensors"))
    with open(os.path.join(out_dir, "token2wav_config.json"), "w") as handle:
        json.dump(token2wav.config.to_dict(), handle, indent=1)


def load_token2wav(out_dir: str):
    """Inverse of :func:`save_token2wav` (strict)."""
    from safetensors.torch import load_file

    from minicpmo.configuration.configuration_token2wav import Token2WavConfig
    from minicpmo.modeling.modeling_token2wav import MiniCPMOToken2Wav

    with open(os.path.join(out_dir, "token2wav_config.json")) as handle:
        config = Token2WavConfig.from_dict(json.load(handle))
    model = MiniCPMOToken2Wav(config)
    model.load_state_dict(load_file(os.path.join(out_dir, "token2wav.safetensors")), strict=True)
    return model.eval()


def main(argv: list[str] | None = None) -> dict:
    from minicpmo.configuration.configuration_presets import demo_token2wav_config
    from minicpmo.modeling.modeling_token2wav import MiniCPMOToken2Wav

    from .speech_corpus import heldout_sentences, make_clip
    from minicpmo.synthetic.episodes import ASSISTANT_VOICE

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True, help="folder for token2wav.safetensors + token2wav_config.json")
    parser.add_argument("--budget-minutes", type=float, default=6.0)
    parser.add_argument("--clips", type=int, default=400)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    token2wav = MiniCPMOToken2Wav(demo_token2wav_config())
    clips = build_speech_corpus(args.clips, seed=args.seed, log=print)
    eval_clips = [make_clip(text, ASSISTANT_VOICE) for text in heldout_sentences(seed=args.seed)]
    metrics = train_speech_tokenizer(
        token2wav.speech_tokenizer, clips, args.budget_minutes * 60, seed=args.seed, eval_clips=eval_clips
    )
    save_token2wav(token2wav, args.out)
    with open(os.path.join(args.out, "speech_tokenizer_metrics.json"), "w") as handle:
        json.dump(metrics, handle, indent=1)
    return metrics


if __name__ == "__main__":
    main()
