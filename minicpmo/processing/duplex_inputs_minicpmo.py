"""The processor's duplex inputs (the Voxtral-realtime split: the processor prepares each chunk, the model computes).

`duplex_prefix(system_prompt, ref_audio)` is the system turn that opens a session (official §8), with the reference
voice's features when one is given. `duplex_unit(audio, frame, mel_state)` turns one 1-s chunk into the unit's input
ids, its streaming mel chunk and the frame's pixels, and returns the next mel state: a pure step, the state is an
explicit frozen object the caller keeps. The waveform is checked here, where it enters, and nowhere after.
"""

from __future__ import annotations

import time
from typing import Any

import torch
from transformers.feature_extraction_utils import BatchFeature

from ..audio_utils import UNIT_CORE_MEL_FRAMES, frames_to_token_count, validate_waveform
from .duplex_layout_minicpmo import DEFAULT_DUPLEX_SYSTEM_TEXT, DuplexTokens, system_prefix_ids, unit_input_ids
from .streaming_mel_minicpmo import StreamingMelProcessor, StreamingMelState
from .tokenization_minicpmo import load_bad_token_ids


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


class DuplexInputsMixin:
    """`duplex_prefix`, `duplex_unit`, `duplex_tokens` and `duplex_forbidden_ids` on MiniCPMOProcessor."""

    @property
    def duplex_tokens(self) -> DuplexTokens:
        """The layout token ids, read from (and checked against) this processor's tokenizer."""
        cached = self.__dict__.get("_duplex_tokens")
        if cached is None:
            cached = self.__dict__["_duplex_tokens"] = DuplexTokens.from_tokenizer(self.tokenizer)
        return cached

    @property
    def duplex_mel(self) -> StreamingMelProcessor:
        """The exact streaming log-mel front end of duplex mode (stateless: its state travels with the caller)."""
        cached = self.__dict__.get("_duplex_mel")
        if cached is None:
            cached = self.__dict__["_duplex_mel"] = StreamingMelProcessor()
        return cached

    duplex_default_system_prompt = DEFAULT_DUPLEX_SYSTEM_TEXT

    def duplex_forbidden_ids(self) -> list[int]:
        """Ids duplex decoding never emits (see `decoding_forbidden_ids`)."""
        return decoding_forbidden_ids(self.tokenizer, self.duplex_tokens)

    def duplex_prefix(self, system_prompt: str = DEFAULT_DUPLEX_SYSTEM_TEXT, ref_audio: Any = None) -> BatchFeature:
        """The system turn that opens a duplex session.

        Args:
            system_prompt: the system text (official default "Streaming Omni Conversation.").
            ref_audio: optional 16 kHz mono reference voice; its audio slots sit inside the system turn.

        Returns:
            BatchFeature with `input_ids` [1, L] and, with a reference voice, `input_features` / `input_features_mask`
            of the offline feature extractor (one row per 30-s piece).
        """
        data: dict[str, Any] = {}
        n_slots = 0
        if ref_audio is not None:
            waveform = validate_waveform(ref_audio, name="ref_audio")
            features = self.feature_extractor([waveform], return_tensors="pt")
            data["input_features"] = features["input_features"]
            data["input_features_mask"] = features["input_features_mask"]
            n_slots = self.feature_extractor.token_count(waveform.shape[0])
        ids = system_prefix_ids(self.tokenizer, system_prompt, n_ref_audio_slots=n_slots, tokens=self.duplex_tokens)
        data["input_ids"] = torch.tensor([ids], dtype=torch.long)
        return BatchFeature(data=data)

    def duplex_unit(
        self, audio: Any, frame: Any = None, mel_state: StreamingMelState | None = None, timings: dict | None = None
    ) -> tuple[BatchFeature | None, StreamingMelState]:
        """One 1-s unit of a live session: audio (+ optional video frame) -> model inputs and the next mel state.

        Args:
            audio: the unit's 16 kHz mono samples (1 s in a live session; any length is buffered).
            frame: optional video frame (PIL image, array or path), encoded as one 448-class thumbnail.
            mel_state: the streaming mel state returned by the previous call (None: a new stream).
            timings: optional dict; the seconds spent on the audio and on the frame are added to its "audio" and
                "vision" entries (a live session reports its cost per stage).

        Returns:
            (inputs, mel_state). `inputs` is None while the buffer lacks the next unit; otherwise a BatchFeature with
            `input_ids` [1, L] (`<unit>` [+ 64 image slots] + 10 audio slots), `input_features` [1, 80, 102 or 104]
            (the unit's mel with its conv redundancy frames) and, with a frame, `pixel_values` and `tgt_sizes`.
        """
        timings = {} if timings is None else timings
        started = time.perf_counter()
        samples = torch.from_numpy(validate_waveform(audio, name="unit audio"))
        mel_chunk, mel_state = self.duplex_mel.step(samples, mel_state, checked=True)
        timings["audio"] = timings.get("audio", 0.0) + time.perf_counter() - started
        if mel_chunk is None:
            return None, mel_state
        data: dict[str, Any] = {"input_features": mel_chunk}
        if frame is not None:
            started = time.perf_counter()
            pixels = self.frame_inputs(frame)
            data["pixel_values"], data["tgt_sizes"] = pixels["pixel_values"], pixels["tgt_sizes"]
            timings["vision"] = timings.get("vision", 0.0) + time.perf_counter() - started
        ids = unit_input_ids(
            self.duplex_tokens,
            has_frame=frame is not None,
            n_audio_slots=frames_to_token_count(UNIT_CORE_MEL_FRAMES, self.feature_extractor.audio_pool_step),
            image_slots=self.image_processor.image_feature_size,
        )
        data["input_ids"] = torch.tensor([ids], dtype=torch.long)
        return BatchFeature(data=data), mel_state


__all__ = ["DuplexInputsMixin", "decoding_forbidden_ids"]
