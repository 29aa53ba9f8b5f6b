"""Omni-Flow full duplex, the model's part: the math of one 1-s unit (official §8).

A unit: embed `<unit> [frame] [10 audio slots]` (vision tower, streaming Whisper encoder with its caches), prefill
it into the persistent LLM KV cache, decode at most `max_speak_tokens_per_unit` tokens (the first one decides:
`<|listen|>` ends the unit as a listen, anything else makes it a speaking unit), close with `</unit>`, and turn the
unit's text into exactly 25 speech codes (1 s) streamed through token2wav. The session that strings units together
(state, speaking clock, turns) lives in `minicpmo.duplex`; the processor prepares each unit's inputs.

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
token while a turn is open is a barge-in (the turn ends). `restrict_decision` restores the older listen/speak-only
first token.

Streaming state: `DuplexLLMContext` holds the KV cache and is owned and mutated in place by one session (copying
the cache every second would cost more than the unit); the audio encoder, speech decoder and token2wav states are
frozen objects returned anew by each call.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
from transformers import DynamicCache

from .modeling_cache_window import drop_cache_span
from .modeling_duplex_audio import DuplexAudioEncoderState, encode_unit, encode_units
from .modeling_multimodal_merge import scatter_into_slots
from .modeling_speech_decoder import SpeechSamplingConfig
from .modeling_speech_output import text_logits_processors

@dataclass
class DuplexLLMContext:
    """The LLM side of a session: KV cache, next position, where each unit sits (mutated in place)."""

    cache: DynamicCache
    next_position: int = 0
    system_length: int = 0
    unit_spans: list = field(default_factory=list)  # [start, length] of every unit still in the cache, oldest first
    sequence_ids: list | None = None  # full token layout, kept only when recording
    fed_embeds: list | None = None  # every embedding fed to the LLM, kept only when recording
    decision_logits: list | None = None  # logits each unit's first token was decoded from, when recording


@dataclass
class DuplexDecoder:
    """What decoding a unit needs besides the logits: the layout tokens, the controls, the forbidden ids, the RNG.

    `controls` is the session's `DuplexConfig` (read for do_sample, temperature, top_k, top_p, repetition_penalty,
    repetition_window, length_penalty, listen_bias, restrict_decision, force_listen_count).
    """

    tokens: object
    controls: object
    forbidden_ids: torch.Tensor
    generator: torch.Generator | None = None


@dataclass
class DecodedUnit:
    """The generated part of one unit: every id decoded (terminator last), the unit's text ids and their hidden states."""

    generated: list
    text_ids: list
    text_hidden: list
    end_of_turn: bool

    @property
    def first(self) -> int:
        return self.generated[0]


def draw(decoder: DuplexDecoder, scores: torch.Tensor, warp: bool) -> int:
    """Argmax when greedy; otherwise a multinomial draw (after temperature / top-k / top-p when `warp`)."""
    cfg = decoder.controls
    if not cfg.do_sample:
        return int(scores.argmax())
    if warp:
        scores = text_logits_processors(True, cfg.temperature, cfg.top_p, cfg.top_k)(
            torch.empty(1, 0, dtype=torch.long), scores[None])[0]
    return int(torch.multinomial(scores.softmax(-1), 1, generator=decoder.generator))


def choose_token(decoder: DuplexDecoder, logits: torch.Tensor, generated: list, listen_bias: float = 0.0) -> int:
    """One token of a unit by the official rule (module docstring); `listen_bias` is added to <|listen|> first."""
    cfg, tok = decoder.controls, decoder.tokens
    scores = logits.float().clone()
    if listen_bias:
        scores[tok.listen] += listen_bias
    # 1. One draw from the raw distribution (no temperature) may end the unit.
    raw = draw(decoder, scores, warp=False)
    if raw == tok.chunk_eos:
        return raw
    # 2. Forbidden ids (<|chunk_eos|> among them) can no longer be drawn.
    scores[decoder.forbidden_ids.to(scores.device)] = float("-inf")
    # 3. Repetition penalty over the recent window: a plain divide, whatever the sign (official).
    recent = sorted(set(generated[-cfg.repetition_window:]))
    if recent and cfg.repetition_penalty != 1.0:
        scores[recent] = scores[recent] / cfg.repetition_penalty
    # 4. Length penalty on <|turn_eos|>: divide a positive logit, multiply a negative one.
    eos = scores[tok.turn_eos]
    scores[tok.turn_eos] = eos / cfg.length_penalty if eos > 0 else eos * cfg.length_penalty
    # 5. Temperature, top-k, top-p and the draw.
    return draw(decoder, scores, warp=True)


def choose_decision(decoder: DuplexDecoder, logits: torch.Tensor) -> int:
    """Opt-in (`restrict_decision`): the unit's first token is <|listen|> or <|speak|>, nothing else."""
    cfg, tok = decoder.controls, decoder.tokens
    scores = torch.full_like(logits, float("-inf"), dtype=torch.float32)
    scores[tok.listen] = logits[tok.listen].float() + cfg.listen_bias
    scores[tok.speak] = logits[tok.speak].float()
    return draw(decoder, scores, warp=True)


class UnitDecoding:
    """The decoding of one unit after its first token, one fed token at a time (the session and the batched engine
    run the same rule): feed `to_feed`, hand its hidden state and logits to `advance`, until `to_feed` is None."""

    def __init__(self, decoder: DuplexDecoder, first: int, history: list, budget: int):
        self.decoder, self.history, self.budget = decoder, history, budget
        self.generated, self.text_ids, self.text_hidden = [first], [], []
        self.end_of_turn = False
        self.to_feed = None if first in decoder.tokens.unit_terminators else first

    def advance(self, hidden: torch.Tensor, logits: torch.Tensor) -> None:
        """`to_feed` was fed: record it (the first token is fed but is neither text nor speech condition, official:
        hidden states j >= 1) and choose the next id; a terminator ends the unit."""
        tok, fed = self.decoder.tokens, self.to_feed
        if len(self.generated) > 1:
            self.text_ids.append(fed)
            self.text_hidden.append(hidden)
        self.end_of_turn = fed == tok.turn_eos
        if self.end_of_turn or len(self.generated) >= self.budget - 1:
            token = tok.chunk_eos
        else:
            token = choose_token(self.decoder, logits, self.history + self.generated)
            if token == tok.listen:  # the turn is open inside a speaking unit (official rule)
                token = tok.tts_bos
        self.generated.append(token)
        self.to_feed = None if token in tok.unit_terminators else token

    def result(self) -> DecodedUnit:
        return DecodedUnit(self.generated, self.text_ids, self.text_hidden, self.end_of_turn)


class MiniCPMODuplexMixin:
    """The duplex unit math on the model, and `duplex_session(...)` / `generate_duplex(...)` entry points."""

    # ------------------------------------------------------------------------------------------ entry points
    def duplex_session(self, processor, system_prompt: str | None = None, ref_audio=None, config=None, **controls):
        """Open a push-style full-duplex session on this model.

        Args:
            processor: the MiniCPMOProcessor of this checkpoint (prepares each unit's inputs).
            system_prompt: the system text (default: the official "Streaming Omni Conversation.").
            ref_audio: optional 16 kHz reference voice: sits in the system turn and is the voice spoken with.
            config: a `minicpmo.DuplexConfig`; `**controls` override single fields of it.

        Returns:
            A `minicpmo.DuplexSession`: `step(audio_1s, frame=None) -> DuplexOutput`, `reset()`, `close()`.
        """
        from ..duplex.duplex_session import DuplexSession  # the session floor sits above modeling

        return DuplexSession(self, processor, system_prompt=system_prompt, ref_audio=ref_audio, config=config,
                             **controls)

    def generate_duplex(self, chunks, processor, system_prompt: str | None = None, ref_audio=None, config=None,
                        **controls):
        """Run a whole stream through one duplex session.

        Args:
            chunks: iterable of units: 1 s of 16 kHz audio, an (audio, frame) pair or a dict with "audio"/"frame".
            processor, system_prompt, ref_audio, config, **controls: as for `duplex_session`.

        Returns:
            A generator of one `DuplexOutput` per chunk; the session is closed when it ends.
        """
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

    # ------------------------------------------------------------------------------------------- unit math
    def duplex_new_context(self, record: bool = False) -> DuplexLLMContext:
        """An empty LLM context (KV cache) for a new session."""
        return DuplexLLMContext(cache=DynamicCache(config=self.config), sequence_ids=[] if record else None,
                                fed_embeds=[] if record else None, decision_logits=[] if record else None)

    @staticmethod
    def duplex_new_audio_state() -> DuplexAudioEncoderState:
        return DuplexAudioEncoderState()

    @staticmethod
    def duplex_decoder(tokens, controls, forbidden_ids: torch.Tensor) -> DuplexDecoder:
        """The decoding context of a session (layout tokens, its DuplexConfig, forbidden ids; RNG set on reset)."""
        return DuplexDecoder(tokens=tokens, controls=controls, forbidden_ids=forbidden_ids)

    def duplex_feed(self, context: DuplexLLMContext, input_ids=None, inputs_embeds=None, logits: bool = True):
        """Run new positions on the cache; returns (last hidden state [H], logits [V], or None with `logits=False`:
        the system prefill and a unit's closing forward only extend the cache, so their vocabulary head is skipped)."""
        if context.fed_embeds is not None:
            fed = inputs_embeds if inputs_embeds is not None else self.model.get_input_embeddings()(input_ids)
            context.fed_embeds.append(fed[0].detach().cpu())
        length = (input_ids if input_ids is not None else inputs_embeds).shape[1]
        positions = torch.arange(context.next_position, context.next_position + length, device=self.device)
        out = self.model.language_model(input_ids=input_ids, inputs_embeds=inputs_embeds, cache=context.cache,
                                        position_ids=positions.unsqueeze(0), use_cache=True)
        context.next_position += length
        hidden = out.last_hidden_state[0, -1]
        return hidden, (self.lm_head(hidden) if logits else None)

    @torch.no_grad()
    def duplex_prefill_system(self, context: DuplexLLMContext, inputs) -> None:
        """Feed the processor's `duplex_prefix` (system turn, reference voice in its audio slots) into the context."""
        core = self.model
        input_ids = inputs["input_ids"].to(self.device)
        embeds = core.get_input_embeddings()(input_ids)
        if "input_features" in inputs:
            ref_features = core.get_audio_features(inputs["input_features"].to(self.device),
                                                   inputs["input_features_mask"].to(self.device)).pooler_output
            embeds = scatter_into_slots(embeds, core.audio_slot_mask(input_ids), ref_features, "audio")
        context.system_length = input_ids.shape[1]
        if context.sequence_ids is not None:
            context.sequence_ids.extend(input_ids[0].tolist())
        self.duplex_feed(context, inputs_embeds=embeds, logits=False)

    @torch.no_grad()
    def duplex_image_features(self, units: list) -> list:
        """The frames of several units (processor `duplex_unit` inputs) through the vision tower, one call per slice
        size: [image features [slices, query_num, H], or None for a unit without a frame]."""
        groups: dict = {}
        for index, inputs in enumerate(units):
            if "pixel_values" in inputs:
                groups.setdefault(tuple(inputs["pixel_values"].shape[1:]), []).append(index)
        features = [None] * len(units)
        for indices in groups.values():
            pixel_values = torch.cat([units[i]["pixel_values"] for i in indices]).to(self.device)
            tgt_sizes = torch.cat([units[i]["tgt_sizes"] for i in indices]).to(self.device)
            pooled = self.model.get_image_features(pixel_values, tgt_sizes).pooler_output
            counts = [units[i]["pixel_values"].shape[0] for i in indices]
            for index, part in zip(indices, pooled.split(counts)):
                features[index] = part
        return features

    @torch.no_grad()
    def duplex_embed_unit(self, inputs, audio_state: DuplexAudioEncoderState, image_features=None) -> tuple:
        """The processor's `duplex_unit` inputs -> (embeddings [1, L, H], new audio state, vision / audio seconds);
        `image_features` from `duplex_image_features` when the frame already went through the vision tower."""
        core = self.model
        timings = {}
        started = time.perf_counter()
        if image_features is None and "pixel_values" in inputs:
            image_features = self.duplex_image_features([inputs])[0]
        timings["vision"] = time.perf_counter() - started
        started = time.perf_counter()
        audio_features, audio_state = encode_unit(core.apm, core.audio_projection_layer, self._unit_mel(inputs),
                                                  audio_state, pool_step=self.config.audio_pool_step)
        timings["audio"] = time.perf_counter() - started
        return self._unit_embeddings(inputs, audio_features, image_features), audio_state, timings

    @torch.no_grad()
    def duplex_embed_units(self, units: list, audio_states: list, image_features: list) -> tuple:
        """Several sessions' units (their `duplex_unit` inputs, audio states and `duplex_image_features`) with all
        their audio through the streaming encoder in one call: ([embeddings [1, L, H]], [new audio states])."""
        core = self.model
        audio_features, audio_states = encode_units(core.apm, core.audio_projection_layer,
                                                    [self._unit_mel(inputs) for inputs in units], audio_states,
                                                    pool_step=self.config.audio_pool_step)
        embeds = [self._unit_embeddings(inputs, audio, image)
                  for inputs, audio, image in zip(units, audio_features, image_features)]
        return embeds, audio_states

    def _unit_mel(self, inputs) -> torch.Tensor:
        return inputs["input_features"].to(device=self.device, dtype=self.model.apm.conv1.weight.dtype)

    def _unit_embeddings(self, inputs, audio_features: torch.Tensor, image_features) -> torch.Tensor:
        core = self.model
        input_ids = inputs["input_ids"].to(self.device)
        embeds = core.get_input_embeddings()(input_ids)
        if image_features is not None:
            embeds = scatter_into_slots(embeds, core.image_slot_mask(input_ids), image_features.flatten(0, 1), "image")
        return scatter_into_slots(embeds, core.audio_slot_mask(input_ids), audio_features, "audio")

    @torch.no_grad()
    def duplex_decide(self, decoder: DuplexDecoder, logits: torch.Tensor, history: list, unit_index: int) -> int:
        """A unit's first token: forced listen for the first units, else the official rule (or the opt-in choice)."""
        cfg = decoder.controls
        if unit_index < cfg.force_listen_count:
            return decoder.tokens.listen
        if cfg.restrict_decision:
            return choose_decision(decoder, logits)
        return choose_token(decoder, logits, history, listen_bias=cfg.listen_bias)

    @torch.no_grad()
    def duplex_decode_unit(self, context: DuplexLLMContext, decoder: DuplexDecoder, first: int, history: list,
                           budget: int) -> DecodedUnit:
        """Decode the rest of a unit after its first token; `budget` caps the ids the unit may generate."""
        run = UnitDecoding(decoder, first, history, budget)
        while run.to_feed is not None:
            hidden, logits = self.duplex_feed(context, input_ids=torch.tensor([[run.to_feed]], device=self.device))
            run.advance(hidden, logits)
        return run.result()

    @torch.no_grad()
    def duplex_close_unit(self, context: DuplexLLMContext, decoded: DecodedUnit, unit_start: int, tokens) -> None:
        """Feed the unit's terminator and `</unit>`, and record where the unit sits in the cache."""
        closing = [decoded.generated[-1], tokens.unit_end]
        self.duplex_feed(context, input_ids=torch.tensor([closing], device=self.device), logits=False)
        if context.sequence_ids is not None:
            context.sequence_ids.extend(decoded.generated[:-1] + closing)
        context.unit_spans.append([unit_start, context.next_position - unit_start])

    def duplex_new_speech_streams(self, voice, seed: int | None, n_timesteps: int) -> tuple:
        """Fresh (speech decoder, token2wav) stream states for a new spoken turn."""
        return self.tts.new_stream_state(seed), self.token2wav.start_stream(voice, n_timesteps=n_timesteps)

    @torch.no_grad()
    def duplex_speak(self, decoded: DecodedUnit, tts_state, wav_state, tokens, turn_start: bool,
                     do_sample: bool, seed: int | None) -> tuple:
        """A speaking unit's text -> 25 speech codes -> 24 kHz audio; returns (audio, tts_state, wav_state, timings)."""
        started = time.perf_counter()
        spoken = [(t, h) for t, h in zip(decoded.text_ids, decoded.text_hidden) if t != tokens.turn_eos]
        ids = torch.tensor([t for t, _ in spoken], dtype=torch.long, device=self.device)
        hidden = (torch.stack([h for _, h in spoken]) if spoken
                  else torch.zeros(0, self.config.hidden_size, device=self.device))
        sampling = SpeechSamplingConfig.for_duplex(do_sample=do_sample, seed=seed)
        codes, tts_state = self.tts.generate_unit_codes(ids, hidden, tts_state, turn_start=turn_start,
                                                        unit_has_turn_eos=decoded.end_of_turn, sampling=sampling)
        timings = {"speech_codes": time.perf_counter() - started}
        started = time.perf_counter()
        wav, wav_state = self.token2wav.push(codes, wav_state, end_of_turn=decoded.end_of_turn)
        timings["token2wav"] = time.perf_counter() - started
        return wav.detach().float().cpu().numpy(), tts_state, wav_state, timings

    def duplex_slide_window(self, context: DuplexLLMContext, high_tokens: int, low_tokens: int) -> None:
        """Drop the oldest whole units (the system prompt stays) once the cache passes the high watermark."""
        if context.next_position <= high_tokens:
            return
        drop = 0
        while context.unit_spans and context.next_position - drop > low_tokens and len(context.unit_spans) > 1:
            drop += context.unit_spans.pop(0)[1]
        if drop:
            drop_cache_span(context.cache, context.system_length, drop, self.model.language_model.rotary_emb.inv_freq)
            context.next_position -= drop
            start = context.system_length
            for span in context.unit_spans:
                span[0] = start
                start += span[1]
            if context.sequence_ids is not None:
                del context.sequence_ids[context.system_length:context.system_length + drop]


__all__ = ["DecodedUnit", "DuplexDecoder", "DuplexLLMContext", "MiniCPMODuplexMixin", "UnitDecoding",
           "choose_decision", "choose_token", "draw"]
