"""Token2wav: S3 speech codes (25 Hz) -> 24 kHz waveform in a reference voice, offline and streaming.

``MiniCPMOToken2Wav`` wires the parts together (official §7):

* ``flow`` (:class:`FlowDecoder`): codes -> 80-bin mel at 50 Hz, conditioned on the voice prompt;
* ``hift_original`` (:class:`HiFTVocoder`): mel -> 24 kHz audio, 480 samples per frame, so 960 per code;
* ``campplus`` (:class:`SpeakerEmbedder`) and ``speech_tokenizer`` (:class:`S3SpeechTokenizer`) turn a
  reference recording into a :class:`VoicePrompt` (prompt codes, prompt mel, 192-d speaker embedding).

The first two carry the official names, so ``flow.*`` / ``hift_original.*`` state-dict keys are exactly
those of ``token2wav_state_dict.tsv``. The voice encoders are converted from ONNX files, which is not part
of ``flow.pt`` / ``hift.pt``; ``Token2WavConfig(voice_encoders=False)`` builds the model without them
(its state dict then equals the tsv) for callers that bring their own :class:`VoicePrompt`.

Streaming (what MiniCPM-o does per spoken turn, official §7 and §8), with an explicit, immutable
:class:`Token2WavStreamState` and a pure :meth:`MiniCPMOToken2Wav.push`:

* at the first codes of a turn the buffer starts with ``[4218] * 3`` (silence, also the flow's prompt
  lookahead, so the prompt caches built once by :meth:`start_stream` stay exact for every turn);
* while the buffer holds >= 28 codes, the flow streams a 28-code window (25 new + 3 lookahead) and
  drops 25; each 50-frame mel chunk goes straight through the vocoder's 1.0.5 stream (8-frame re-vocoded
  overlap, Hamming cross-fade, 3840 samples held back);
* ``force_flush`` (the official unified/demo behaviour, on by default here): after that, a buffer of
  >= 8 codes is streamed whole (its last 3 codes as lookahead) and all but 3 are dropped, so codes that
  arrive in small units are not held back for a full window;
* ``end_of_turn``: the rest is streamed as the last chunk (3 zero lookahead frames), the vocoder emits
  its held-back tail, and the state returns to the prompt base for the next turn.

A turn of ``n`` codes yields exactly ``(n + 3) * 960`` samples (the 3 silence codes included). Until the
flow's cache trimming starts (beyond 50 codes of history it keeps the prompt and the newest 100 frames),
the mel equals the offline block-causal pass ``synthesize(..., chunk_size=25)`` of the same buffer.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from torch import nn

from transformers import initialization as init

from ..audio_utils import mono_waveform
from ..configuration.configuration_token2wav import Token2WavConfig, Token2WavConfigError
from ..errors import SpeechOutputError
from .audio_frontends_token2wav import (
    FBANK_SAMPLE_RATE,
    InvalidAudioError,
    fit_prompt_mel,
    prompt_mel_24k,
)
from .modeling_campplus import SpeakerEmbedder
from .modeling_flow import FlowDecoder, FlowStreamState
from .modeling_flow_encoder import RelPositionSelfAttention
from .modeling_hift import HiFTStreamState, HiFTVocoder, Snake
from .modeling_speech_decoder import init_weight_norm_parametrization
from .modeling_speech_tokenizer import S3FSQ, S3SpeechTokenizer

try:  # pinned dependency; only needed to resample reference audio that is not at 16 kHz
    import torchaudio.functional as _taf
except ImportError:  # pragma: no cover
    _taf = None

VOICE_MIN_SECONDS = 0.2  # below this the speaker embedding and the prompt mel are meaningless
VOICE_MAX_SECONDS = 30.0  # one S3 tokenizer window


class Token2WavInputError(SpeechOutputError):
    """Bad codes, voice prompt, stream state or option handed to MiniCPMOToken2Wav."""


@dataclass(frozen=True)
class VoicePrompt:
    """The reference voice as the flow consumes it (CPU, float32).

    prompt_tokens: LongTensor [1, T_p] S3 codes; prompt_mel: [1, 2 T_p, 80] 24 kHz log-mel;
    speaker_embedding: [1, 192] CAMPPlus x-vector.
    """

    prompt_tokens: torch.Tensor
    prompt_mel: torch.Tensor
    speaker_embedding: torch.Tensor

    @property
    def num_tokens(self) -> int:
        return self.prompt_tokens.shape[1]


@dataclass(frozen=True)
class Token2WavStreamState:
    """Everything a token2wav stream carries between ``push`` calls; never mutated.

    base: flow caches of the prompt alone (every turn restarts from it); flow / hift: the current turn;
    pending: LongTensor [b] codes buffered but not consumed (the last 3 are the next window's lookahead);
    in_turn: the silence prefix was added and a turn is open; turn: turns finished so far;
    samples_emitted: samples returned in the current turn.
    """

    voice: VoicePrompt
    base: FlowStreamState
    flow: FlowStreamState
    hift: HiFTStreamState
    pending: torch.Tensor
    n_timesteps: int
    force_flush: bool
    seed: int | None = None
    in_turn: bool = False
    turn: int = 0
    samples_emitted: int = 0


class MiniCPMOToken2Wav(nn.Module):
    """Speech codes + voice prompt -> 24 kHz waveform; see the module docstring for the streaming rules."""

    official_prefixes = ("flow.", "hift_original.")

    def __init__(self, config: Token2WavConfig | None = None):
        super().__init__()
        self.config = config = config if config is not None else Token2WavConfig()
        if not isinstance(config, Token2WavConfig):
            raise Token2WavConfigError(f"config must be a Token2WavConfig, got {type(config).__name__}")
        self.flow = FlowDecoder(config.flow)
        self.hift_original = HiFTVocoder(config.hift)
        if config.voice_encoders:
            self.campplus = SpeakerEmbedder(config.campplus)
            self.speech_tokenizer = S3SpeechTokenizer(config.speech_tokenizer)
        else:
            self.campplus = None
            self.speech_tokenizer = None

    @property
    def device(self) -> torch.device:
        return self.flow.input_embedding.weight.device

    @property
    def sample_rate(self) -> int:
        return self.config.sample_rate

    # ------------------------------------------------------------------ checks
    def _check_codes(self, codes, allow_empty: bool) -> torch.Tensor:
        if isinstance(codes, (list, tuple)):
            if not all(isinstance(c, int) and not isinstance(c, bool) for c in codes):
                raise Token2WavInputError("codes given as a list must hold Python ints")
            codes = torch.tensor(codes, dtype=torch.long)
        if not isinstance(codes, torch.Tensor):
            raise Token2WavInputError(f"codes must be a LongTensor [n], got {type(codes).__name__}")
        if codes.dtype.is_floating_point or codes.dtype.is_complex or codes.dtype == torch.bool:
            raise Token2WavInputError(f"codes must hold integer ids, got dtype {codes.dtype}")
        if codes.dim() != 1:
            raise Token2WavInputError(f"codes must be 1-D [n] (one utterance), got shape {list(codes.shape)}")
        if codes.numel() == 0 and not allow_empty:
            raise Token2WavInputError("codes is empty; synthesize needs at least one code")
        vocab = self.config.flow.vocab_size
        if codes.numel() and (int(codes.min()) < 0 or int(codes.max()) >= vocab):
            raise Token2WavInputError(
                f"codes must lie in [0, {vocab}) (the speech decoder's EOS code is not a sound), "
                f"got min {int(codes.min())}, max {int(codes.max())}"
            )
        return codes.detach().to(device="cpu", dtype=torch.long)

    @staticmethod
    def _check_voice(voice) -> VoicePrompt:
        if not isinstance(voice, VoicePrompt):
            raise Token2WavInputError(f"voice must be a VoicePrompt from prepare_voice, got {type(voice).__name__}")
        return voice

    def _check_steps(self, n_timesteps) -> int:
        steps = self.config.n_timesteps if n_timesteps is None else n_timesteps
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
            raise Token2WavInputError(f"n_timesteps must be a positive int, got {steps!r}")
        return steps

    # ------------------------------------------------------------------ voice prompt
    @torch.no_grad()
    def prepare_voice(self, wav, sample_rate: int) -> VoicePrompt:
        """Reference recording (mono, any rate, 0.2-30 s) -> VoicePrompt.

        Like the official code, everything starts from the 16 kHz version: S3 codes and the CAMPPlus
        embedding from it directly, the prompt mel from its 24 kHz resample, fit to 2 frames per code.
        """
        if self.speech_tokenizer is None or self.campplus is None:
            raise Token2WavInputError(
                "this token2wav was built with voice_encoders=False; pass a ready VoicePrompt instead"
            )
        audio = mono_waveform(wav, "reference voice")
        if isinstance(sample_rate, bool) or not isinstance(sample_rate, int) or sample_rate <= 0:
            raise InvalidAudioError(f"sample_rate must be a positive int (Hz), got {sample_rate!r}")
        seconds = audio.numel() / sample_rate
        if seconds < VOICE_MIN_SECONDS:
            raise InvalidAudioError(
                f"reference voice is too short: {seconds:.3f} s, need at least {VOICE_MIN_SECONDS} s"
            )
        if seconds > VOICE_MAX_SECONDS:
            raise InvalidAudioError(f"reference voice is too long: {seconds:.1f} s, at most {VOICE_MAX_SECONDS:.0f} s")
        if audio.abs().max() == 0:
            raise InvalidAudioError("reference voice is digital silence (all samples are 0)")
        if sample_rate != FBANK_SAMPLE_RATE:
            if _taf is None:
                raise ImportError("resampling the reference voice needs torchaudio")
            audio = _taf.resample(audio, sample_rate, FBANK_SAMPLE_RATE)

        tokens = self.speech_tokenizer.encode(audio, FBANK_SAMPLE_RATE)
        mel = fit_prompt_mel(prompt_mel_24k(audio, FBANK_SAMPLE_RATE), tokens.numel())
        speaker = self.campplus.embed(audio, FBANK_SAMPLE_RATE)
        return VoicePrompt(
            prompt_tokens=tokens.to(torch.long)[None].cpu(),
            prompt_mel=mel[None].float().cpu(),
            speaker_embedding=speaker[None].float().cpu(),
        )

    # ------------------------------------------------------------------ offline
    @torch.no_grad()
    def synthesize(
        self,
        codes,
        voice: VoicePrompt,
        n_timesteps: int | None = None,
        chunk_size: int | None = None,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """codes LongTensor [n] -> waveform FloatTensor [n * 960] at 24 kHz.

        ``chunk_size=None`` is the official offline path (full attention); ``chunk_size=25`` gives the
        attention pattern of streaming. ``generator`` seeds the vocoder's source noise.
        """
        codes = self._check_codes(codes, allow_empty=False)
        voice = self._check_voice(voice)
        mel = self.flow.inference(
            codes[None],
            voice.prompt_tokens,
            voice.prompt_mel,
            voice.speaker_embedding,
            n_timesteps=self._check_steps(n_timesteps),
            chunk_size=chunk_size,
        )
        return self.hift_original(mel, generator=generator)[0].float()

    # ------------------------------------------------------------------ streaming
    @torch.no_grad()
    def start_stream(
        self,
        voice: VoicePrompt,
        n_timesteps: int | None = None,
        force_flush: bool | None = None,
        seed: int | None = None,
    ) -> Token2WavStreamState:
        """Encode the voice prompt once (flow caches with [4218]*3 lookahead) and return an idle stream.

        ``seed`` makes the vocoder noise reproducible (turn t uses seed + t); None draws from the global RNG.
        """
        voice = self._check_voice(voice)
        steps = self._check_steps(n_timesteps)
        force_flush = self.config.force_flush if force_flush is None else force_flush
        if not isinstance(force_flush, bool):
            raise Token2WavInputError(f"force_flush must be a bool, got {force_flush!r}")
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
            raise Token2WavInputError(f"seed must be an int or None, got {seed!r}")
        base = self.flow.prepare_stream(voice.prompt_tokens, voice.prompt_mel, voice.speaker_embedding, steps)
        return Token2WavStreamState(
            voice=voice,
            base=base,
            flow=base,
            hift=self.hift_original.new_stream_state(seed=seed),
            pending=torch.zeros(0, dtype=torch.long),
            n_timesteps=steps,
            force_flush=force_flush,
            seed=seed,
        )

    @torch.no_grad()
    def push(
        self, codes, state: Token2WavStreamState, end_of_turn: bool = False
    ) -> tuple[torch.Tensor, Token2WavStreamState]:
        """Append codes (LongTensor [k], any k >= 0) -> (new 24 kHz samples FloatTensor [m], next state).

        Pure: ``state`` is left untouched, so a caller may retry or branch from it.
        """
        if not isinstance(state, Token2WavStreamState):
            raise Token2WavInputError(f"state must come from start_stream, got {type(state).__name__}")
        if not isinstance(end_of_turn, bool):
            raise Token2WavInputError(f"end_of_turn must be a bool, got {end_of_turn!r}")
        codes = self._check_codes(codes, allow_empty=True)
        cfg = self.config
        lookahead, stride = cfg.lookahead_tokens, cfg.stream_chunk_tokens

        pending, in_turn = state.pending, state.in_turn
        if codes.numel():
            if not in_turn:
                pending = torch.full((lookahead,), cfg.silence_token_id, dtype=torch.long)
                in_turn = True
            pending = torch.cat([pending, codes])

        flow_state, hift_state, pieces = state.flow, state.hift, []
        while pending.numel() >= stride + lookahead:
            mel, flow_state = self.flow.stream_step(pending[None, : stride + lookahead], flow_state)
            wav, hift_state = self.hift_original.stream_step(mel, hift_state)
            pieces.append(wav[0])
            pending = pending[stride:]
        if state.force_flush and pending.numel() >= cfg.force_flush_min_tokens:
            mel, flow_state = self.flow.stream_step(pending[None], flow_state)
            wav, hift_state = self.hift_original.stream_step(mel, hift_state)
            pieces.append(wav[0])
            pending = pending[pending.numel() - lookahead :]

        turn, emitted = state.turn, state.samples_emitted
        if end_of_turn and in_turn:
            mel, flow_state = self.flow.stream_step(pending[None], flow_state, last_chunk=True)
            wav, _ = self.hift_original.stream_step(mel, hift_state, last_chunk=True)
            pieces.append(wav[0])
            turn += 1
            seed = None if state.seed is None else state.seed + turn
            flow_state, hift_state = state.base, self.hift_original.new_stream_state(seed=seed)
            pending, in_turn = torch.zeros(0, dtype=torch.long), False

        wav = torch.cat(pieces) if pieces else torch.zeros(0, device=self.device)
        emitted = 0 if turn != state.turn else emitted + wav.numel()
        next_state = replace(
            state,
            flow=flow_state,
            hift=hift_state,
            pending=pending,
            in_turn=in_turn,
            turn=turn,
            samples_emitted=emitted,
        )
        return wav.float(), next_state

    def flush(self, state: Token2WavStreamState) -> tuple[torch.Tensor, Token2WavStreamState]:
        """End the current turn: emit everything still buffered or held back, then reset to the prompt base."""
        return self.push(torch.zeros(0, dtype=torch.long), state, end_of_turn=True)


@torch.no_grad()
def init_token2wav_weights(module: nn.Module, std: float = 0.02) -> bool:
    """``_init_weights`` hook for token2wav parts that transformers' default init misses.

    Call it on every module (after ``super()._init_weights(module)``). It (re)creates the flow's fixed
    noise, the FSQ lookup buffers, Snake alphas (ones), rel-pos biases (Xavier, as at construction) and
    weight-norm pairs (v ~ N(0, std), g = ||v|| per row). Loaded tensors keep their values: parameters go
    through ``transformers.initialization``, which skips tensors flagged as loaded; the buffers handled
    here are non-persistent and deterministic. Returns whether ``module`` was one of these.
    """
    if isinstance(module, FlowDecoder):
        module.reset_noise()
    elif isinstance(module, S3FSQ):
        module.recreate_buffers()
    elif isinstance(module, Snake):
        init.ones_(module.alpha)
    elif isinstance(module, RelPositionSelfAttention):
        init.xavier_uniform_(module.pos_bias_u)
        init.xavier_uniform_(module.pos_bias_v)
    else:
        return init_weight_norm_parametrization(module, std)
    return True


__all__ = [
    "MiniCPMOToken2Wav",
    "Token2WavConfig",
    "Token2WavConfigError",
    "Token2WavInputError",
    "Token2WavStreamState",
    "VoicePrompt",
    "init_token2wav_weights",
]
