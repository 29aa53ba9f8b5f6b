"""Duplex-mode audio encoding: one 1-s unit of streaming mel -> 50 Whisper frames -> 10 LLM embeddings.

The official duplex loop sends each unit's mel with 2 redundant frames on each side (no left ones on the first
unit: 102 frames, then 104; see streaming_mel_minicpmo.py), runs conv1/conv2 over the whole chunk and then drops
(prefix + 1) // 2 and (suffix + 1) // 2 conv outputs, prefix 0 on the first unit and 2 afterwards, suffix 2. What is
left are exactly the 50 conv outputs centred on the 100 core mel frames, each computed from real neighbouring mel
frames instead of zero padding, so a stream of units reproduces the offline conv over the whole audio.

How it is done here: `MiniCPMOAudioEncoder.step` already has that mechanism (`state.mel_tail` = left conv context,
`lookahead_features` = right context, outputs centred on the context dropped). `encode_unit` passes the unit's own
leading redundancy frames as `mel_tail` (not the tail the previous step kept: the re-emitted frames can differ once
the mel's dynamic floor moves, and the official conv reads the re-emitted ones) and its trailing redundancy frames as
the lookahead. That yields the same 50 conv outputs as the official crop: the only frame step leaves out (the last
redundancy frame) feeds nothing but the cropped conv output.

Attention: a unit attends to the whole Whisper KV cache plus itself, unmasked, so with no reset the stream equals
the offline block-causal (1-s chunk) encoding of the same mel. The cache resets to empty before a unit whose
pre-crop frame count ((frames - 1) // 2 + 1 = 51 or 52) would bring it to `max_source_positions` (1500 = 30 s), the
official rule; with 1500 positions that is every 29 units. Positions restart at 0 after a reset, the conv context
does not (it is audio, not attention state).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import torch

from .modeling_audio import (
    AudioEncoderStreamState,
    AudioStreamError,
    MiniCPMOAudioEncoder,
    MiniCPMOAudioProjector,
)
from ..audio_utils import (  # noqa: F401 (re-exported)
    UNIT_CORE_MEL_FRAMES,
    UNIT_ENCODER_FRAMES,
    UNIT_REDUNDANCY_MEL_FRAMES,
    needs_cache_reset,
)
from ..audio_utils import expected_unit_mel_frames as _unit_mel_frames


@dataclass(frozen=True)
class DuplexAudioEncoderState:
    """Stream state of the duplex audio encoder; never mutated (encode_unit returns a new one).

    encoder_state: the Whisper KV cache, its length (= next position) and conv context.
    units_encoded: units seen since the stream began (0 -> the next unit is the first: no left redundancy).
    cache_resets: how many times the Whisper cache was emptied (the 30-s reset).
    """

    encoder_state: AudioEncoderStreamState = field(default_factory=AudioEncoderStreamState)
    units_encoded: int = 0
    cache_resets: int = 0

    @property
    def is_first_unit(self) -> bool:
        return self.units_encoded == 0

    def reset(self) -> DuplexAudioEncoderState:
        """A new, empty stream state: empty cache, positions from 0, next unit treated as the first one."""
        return DuplexAudioEncoderState()


def expected_unit_mel_frames(state: DuplexAudioEncoderState) -> int:
    """Mel frames of the next unit for this stream state (see `audio_utils.expected_unit_mel_frames`)."""
    return _unit_mel_frames(state.is_first_unit)


def encode_unit(
    encoder: MiniCPMOAudioEncoder,
    projector: MiniCPMOAudioProjector,
    mel_chunk: torch.Tensor,
    state: DuplexAudioEncoderState | None = None,
    pool_step: int = 5,
) -> tuple[torch.Tensor, DuplexAudioEncoderState]:
    """Encode one duplex unit: mel_chunk [1, n_mels, 102 (first unit) or 104] -> (embeddings [10, llm_hidden], state).

    Runs under the caller's grad mode (wrap in torch.no_grad() for inference). Raises AudioStreamError when the
    chunk is not one duplex unit for this state (batch > 1, wrong frame count) and AudioInputError for wrong mel bins.
    """
    state = DuplexAudioEncoderState() if state is None else state
    core, encoder_state, lookahead, reset = _unit_step_inputs(encoder, mel_chunk, state)
    hidden, encoder_state = encoder.step(core, encoder_state, lookahead_features=lookahead)
    return projector.project_and_pool(hidden, pool_step)[0], _next_state(state, encoder_state, reset)


def encode_units(
    encoder: MiniCPMOAudioEncoder,
    projector: MiniCPMOAudioProjector,
    mel_chunks: list[torch.Tensor],
    states: list[DuplexAudioEncoderState | None],
    pool_step: int = 5,
) -> tuple[list[torch.Tensor], list[DuplexAudioEncoderState]]:
    """`encode_unit` for several sessions in one encoder pass (`MiniCPMOAudioEncoder.step_batch`: each session's own
    conv context and KV cache, caches of different lengths masked): ([10, llm_hidden] per session, new states)."""
    states = [DuplexAudioEncoderState() if state is None else state for state in states]
    if len(mel_chunks) != len(states):
        raise AudioStreamError(f"{len(mel_chunks)} mel chunks for {len(states)} stream states")
    prepared = [_unit_step_inputs(encoder, chunk, state) for chunk, state in zip(mel_chunks, states)]
    hidden, encoder_states = encoder.step_batch([core for core, _, _, _ in prepared],
                                                [encoder_state for _, encoder_state, _, _ in prepared],
                                                [lookahead for _, _, lookahead, _ in prepared])
    pooled = projector.project_and_pool(torch.cat(hidden), pool_step)
    return list(pooled), [_next_state(state, encoder_state, reset)
                          for state, encoder_state, (_, _, _, reset) in zip(states, encoder_states, prepared)]


def _unit_step_inputs(encoder: MiniCPMOAudioEncoder, mel_chunk: torch.Tensor, state: DuplexAudioEncoderState):
    """Check one unit's mel against its stream state and split it for `encoder.step`: (core frames, encoder state
    with the 30-s reset applied and the unit's own left redundancy as conv context, lookahead frames, reset?)."""
    if mel_chunk.ndim != 3 or mel_chunk.shape[0] != 1:
        raise AudioStreamError(f"a duplex unit is one mel chunk [1, mel_bins, frames], got {tuple(mel_chunk.shape)}")
    expected = expected_unit_mel_frames(state)
    if mel_chunk.shape[-1] != expected:
        which = "the first unit" if state.is_first_unit else "a unit after the first"
        raise AudioStreamError(
            f"{which} needs {expected} mel frames ({UNIT_CORE_MEL_FRAMES} core + {UNIT_REDUNDANCY_MEL_FRAMES} "
            f"redundancy per side, none on the left of the first unit), got {mel_chunk.shape[-1]}; use "
            "StreamingMelProcessor with cnn_redundancy_ms=20"
        )
    encoder_state = state.encoder_state
    reset = needs_cache_reset(encoder_state.cached_frames, expected, encoder.max_source_positions)
    if reset:
        encoder_state = dataclasses.replace(encoder_state, key_values=(), cached_frames=0)
    prefix = 0 if state.is_first_unit else UNIT_REDUNDANCY_MEL_FRAMES
    encoder_state = dataclasses.replace(encoder_state, mel_tail=mel_chunk[..., :prefix] if prefix else None)
    core = mel_chunk[..., prefix : prefix + UNIT_CORE_MEL_FRAMES]
    lookahead = mel_chunk[..., prefix + UNIT_CORE_MEL_FRAMES :]
    return core, encoder_state, lookahead, reset


def _next_state(state: DuplexAudioEncoderState, encoder_state: AudioEncoderStreamState,
                reset: bool) -> DuplexAudioEncoderState:
    return DuplexAudioEncoderState(encoder_state=encoder_state, units_encoded=state.units_encoded + 1,
                                   cache_resets=state.cache_resets + int(reset))
