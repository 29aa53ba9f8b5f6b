"""A full-duplex session: one 1-s unit at a time, perception and response on one time axis (official §8).

`duplex_step(model, runtime, state, audio, frame)` advances a session by one unit in four seams: the processor
prepares the unit (`processor.duplex_unit`), the model prefills and decides (`duplex_embed_unit`, `duplex_feed`,
`duplex_decide`), decodes (`duplex_decode_unit`, `duplex_close_unit`) and speaks (`duplex_speak`); this module keeps
the session's clock: turns, barge-in and the TAIL speaking budget. `DuplexSession` is the push-style wrapper
(`step` / `reset` / `close`) a server drives.

State rule: the streaming mel, audio encoder, speech decoder and token2wav states are frozen and replaced after each
unit; `state.llm` holds the KV cache and is mutated in place, so a `DuplexState` belongs to one session.
This module imports neither processing nor modeling: it drives the model and processor it is given.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace

import numpy as np
import torch

from ..audio_utils import OUTPUT_SAMPLE_RATE
from ..errors import DuplexError
from .duplex_config import DuplexConfig, DuplexOutput

STAGES = ("vision", "audio", "prefill", "decode", "speech_codes", "token2wav")


class DuplexSessionClosedError(DuplexError, RuntimeError):
    """`step` on a session that was closed."""


@dataclass
class DuplexState:
    """Everything carried from one unit to the next."""

    llm: object  # DuplexLLMContext: KV cache, positions, unit spans (mutated in place)
    mel_state: object  # StreamingMelState (frozen)
    audio_state: object  # DuplexAudioEncoderState (frozen)
    tts_state: object | None
    wav_state: object | None
    generated: list  # recent generated token ids (repetition penalty window)
    unit_index: int = 0
    in_turn: bool = False
    turn_start_time_s: float = 0.0
    speech_emitted_s: float = 0.0

    @property
    def sequence_ids(self) -> list | None:
        """The full token layout so far (only when recording)."""
        return self.llm.sequence_ids


@dataclass
class DuplexRuntime:
    """Per-session constants: processor, decoder (tokens, controls, forbidden ids, RNG), voice."""

    processor: object
    decoder: object  # DuplexDecoder
    config: DuplexConfig
    voice: object | None
    record: bool = False

    @property
    def tokens(self):
        return self.decoder.tokens

    @property
    def forbidden_ids(self) -> torch.Tensor:
        return self.decoder.forbidden_ids


def new_duplex_state(model, runtime: DuplexRuntime, system_prompt: str, ref_audio=None) -> DuplexState:
    """Prefill the system prompt (with the reference voice as audio, official layout) into a fresh cache."""
    llm = model.duplex_new_context(record=runtime.record)
    model.duplex_prefill_system(llm, runtime.processor.duplex_prefix(system_prompt, ref_audio))
    state = DuplexState(llm=llm, mel_state=runtime.processor.duplex_mel.initial_state(),
                        audio_state=model.duplex_new_audio_state(), tts_state=None, wav_state=None, generated=[])
    _new_speech_streams(model, runtime, state)
    return state


def speak_budget(config: DuplexConfig, state: DuplexState, now_s: float) -> int:
    """TAIL playback clock: when queued speech runs ahead of the interaction clock, say less this unit."""
    cap = config.max_speak_tokens_per_unit
    lag = state.speech_emitted_s - (now_s - state.turn_start_time_s) if state.in_turn else 0.0
    if lag > 2 * config.max_speech_lag_s:
        return 2  # <|speak|> + <|chunk_eos|>: keep the turn open, add no text
    if lag > config.max_speech_lag_s:
        return max(2, cap // 2)
    return cap


@torch.no_grad()
def duplex_step(model, runtime: DuplexRuntime, state: DuplexState, audio, frame=None) -> DuplexOutput:
    """Advance the session by one unit (1 s of 16 kHz mono audio, optional frame)."""
    timings = dict.fromkeys(STAGES, 0.0)
    inputs, unit_index = begin_unit(runtime, state, audio, frame, timings)
    if inputs is None:
        return waiting_output(unit_index, timings)
    decoded = _prefill_and_decode(model, runtime, state, inputs, unit_index, unit_index * 1.0, timings)
    return finish_unit(model, runtime, state, decoded, unit_index, timings)


def begin_unit(runtime: DuplexRuntime, state: DuplexState, audio, frame, timings: dict) -> tuple:
    """Prepare the unit's inputs and advance the clock: (inputs, or None while too little audio came, unit index)."""
    unit_index = state.unit_index
    inputs, mel_state = runtime.processor.duplex_unit(audio, frame, state.mel_state, timings)  # typed errors first
    state.mel_state, state.unit_index = mel_state, unit_index + 1
    return inputs, unit_index


def waiting_output(unit_index: int, timings: dict) -> DuplexOutput:
    """The output of a step that got too little audio for a unit yet: a listen, nothing said."""
    return DuplexOutput(True, "", None, False, unit_index * 1.0, timings, unit_index=unit_index)


def finish_unit(model, runtime: DuplexRuntime, state: DuplexState, decoded, unit_index: int,
                timings: dict) -> DuplexOutput:
    """After the LLM decoded and closed the unit: speak, end the turn (barge-in included), slide the window."""
    time_s = unit_index * 1.0  # one unit per second of input
    state.generated = (state.generated + decoded.generated)[-runtime.config.repetition_window:]
    is_listen = decoded.first == runtime.tokens.listen
    interrupted = is_listen and state.in_turn  # barge-in: the model yields the floor, queued speech is dropped
    end_of_turn = decoded.end_of_turn or interrupted
    audio_out = None if is_listen else _speak(model, runtime, state, decoded, time_s, timings)
    if end_of_turn:
        _end_turn(model, runtime, state)
    model.duplex_slide_window(state.llm, runtime.config.window_high_tokens, runtime.config.window_low_tokens)
    text = runtime.processor.tokenizer.decode(decoded.text_ids, skip_special_tokens=True)
    return DuplexOutput(is_listen, text, audio_out, end_of_turn, time_s, timings, interrupted, decoded.generated,
                        unit_index)


def _prefill_and_decode(model, runtime: DuplexRuntime, state: DuplexState, inputs, unit_index: int, time_s: float,
                        timings: dict):
    """Embed and prefill the unit, decide its first token, decode the rest and close it."""
    embeds, state.audio_state, embed_timings = model.duplex_embed_unit(inputs, state.audio_state)
    timings["vision"] += embed_timings["vision"]
    timings["audio"] += embed_timings["audio"]
    unit_start = state.llm.next_position
    started = time.perf_counter()
    _, logits = model.duplex_feed(state.llm, inputs_embeds=embeds)
    timings["prefill"] = time.perf_counter() - started
    if state.llm.sequence_ids is not None:
        state.llm.sequence_ids.extend(inputs["input_ids"][0].tolist())
        state.llm.decision_logits.append(logits.detach().cpu())

    started = time.perf_counter()
    first = model.duplex_decide(runtime.decoder, logits, state.generated, unit_index)
    decoded = model.duplex_decode_unit(state.llm, runtime.decoder, first, state.generated,
                                       speak_budget(runtime.config, state, time_s))
    model.duplex_close_unit(state.llm, decoded, unit_start, runtime.tokens)
    timings["decode"] = time.perf_counter() - started
    return decoded


def _speak(model, runtime: DuplexRuntime, state: DuplexState, decoded, time_s: float, timings: dict):
    """Open the turn if needed and, with a voice, turn the unit's text into its 1 s of speech."""
    turn_start = not state.in_turn
    if turn_start:
        state.in_turn, state.turn_start_time_s, state.speech_emitted_s = True, time_s, 0.0
    if not (runtime.config.generate_audio and runtime.voice is not None):
        return None
    audio, state.tts_state, state.wav_state, speech_timings = model.duplex_speak(
        decoded, state.tts_state, state.wav_state, runtime.tokens, turn_start,
        do_sample=runtime.config.do_sample, seed=runtime.config.seed)
    timings.update(speech_timings)
    state.speech_emitted_s += audio.shape[0] / OUTPUT_SAMPLE_RATE
    return audio


def _end_turn(model, runtime: DuplexRuntime, state: DuplexState) -> None:
    state.in_turn = False
    _new_speech_streams(model, runtime, state)


def _new_speech_streams(model, runtime: DuplexRuntime, state: DuplexState) -> None:
    if runtime.voice is not None:
        state.tts_state, state.wav_state = model.duplex_new_speech_streams(
            runtime.voice, runtime.config.seed, runtime.config.n_timesteps)


class DuplexSession:
    """Push-style duplex session: `step(audio_1s, frame=None) -> DuplexOutput`, `reset()`, `close()`.

    Args:
        model: a MiniCPMOForConditionalGeneration (any size).
        processor: its MiniCPMOProcessor.
        system_prompt: the system text (None: the official "Streaming Omni Conversation.").
        ref_audio: optional 16 kHz reference voice (system turn + the voice spoken with).
        config: a DuplexConfig; `**controls` override single fields.
        record: keep the full token layout, every fed embedding and each unit's decision logits on the state.
    """

    def __init__(self, model, processor, system_prompt: str | None = None, ref_audio=None,
                 config: DuplexConfig | None = None, record: bool = False, **controls):
        self.model = model
        self.config = replace(config or DuplexConfig(), **controls)
        self.system_prompt = processor.duplex_default_system_prompt if system_prompt is None else system_prompt
        self.ref_audio = None if ref_audio is None else np.asarray(ref_audio, dtype=np.float32)
        voice = None
        if self.config.generate_audio and getattr(model, "tts", None) is not None and self.ref_audio is not None:
            voice = model.prepare_voice(self.ref_audio)
        forbidden = torch.tensor(processor.duplex_forbidden_ids(), dtype=torch.long, device=model.device)
        decoder = model.duplex_decoder(processor.duplex_tokens, self.config, forbidden)
        self.runtime = DuplexRuntime(processor=processor, decoder=decoder, config=self.config, voice=voice,
                                     record=record)
        self.closed = False
        self.reset()

    def reset(self) -> None:
        """Start over: fresh caches, system prompt prefilled again, RNG re-seeded."""
        if self.config.seed is not None:
            self.runtime.decoder.generator = torch.Generator(device=self.model.device).manual_seed(self.config.seed)
        self.state = new_duplex_state(self.model, self.runtime, self.system_prompt, self.ref_audio)

    def step(self, audio, frame=None) -> DuplexOutput:
        """One unit: 1 s of 16 kHz mono audio (+ an optional video frame) -> DuplexOutput."""
        if self.closed:
            raise DuplexSessionClosedError("this duplex session is closed")
        return duplex_step(self.model, self.runtime, self.state, audio, frame)

    def close(self) -> None:
        """Release the caches (the object cannot be stepped afterwards)."""
        self.closed = True
        self.state = None


__all__ = ["STAGES", "DuplexRuntime", "DuplexSession", "DuplexSessionClosedError", "DuplexState", "begin_unit",
           "duplex_step", "finish_unit", "speak_budget", "waiting_output"]
