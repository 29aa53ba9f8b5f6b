"""Omni-Flow full duplex: perception and response on one time axis, one 1-s unit at a time (official §8).

Each unit: encode the newest frame (448-class, 64 tokens) and 1 s of audio with the streaming encoder caches,
prefill `<unit> [frame] [10 audio slots]` into the persistent LLM KV cache, decode at most
`max_speak_tokens_per_unit` tokens (the first one decides: `<|listen|>` ends the unit as a listen, anything else
makes it a speaking unit), close with `</unit>`, turn the unit's text into exactly 25 speech codes (1 s) and stream
them through token2wav.

Decoding rule (official §8, "Loop j = 0..19"), the same for every token of a unit, the first one included:
1. one draw from the raw distribution (argmax when greedy); `<|chunk_eos|>` there ends the unit;
2. otherwise the forbidden ids are masked: `<|tts_pad|>`, the tokenizer's 6965 `bad_token_ids` and `<|chunk_eos|>`
   (nothing else: layout tokens such as `<unit>` or `<|im_end|>` stay possible, as in the official loop);
3. logits of tokens among the last `repetition_window` generated ones are divided by `repetition_penalty`;
4. `<|turn_eos|>` gets the length penalty; 5. temperature / top-k / top-p and a draw (argmax when greedy).
Terminators: `<|listen|>`, `<|chunk_eos|>`, `<|chunk_tts_eos|>`. The first token of a unit, whatever it is, is fed
but belongs neither to the unit's text nor to its speech condition (the official keeps hidden states for j >= 1).
A first token other than `<|listen|>` makes a speaking unit, even a terminator (a unit without text). Later in the
unit the turn is open, so a `<|listen|>` there is replaced by `<|tts_bos|>` (official rule); a `<|listen|>` as first
token while a turn is open is a barge-in (the turn ends). `DuplexConfig.restrict_decision` restores the older
listen/speak-only first token.

`DuplexState` holds everything a session carries between units; `duplex_step(model, runtime, state, audio, frame)`
advances it by one unit. `DuplexSession` is the push-style wrapper (`step` / `reset` / `close`) a server drives.
The KV cache inside the state is updated in place (copying it every second would cost more than the unit).
"""

import time
from dataclasses import dataclass, field, replace

import numpy as np
import torch
from transformers import DynamicCache

from ..processing.duplex_layout_minicpmo import DuplexTokens, system_prefix_ids, unit_input_ids
from ..processing.feature_extraction_minicpmo import validate_waveform
from ..processing.streaming_mel_minicpmo import StreamingMelProcessor, StreamingMelState
from ..processing.tokenization_minicpmo import load_bad_token_ids
from .modeling_cache_window import drop_cache_span
from .modeling_duplex_audio import DuplexAudioEncoderState, encode_unit
from .modeling_multimodal_merge import scatter_into_slots
from .modeling_speech_decoder import SpeechSamplingConfig
from .modeling_speech_output import text_logits_processors

UNIT_SAMPLES = 16000
OUTPUT_SAMPLE_RATE = 24000
STAGES = ("vision", "audio", "prefill", "decode", "speech_codes", "token2wav")


@dataclass
class DuplexConfig:
    """Controls of a duplex session (official defaults where they exist)."""

    max_speak_tokens_per_unit: int = 20
    force_listen_count: int = 3
    # Added to the <|listen|> logit before a unit's first token is decoded (negative: talk more; +-1e9 forces the
    # choice). Later tokens of the unit are decoded without it.
    listen_bias: float = 0.0
    # Opt-in: decide a unit's first token between <|listen|> and <|speak|> only (argmax or sampled over the two),
    # instead of the official rule that decodes it like every other token. Models trained on the strict
    # `<|listen|>` / `<|speak|>` layout can use it to never open a unit with another token.
    restrict_decision: bool = False
    do_sample: bool = False
    temperature: float = 0.7
    top_k: int = 20
    top_p: float = 0.8
    repetition_penalty: float = 1.05
    repetition_window: int = 512
    length_penalty: float = 1.1
    generate_audio: bool = True
    n_timesteps: int = 5
    max_speech_lag_s: float = 1.0
    window_high_tokens: int = 4000
    window_low_tokens: int = 3500
    seed: int | None = None

    def __post_init__(self):
        if self.max_speak_tokens_per_unit < 2:
            raise ValueError(f"max_speak_tokens_per_unit must be >= 2, got {self.max_speak_tokens_per_unit}")
        if not 0 < self.window_low_tokens <= self.window_high_tokens:
            raise ValueError(
                f"need 0 < window_low_tokens ({self.window_low_tokens}) <= window_high_tokens "
                f"({self.window_high_tokens})"
            )
        if self.force_listen_count < 0:
            raise ValueError(f"force_listen_count must be >= 0, got {self.force_listen_count}")


@dataclass
class DuplexOutput:
    """What one unit produced. `audio` is 24 kHz float32 (None while listening or when audio is off)."""

    is_listen: bool
    text: str
    audio: np.ndarray | None
    end_of_turn: bool
    time_s: float
    timings: dict = field(default_factory=dict)
    interrupted: bool = False
    token_ids: list = field(default_factory=list)
    unit_index: int = 0


@dataclass
class DuplexState:
    """Everything carried from one unit to the next."""

    cache: DynamicCache
    next_position: int
    system_length: int
    unit_spans: list  # [start, length] of every unit still in the cache, oldest first
    mel_state: StreamingMelState
    audio_state: DuplexAudioEncoderState
    tts_state: object | None
    wav_state: object | None
    generated: list  # recent generated token ids (repetition penalty window)
    unit_index: int = 0
    in_turn: bool = False
    turn_start_time_s: float = 0.0
    speech_emitted_s: float = 0.0
    sequence_ids: list | None = None  # full token layout, kept only when recording
    fed_embeds: list | None = None  # every embedding fed to the LLM, kept only when recording
    decision_logits: list | None = None  # logits each unit's first token was decoded from, when recording


@dataclass
class DuplexRuntime:
    """Per-session constants: tokens, front end, voice, sampling."""

    processor: object
    tokens: DuplexTokens
    mel: StreamingMelProcessor
    config: DuplexConfig
    voice: object | None
    generator: torch.Generator | None
    forbidden_ids: torch.Tensor  # ids never decoded (see `decoding_forbidden_ids`), on the model's device
    record: bool = False


def decoding_forbidden_ids(tokenizer, tokens: DuplexTokens) -> list[int]:
    """The official forbidden set of duplex decoding: `<|tts_pad|>`, every `bad_token_ids` id and `<|chunk_eos|>`.

    `bad_token_ids` come from the tokenizer itself when it carries them (its `bad_token_ids` attribute, or the
    tokenizer_config.json entry kept in `init_kwargs`), else from the bundled official tokenizer files (the ids are
    those of the one MiniCPM-o vocabulary, which `DuplexTokens.from_tokenizer` has checked).
    """
    bad = getattr(tokenizer, "bad_token_ids", None) or getattr(tokenizer, "init_kwargs", {}).get("bad_token_ids")
    if not bad:
        bad = load_bad_token_ids()
    return sorted({int(token) for token in bad} | {tokens.tts_pad, tokens.chunk_eos})


def _embed_unit(model, runtime: DuplexRuntime, state: DuplexState, audio, frame, timings) -> tuple:
    """Audio (+ frame) of one unit -> (input ids, embeddings [1, L, H], audio state, mel state) or None."""
    core = model.model
    started = time.perf_counter()
    image_features = None
    if frame is not None:
        pixels = runtime.processor.frame_inputs(frame)
        image_features = core.get_image_features(pixels["pixel_values"].to(model.device), pixels["tgt_sizes"])
    timings["vision"] = time.perf_counter() - started

    started = time.perf_counter()
    mel_chunk, mel_state = runtime.mel.step(audio, state.mel_state)
    if mel_chunk is None:
        timings["audio"] = time.perf_counter() - started
        return None
    dtype = core.apm.conv1.weight.dtype
    audio_features, audio_state = encode_unit(
        core.apm, core.audio_projection_layer, mel_chunk.to(device=model.device, dtype=dtype), state.audio_state,
        pool_step=model.config.audio_pool_step,
    )
    timings["audio"] = time.perf_counter() - started

    ids = unit_input_ids(runtime.tokens, has_frame=frame is not None, n_audio_slots=audio_features.shape[0],
                         image_slots=model.config.query_num)
    input_ids = torch.tensor([ids], device=model.device)
    embeds = core.get_input_embeddings()(input_ids)
    if image_features is not None:
        embeds = scatter_into_slots(embeds, core.image_slot_mask(input_ids), image_features.flatten(0, 1), "image")
    embeds = scatter_into_slots(embeds, core.audio_slot_mask(input_ids), audio_features, "audio")
    return ids, embeds, audio_state, mel_state


def _feed(model, state: DuplexState, input_ids=None, inputs_embeds=None):
    """Run new positions on the cache; returns (last hidden state [H], logits [V])."""
    if state.fed_embeds is not None:
        fed = inputs_embeds if inputs_embeds is not None else model.model.get_input_embeddings()(input_ids)
        state.fed_embeds.append(fed[0].detach().cpu())
    length = (input_ids if input_ids is not None else inputs_embeds).shape[1]
    positions = torch.arange(state.next_position, state.next_position + length, device=model.device).unsqueeze(0)
    out = model.model.language_model(input_ids=input_ids, inputs_embeds=inputs_embeds, cache=state.cache,
                                     position_ids=positions, use_cache=True)
    state.next_position += length
    hidden = out.last_hidden_state[0, -1]
    return hidden, model.lm_head(hidden)


def _draw(runtime: DuplexRuntime, scores: torch.Tensor, warp: bool) -> int:
    """Argmax when greedy; otherwise a multinomial draw (after temperature / top-k / top-p when `warp`)."""
    cfg = runtime.config
    if not cfg.do_sample:
        return int(scores.argmax())
    if warp:
        scores = text_logits_processors(True, cfg.temperature, cfg.top_p, cfg.top_k)(
            torch.empty(1, 0, dtype=torch.long), scores[None])[0]
    return int(torch.multinomial(scores.softmax(-1), 1, generator=runtime.generator))


def _choose_token(runtime: DuplexRuntime, logits: torch.Tensor, generated: list, listen_bias: float = 0.0) -> int:
    """One token of a unit by the official rule (module docstring); `listen_bias` is added to <|listen|> first."""
    cfg, tok = runtime.config, runtime.tokens
    scores = logits.float().clone()
    if listen_bias:
        scores[tok.listen] += listen_bias
    # 1. One draw from the raw distribution (no temperature) may end the unit.
    raw = _draw(runtime, scores, warp=False)
    if raw == tok.chunk_eos:
        return raw
    # 2. Forbidden ids (<|chunk_eos|> among them) can no longer be drawn.
    scores[runtime.forbidden_ids.to(scores.device)] = float("-inf")
    # 3. Repetition penalty over the recent window: a plain divide, whatever the sign (official).
    recent = sorted(set(generated[-cfg.repetition_window:]))
    if recent and cfg.repetition_penalty != 1.0:
        scores[recent] = scores[recent] / cfg.repetition_penalty
    # 4. Length penalty on <|turn_eos|>: divide a positive logit, multiply a negative one.
    eos = scores[tok.turn_eos]
    scores[tok.turn_eos] = eos / cfg.length_penalty if eos > 0 else eos * cfg.length_penalty
    # 5. Temperature, top-k, top-p and the draw.
    return _draw(runtime, scores, warp=True)


def _choose_decision(runtime: DuplexRuntime, logits: torch.Tensor) -> int:
    """Opt-in (`restrict_decision`): the unit's first token is <|listen|> or <|speak|>, nothing else."""
    cfg, tok = runtime.config, runtime.tokens
    scores = torch.full_like(logits, float("-inf"), dtype=torch.float32)
    scores[tok.listen] = logits[tok.listen].float() + cfg.listen_bias
    scores[tok.speak] = logits[tok.speak].float()
    return _draw(runtime, scores, warp=True)


def _speak_budget(runtime: DuplexRuntime, state: DuplexState, now_s: float) -> int:
    """TAIL playback clock: when queued speech runs ahead of the interaction clock, say less this unit."""
    cap = runtime.config.max_speak_tokens_per_unit
    lag = state.speech_emitted_s - (now_s - state.turn_start_time_s) if state.in_turn else 0.0
    if lag > 2 * runtime.config.max_speech_lag_s:
        return 2  # <|speak|> + <|chunk_eos|>: keep the turn open, add no text
    if lag > runtime.config.max_speech_lag_s:
        return max(2, cap // 2)
    return cap


def _slide_window(model, runtime: DuplexRuntime, state: DuplexState) -> None:
    """Drop the oldest whole units (the system prompt stays) once the cache passes the high watermark."""
    cfg = runtime.config
    if state.next_position <= cfg.window_high_tokens:
        return
    drop = 0
    while state.unit_spans and state.next_position - drop > cfg.window_low_tokens and len(state.unit_spans) > 1:
        drop += state.unit_spans.pop(0)[1]
    if drop:
        drop_cache_span(state.cache, state.system_length, drop, model.model.language_model.rotary_emb.inv_freq)
        state.next_position -= drop
        start = state.system_length
        for span in state.unit_spans:
            span[0] = start
            start += span[1]
        if state.sequence_ids is not None:
            del state.sequence_ids[state.system_length:state.system_length + drop]


@torch.no_grad()
def duplex_step(model, runtime: DuplexRuntime, state: DuplexState, audio, frame=None) -> DuplexOutput:
    """Advance the session by one unit (1 s of 16 kHz mono audio, optional frame)."""
    tok, cfg = runtime.tokens, runtime.config
    timings = dict.fromkeys(STAGES, 0.0)
    audio = validate_waveform(audio, name="unit audio")  # typed errors before any state changes
    time_s = state.unit_index * UNIT_SAMPLES / 16000.0
    embedded = _embed_unit(model, runtime, state, audio, frame, timings)
    unit_index = state.unit_index
    state.unit_index += 1
    if embedded is None:  # not enough audio yet for a unit
        return DuplexOutput(True, "", None, False, time_s, timings, unit_index=unit_index)
    ids, embeds, state.audio_state, state.mel_state = embedded

    started = time.perf_counter()
    unit_start = state.next_position
    hidden, logits = _feed(model, state, inputs_embeds=embeds)
    timings["prefill"] = time.perf_counter() - started
    if state.sequence_ids is not None:
        state.sequence_ids.extend(ids)
        state.decision_logits.append(logits.detach().cpu())

    started = time.perf_counter()
    budget = _speak_budget(runtime, state, time_s)
    if unit_index < cfg.force_listen_count:
        first = tok.listen
    elif cfg.restrict_decision:
        first = _choose_decision(runtime, logits)
    else:
        first = _choose_token(runtime, logits, state.generated, listen_bias=cfg.listen_bias)
    generated = [first]
    text_ids, text_hidden = [], []
    end_of_turn = False
    if first not in tok.unit_terminators:
        # The first token is fed but is neither unit text nor speech condition (official: hidden states j >= 1).
        hidden, logits = _feed(model, state, input_ids=torch.tensor([[first]], device=model.device))
        end_of_turn = first == tok.turn_eos
        while True:
            if end_of_turn or len(generated) >= budget - 1:
                token = tok.chunk_eos
            else:
                token = _choose_token(runtime, logits, state.generated + generated)
                if token == tok.listen:  # the turn is open inside a speaking unit (official rule)
                    token = tok.tts_bos
            generated.append(token)
            if token in tok.unit_terminators:
                break
            end_of_turn = token == tok.turn_eos
            hidden, logits = _feed(model, state, input_ids=torch.tensor([[token]], device=model.device))
            text_ids.append(token)
            text_hidden.append(hidden)
    closing = [generated[-1], tok.unit_end]
    _feed(model, state, input_ids=torch.tensor([closing], device=model.device))
    timings["decode"] = time.perf_counter() - started
    state.generated = (state.generated + generated)[-cfg.repetition_window:]
    if state.sequence_ids is not None:
        state.sequence_ids.extend(generated[:-1] + closing)
    state.unit_spans.append([unit_start, state.next_position - unit_start])

    is_listen = first == tok.listen
    interrupted = is_listen and state.in_turn
    audio_out = None
    if is_listen:
        if interrupted:  # barge-in: the model yields the floor; queued speech of the old turn is dropped
            end_of_turn = True
            _end_turn(model, runtime, state)
    else:
        if not state.in_turn:
            state.in_turn, state.turn_start_time_s, state.speech_emitted_s = True, time_s, 0.0
            turn_start = True
        else:
            turn_start = False
        if cfg.generate_audio and runtime.voice is not None:
            audio_out = _speak_unit(model, runtime, state, text_ids, text_hidden, turn_start, end_of_turn, timings)
        if end_of_turn:
            _end_turn(model, runtime, state)
    _slide_window(model, runtime, state)
    text = runtime.processor.tokenizer.decode(text_ids, skip_special_tokens=True)
    return DuplexOutput(is_listen, text, audio_out, end_of_turn, time_s, timings, interrupted, generated, unit_index)


def _speak_unit(model, runtime, state, text_ids, text_hidden, turn_start, end_of_turn, timings) -> np.ndarray:
    started = time.perf_counter()
    spoken_ids = [t for t in text_ids if t != runtime.tokens.turn_eos]
    spoken_hidden = [h for t, h in zip(text_ids, text_hidden) if t != runtime.tokens.turn_eos]
    ids = torch.tensor(spoken_ids, dtype=torch.long, device=model.device)
    hid = torch.stack(spoken_hidden) if spoken_hidden else torch.zeros(0, model.config.hidden_size,
                                                                        device=model.device)
    sampling = SpeechSamplingConfig.for_duplex(do_sample=runtime.config.do_sample, seed=runtime.config.seed)
    codes, state.tts_state = model.tts.generate_unit_codes(ids, hid, state.tts_state, turn_start=turn_start,
                                                           unit_has_turn_eos=end_of_turn, sampling=sampling)
    timings["speech_codes"] = time.perf_counter() - started
    started = time.perf_counter()
    wav, state.wav_state = model.token2wav.push(codes, state.wav_state, end_of_turn=end_of_turn)
    timings["token2wav"] = time.perf_counter() - started
    audio = wav.detach().float().cpu().numpy()
    state.speech_emitted_s += audio.shape[0] / OUTPUT_SAMPLE_RATE
    return audio


def _end_turn(model, runtime: DuplexRuntime, state: DuplexState) -> None:
    state.in_turn = False
    if runtime.voice is not None:
        state.tts_state = model.tts.new_stream_state(runtime.config.seed)
        state.wav_state = model.token2wav.start_stream(runtime.voice, n_timesteps=runtime.config.n_timesteps)


def new_duplex_state(model, runtime: DuplexRuntime, system_prompt: str, ref_audio=None) -> DuplexState:
    """Prefill the system prompt (with the reference voice as audio, official layout) into a fresh cache."""
    core = model.model
    ref_features = None
    if ref_audio is not None:
        features = runtime.processor.feature_extractor([np.asarray(ref_audio, dtype=np.float32)], return_tensors="pt")
        ref_features = core.get_audio_features(features["input_features"].to(model.device),
                                               features["input_features_mask"].to(model.device))
    ids = system_prefix_ids(runtime.processor.tokenizer, system_prompt,
                            n_ref_audio_slots=0 if ref_features is None else ref_features.shape[0])
    input_ids = torch.tensor([ids], device=model.device)
    embeds = core.get_input_embeddings()(input_ids)
    if ref_features is not None:
        embeds = scatter_into_slots(embeds, core.audio_slot_mask(input_ids), ref_features, "audio")
    state = DuplexState(
        cache=DynamicCache(config=model.config), next_position=0, system_length=len(ids), unit_spans=[],
        mel_state=runtime.mel.initial_state(), audio_state=DuplexAudioEncoderState(), tts_state=None,
        wav_state=None, generated=[], sequence_ids=list(ids) if runtime.record else None,
        fed_embeds=[] if runtime.record else None, decision_logits=[] if runtime.record else None,
    )
    with torch.no_grad():
        _feed(model, state, inputs_embeds=embeds)
    if runtime.voice is not None:
        state.tts_state = model.tts.new_stream_state(runtime.config.seed)
        state.wav_state = model.token2wav.start_stream(runtime.voice, n_timesteps=runtime.config.n_timesteps)
    return state


class DuplexSession:
    """Push-style duplex session: `step(audio_1s, frame=None) -> DuplexOutput`, `reset()`, `close()`."""

    def __init__(self, model, processor, system_prompt: str = "Streaming Omni Conversation.", ref_audio=None,
                 config: DuplexConfig | None = None, record: bool = False, **controls):
        self.model = model
        self.config = replace(config or DuplexConfig(), **controls)
        self.system_prompt = system_prompt
        self.ref_audio = None if ref_audio is None else np.asarray(ref_audio, dtype=np.float32)
        voice = None
        if self.config.generate_audio and getattr(model, "tts", None) is not None and self.ref_audio is not None:
            voice = model.prepare_voice(self.ref_audio)
        tokens = DuplexTokens.from_tokenizer(processor.tokenizer)
        forbidden = torch.tensor(decoding_forbidden_ids(processor.tokenizer, tokens), dtype=torch.long,
                                 device=model.device)
        self.runtime = DuplexRuntime(
            processor=processor, tokens=tokens, mel=StreamingMelProcessor(), config=self.config, voice=voice,
            generator=None, forbidden_ids=forbidden, record=record,
        )
        self.closed = False
        self.reset()

    def reset(self) -> None:
        """Start over: fresh caches, system prompt prefilled again, RNG re-seeded."""
        if self.config.seed is not None:
            self.runtime.generator = torch.Generator(device=self.model.device).manual_seed(self.config.seed)
        self.state = new_duplex_state(self.model, self.runtime, self.system_prompt, self.ref_audio)

    def step(self, audio, frame=None) -> DuplexOutput:
        if self.closed:
            raise RuntimeError("this duplex session is closed")
        return duplex_step(self.model, self.runtime, self.state, audio, frame)

    def close(self) -> None:
        """Release the caches (the object cannot be stepped afterwards)."""
        self.closed = True
        self.state = None


class MiniCPMODuplexMixin:
    """`duplex_session(...)` and `generate_duplex(...)` on the model."""

    def duplex_session(self, processor, system_prompt: str = "Streaming Omni Conversation.", ref_audio=None,
                       config: DuplexConfig | None = None, **controls) -> DuplexSession:
        return DuplexSession(self, processor, system_prompt=system_prompt, ref_audio=ref_audio, config=config,
                             **controls)

    def generate_duplex(self, chunks, processor, system_prompt: str = "Streaming Omni Conversation.", ref_audio=None,
                        config: DuplexConfig | None = None, **controls):
        """Yield one DuplexOutput per chunk; a chunk is 1 s of 16 kHz audio, an (audio, frame) pair or a dict."""
        session = self.duplex_session(processor, system_prompt, ref_audio, config, **controls)
        try:
            for chunk in chunks:
                if isinstance(chunk, dict):
                    audio, frame = chunk["audio"], chunk.get("frame")
                elif isinstance(chunk, tuple):
                    audio, frame = chunk
                else:
                    audio, frame = chunk, None
                yield session.step(audio, frame)
        finally:
            session.close()
