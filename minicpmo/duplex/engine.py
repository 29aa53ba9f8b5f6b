"""Many duplex sessions on one model, stepped together: one unit tick runs every active session's unit as a batch.

`DuplexEngine.step({session_id: (audio_1s, frame)})` does, for the sessions given: the processor's unit inputs
(each session's own streaming mel), all frames through the vision tower in one call, all sessions' audio through
the streaming encoder in one call (each over its own encoder cache: `MiniCPMOAudioEncoder.step_batch`), then one
batched LLM prefill over the sessions' KV caches, batched decode steps in which each session stops on its own (the
official per-token rule, `UnitDecoding`, per row), one batched closing forward, and each session's speech.
Sessions open and close between ticks; a session stepped here gives the outputs it gives stepped alone
(`DuplexSession.step`), with greedy decoding and with its own seed.

A session whose input is bad gets its typed error as its output; the others go on. The engine is not thread-safe:
one caller (a server's tick loop) drives it.
"""

from __future__ import annotations

import time

import torch

from ..errors import DuplexError, MiniCPMOError
from ..modeling.modeling_duplex import UnitDecoding
from ..modeling.modeling_duplex_batch import batched_feed, stack_contexts, unstack_contexts
from .duplex_session import STAGES, DuplexSession, begin_unit, finish_unit, speak_budget, waiting_output


class UnknownSessionError(DuplexError, KeyError):
    """A session id the engine does not hold (never opened, or closed)."""


class DuplicateSessionError(DuplexError, ValueError):
    """`open` with a session id that is already open."""


class DuplexEngine:
    """Holds the open sessions of one model and steps them in batches.

    Args:
        model: a MiniCPMOForConditionalGeneration.
        processor: its MiniCPMOProcessor.
    """

    def __init__(self, model, processor):
        self.model = model
        self.processor = processor
        self.sessions: dict = {}

    def open(self, session_id, system_prompt: str | None = None, ref_audio=None, config=None,
             **controls) -> DuplexSession:
        """Open a session (its system prompt is prefilled now, alone); it joins the next tick it gets input for."""
        if session_id in self.sessions:
            raise DuplicateSessionError(f"session {session_id!r} is already open")
        session = DuplexSession(self.model, self.processor, system_prompt=system_prompt, ref_audio=ref_audio,
                                config=config, **controls)
        self.sessions[session_id] = session
        return session

    def close(self, session_id) -> None:
        """Close a session and free its caches (between ticks)."""
        self._session(session_id).close()
        del self.sessions[session_id]

    def reset(self, session_id) -> None:
        self._session(session_id).reset()

    def _session(self, session_id) -> DuplexSession:
        try:
            return self.sessions[session_id]
        except KeyError:
            raise UnknownSessionError(f"no open session {session_id!r}") from None

    @torch.no_grad()
    def step(self, units: dict) -> dict:
        """One tick: `units` maps session ids to 1 s of 16 kHz audio or an (audio, frame) pair. Returns a dict of the
        same ids to each session's `DuplexOutput`, or the typed error its input raised."""
        results: dict = {}
        ready = []  # (session id, session, inputs, unit index, timings)
        for session_id, unit in units.items():
            audio, frame = unit if isinstance(unit, tuple) else (unit, None)
            timings = dict.fromkeys(STAGES, 0.0)
            try:
                session = self._session(session_id)
                if session.closed:
                    raise UnknownSessionError(f"session {session_id!r} is closed")
                inputs, unit_index = begin_unit(session.runtime, session.state, audio, frame, timings)
            except MiniCPMOError as error:  # every typed input error (audio, image, closed or unknown session)
                results[session_id] = error
                continue
            if inputs is None:
                results[session_id] = waiting_output(unit_index, timings)
            else:
                ready.append((session_id, session, inputs, unit_index, timings))
        if ready:
            for (session_id, session, _, unit_index, timings), decoded in zip(ready, self._decode(ready)):
                results[session_id] = finish_unit(self.model, session.runtime, session.state, decoded, unit_index,
                                                  timings)
        return {session_id: results[session_id] for session_id in units}

    def _decode(self, ready: list) -> list:
        """Perception, batched prefill, batched decode and closing for the ready sessions; returns their DecodedUnits."""
        model = self.model
        started = time.perf_counter()
        image_features = model.duplex_image_features([inputs for _, _, inputs, _, _ in ready])
        vision_s = (time.perf_counter() - started) / len(ready)
        started = time.perf_counter()
        sessions = [session for _, session, _, _, _ in ready]
        embeds, audio_states = model.duplex_embed_units([inputs for _, _, inputs, _, _ in ready],
                                                        [session.state.audio_state for session in sessions],
                                                        image_features)
        audio_s = (time.perf_counter() - started) / len(ready)
        for session, audio_state, (_, _, _, _, timings) in zip(sessions, audio_states, ready):
            session.state.audio_state = audio_state
            timings["vision"], timings["audio"] = vision_s, audio_s
        embeds = [row[0] for row in embeds]
        contexts = [session.state.llm for _, session, _, _, _ in ready]
        stacked = stack_contexts(contexts, model.config)
        unit_starts = list(stacked.next_positions)

        started = time.perf_counter()
        _, logits = batched_feed(model, stacked, embeds)
        prefill_s = time.perf_counter() - started
        started = time.perf_counter()
        runs = []
        for (_, session, _, unit_index, _), row_logits in zip(ready, logits):
            runtime, state = session.runtime, session.state
            first = model.duplex_decide(runtime.decoder, row_logits, state.generated, unit_index)
            runs.append(UnitDecoding(runtime.decoder, first, state.generated,
                                     speak_budget(runtime.config, state, unit_index * 1.0)))
        while any(run.to_feed is not None for run in runs):
            feed = [None if run.to_feed is None else torch.tensor([run.to_feed]) for run in runs]
            hidden, logits = batched_feed(model, stacked, feed)
            for run, fed, row_hidden, row_logits in zip(runs, feed, hidden, logits):
                if fed is not None:
                    run.advance(row_hidden, row_logits)
        closing = [torch.tensor([run.generated[-1], session.runtime.tokens.unit_end])
                   for run, (_, session, _, _, _) in zip(runs, ready)]
        batched_feed(model, stacked, closing, logits=False)
        unstack_contexts(stacked, contexts)
        for context, start in zip(contexts, unit_starts):
            context.unit_spans.append([start, context.next_position - start])
        decode_s = time.perf_counter() - started
        for _, _, _, _, timings in ready:
            timings["prefill"], timings["decode"] = prefill_s, decode_s
        return [run.result() for run in runs]


__all__ = ["DuplexEngine", "DuplicateSessionError", "UnknownSessionError"]
