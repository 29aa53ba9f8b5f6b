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

from dataclasses import asdict, dataclass, field, fields, replace

import torch
from torch import nn

from transformers import initialization as init

from ..audio_utils import mono_waveform
from .audio_frontends_token2wav import (
    FBANK_SAMPLE_RATE,
    PROMPT_MEL_BINS,
    InvalidAudioError,
    fit_prompt_mel,
    prompt_mel_24k,
)
from .modeling_campplus import CAMPPlusConfig, SpeakerEmbedder
from .modeling_flow import FlowConfig, FlowDecoder, FlowStreamState
from .modeling_flow_encoder import RelPositionSelfAttention
from .modeling_hift import HiFTConfig, HiFTStreamState, HiFTVocoder, Snake
from .modeling_speech_decoder import init_weight_norm_parametrization
from .modeling_speech_tokenizer import S3FSQ, S3SpeechTokenizer, S3TokenizerConfig

try:  # pinned dependency; only needed to resample reference audio that is not at 16 kHz
    import torchaudio.functional as _taf
except ImportError:  # pragma: no cover
    _taf = None

VOICE_MIN_SECONDS = 0.2  # below this the speaker embedding and the prompt mel are meaningless
VOICE_MAX_SECONDS = 30.0  # one S3 tokenizer window


class Token2WavConfigError(ValueError):
    """Token2WavConfig values are inconsistent (e.g. flow and vocoder disagree on the mel width)."""


class Token2WavInputError(ValueError):
    """Bad codes, voice prompt, stream state or option handed to MiniCPMOToken2Wav."""


def _as_tuples(value, like):
    """JSON turns tuples into lists; give list values back the tuple shape of the field default ``like``."""
    if isinstance(like, tuple) and isinstance(value, (list, tuple)):
        inner = like[0] if like else None
        return tuple(_as_tuples(item, inner) for item in value)
    return value


def _dataclass_from_dict(cls, values: dict, name: str):
    if not isinstance(values, dict):
        raise Token2WavConfigError(f"{name} must be a dict, got {type(values).__name__}")
    known = {f.name: f for f in fields(cls)}
    unknown = set(values) - set(known)
    if unknown:
        raise Token2WavConfigError(f"unknown {name} keys: {sorted(unknown)}")
    defaults = cls()
    return cls(**{key: _as_tuples(value, getattr(defaults, key)) for key, value in values.items()})


@dataclass
class Token2WavConfig:
    """Everything needed to build :class:`MiniCPMOToken2Wav`; JSON-serialisable through ``to_dict``.

    n_timesteps: Euler steps of the flow ODE (official default 10; the demo uses 5).
    stream_chunk_tokens: new codes per regular streaming window (25; the window adds 3 lookahead codes).
    force_flush / force_flush_min_tokens: the unified-model rule, see the module docstring.
    voice_encoders: build ``campplus`` and ``speech_tokenizer`` (needed by ``prepare_voice``).
    """

    flow: FlowConfig = field(default_factory=FlowConfig)
    hift: HiFTConfig = field(default_factory=HiFTConfig)
    campplus: CAMPPlusConfig = field(default_factory=CAMPPlusConfig)
    speech_tokenizer: S3TokenizerConfig = field(default_factory=S3TokenizerConfig)
    n_timesteps: int = 10
    stream_chunk_tokens: int = 25
    force_flush: bool = True
    force_flush_min_tokens: int = 8
    voice_encoders: bool = True

    def __post_init__(self):
        for name, cls in (
            ("flow", FlowConfig),
            ("hift", HiFTConfig),
            ("campplus", CAMPPlusConfig),
            ("speech_tokenizer", S3TokenizerConfig),
        ):
            value = getattr(self, name)
            if isinstance(value, dict):
                value = FlowConfig.from_dict(value) if cls is FlowConfig else _dataclass_from_dict(cls, value, name)
                setattr(self, name, value)
            if not isinstance(value, cls):
                raise Token2WavConfigError(
                    f"Token2WavConfig.{name} must be a {cls.__name__}, got {type(value).__name__}"
                )
        for name in ("n_timesteps", "stream_chunk_tokens", "force_flush_min_tokens"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise Token2WavConfigError(f"Token2WavConfig.{name} must be a positive int, got {value!r}")
        if self.force_flush_min_tokens <= self.lookahead_tokens:
            raise Token2WavConfigError(
                f"force_flush_min_tokens ({self.force_flush_min_tokens}) must exceed the "
                f"{self.lookahead_tokens} lookahead codes, or a flush would stream no new code"
            )
        if self.flow.output_size != self.hift.in_channels:
            raise Token2WavConfigError(
                f"flow.output_size ({self.flow.output_size}) must equal hift.in_channels ({self.hift.in_channels})"
            )
        if self.voice_encoders:
            if self.flow.output_size != PROMPT_MEL_BINS:
                raise Token2WavConfigError(
                    f"flow.output_size must be {PROMPT_MEL_BINS} (the prompt mel width) to prepare voices from audio"
                )
            if self.flow.spk_embed_dim != self.campplus.embedding_size:
                raise Token2WavConfigError(
                    f"flow.spk_embed_dim ({self.flow.spk_embed_dim}) must equal campplus.embedding_size "
                    f"({self.campplus.embedding_size})"
                )
            if self.flow.vocab_size != self.speech_tokenizer.codebook_size:
                raise Token2WavConfigError(
                    f"flow.vocab_size ({self.flow.vocab_size}) must equal the S3 codebook size "
                    f"({self.speech_tokenizer.codebook_size})"
                )

    # ------------------------------------------------------------------ derived values
    @property
    def sample_rate(self) -> int:
        return self.hift.sampling_rate

    @property
    def samples_per_code(self) -> int:
        """960 for the official sizes: 2 mel frames per code, 480 samples per frame."""
        return self.flow.up_stride * self.hift.samples_per_frame

    @property
    def lookahead_tokens(self) -> int:
        return self.flow.pre_lookahead_len

    @property
    def silence_token_id(self) -> int:
        return self.flow.silence_token_id

    # ------------------------------------------------------------------ (de)serialisation
    def to_dict(self) -> dict:
        """Plain JSON types only (tuples become lists), so it can sit inside a config.json."""
        values = {
            "flow": self.flow.to_dict(),
            "hift": asdict(self.hift),
            "campplus": asdict(self.campplus),
            "speech_tokenizer": asdict(self.speech_tokenizer),
        }
        values.update({f.name: getattr(self, f.name) for f in fields(self) if f.name not in values})

        def plain(value):
            if isinstance(value, (list, tuple)):
                return [plain(item) for item in value]
            if isinstance(value, dict):
                return {key: plain(item) for key, item in value.items()}
            return value

        return plain(values)

    @classmethod
    def from_dict(cls, values: dict) -> "Token2WavConfig":
        if not isinstance(values, dict):
            raise Token2WavConfigError(f"Token2WavConfig.from_dict needs a dict, got {type(values).__name__}")
        unknown = set(values) - {f.name for f in fields(cls)}
        if unknown:
            raise Token2WavConfigError(f"unknown Token2WavConfig keys: {sorted(unknown)}")
        return cls(**values)

    @classmethod
    def tiny(cls, **overrides) -> "Token2WavConfig":
        """Every part small (same rates, 80 mel bins, 192-d speaker): 1 s of audio in a fraction of a second on CPU."""
        values = dict(
            flow=FlowConfig.tiny(output_size=80, spk_embed_dim=192, dit_in_channels=320, dit_out_channels=80),
            hift=HiFTConfig.tiny(),
            campplus=CAMPPlusConfig.tiny(),
            speech_tokenizer=S3TokenizerConfig.tiny(),
        )
        values.update(overrides)
        return cls(**values)

    @classmethod
    def demo(cls, **overrides) -> "Token2WavConfig":
        """The shipped demo token2wav (< 2.0 M parameters in all, official rates: 16 kHz tokenizer input,
        25 codes/s from 6561 FSQ codes, 80-bin mel at 50 Hz, 192-d speaker vector, 24 kHz out), 5 Euler steps."""
        values = dict(
            flow=FlowConfig.demo(),
            hift=HiFTConfig.demo(),
            campplus=CAMPPlusConfig.demo(),
            speech_tokenizer=S3TokenizerConfig.demo(),
            n_timesteps=5,
        )
        values.update(overrides)
        return cls(**values)


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
