"""Gradio layout and event wiring of the Space: Chat, Live (full duplex) and Replay tabs.

Per-user data lives in gr.State only (chat turns, the live session key); the model is shared and every model
call takes its lock. Named API endpoints for gradio_client: /chat (non-streaming twin of the chat tab) and
/replay. Streaming-input events (microphone, webcam) are browser-only.
"""

import functools
import inspect

import gradio as gr
import numpy as np

from minicpmo.voices import DEFAULT_VOICE

from .audio_io import to_int16
from .chat_handlers import (
    MODEL_VOICE_CHOICE,
    ChatRequest,
    ChatService,
    describe_turn,
    resolve_voice,
    user_content,
    voice_choices,
)
from .live_sessions import LiveOptions, LiveSessionClosed, LiveSessionManager, LiveSessionsBusy
from .live_view import render_status, render_timeline
from .model_loading import LoadedModel
from .replay_handler import EVENT_COLUMNS, OUTPUT_RATE, run_replay
from .settings import SpaceSettings

SPEECH_RATE = 24000
DUPLEX_SYSTEM_PROMPT = "Streaming Omni Conversation."
MIC_STREAM_EVERY_S = 0.5
WEBCAM_STREAM_EVERY_S = 0.5
USER_ERRORS = (ValueError, TypeError, RuntimeError, OSError)


def _shown_to_user(fn):
    """Turn a handler's expected failures into gr.Error, which reaches only the caller (also for generators)."""
    if inspect.isgeneratorfunction(fn):
        @functools.wraps(fn)
        def generator_wrapper(*args, **kwargs):
            try:
                yield from fn(*args, **kwargs)
            except gr.Error:
                raise
            except USER_ERRORS as error:
                raise gr.Error(f"{type(error).__name__}: {error}") from error
        return generator_wrapper

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except gr.Error:
            raise
        except USER_ERRORS as error:
            raise gr.Error(f"{type(error).__name__}: {error}") from error
    return wrapper


def _speech_value(audio: np.ndarray | None):
    """A streaming-audio chunk (int16 at 24 kHz) or a no-op update when there is nothing to play."""
    if audio is None or audio.size == 0:
        return gr.skip()
    return (SPEECH_RATE, to_int16(audio))


def _chatbot_messages(turns: list[dict]) -> list[dict]:
    messages = []
    for turn in turns:
        messages.append({"role": "user", "content": turn["shown"]})
        messages.append({"role": "assistant", "content": turn["answer"]})
    return messages


def _model_history(turns: list[dict]) -> list[dict]:
    history = []
    for turn in turns:
        history.append({"role": "user", "content": turn["content"]})
        history.append({"role": "assistant", "content": [{"type": "text", "text": turn["answer"]}]})
    return history


def _voice_controls(model_voice: str | None, label_suffix: str = ""):
    default = MODEL_VOICE_CHOICE if model_voice else DEFAULT_VOICE
    voice = gr.Dropdown(voice_choices(model_voice), value=default, label=f"Voice{label_suffix}")
    upload = gr.Audio(label="…or clone a voice (upload / record ≥ 1 s)", sources=["upload", "microphone"],
                      type="filepath")
    return voice, upload


def build_demo(loaded: LoadedModel, settings: SpaceSettings | None = None) -> gr.Blocks:
    """The whole Space. `demo.minicpmo_live` is the live-session manager (tests and shutdown use it)."""
    settings = settings or SpaceSettings.from_env()
    chat = ChatService(loaded, settings)
    manager = LiveSessionManager(loaded, settings)

    # --- chat -------------------------------------------------------------------------------------------------------
    def _stream_turn(turns, content, shown, ref_audio, speak, thinking):
        turn = {"content": content, "shown": shown, "answer": ""}
        visible = _chatbot_messages(turns) + [{"role": "user", "content": shown}]
        yield visible + [{"role": "assistant", "content": "…"}], gr.skip(), turns
        request = ChatRequest(history=_model_history(turns), content=content, ref_audio=ref_audio,
                              generate_audio=speak, enable_thinking=thinking)
        for chunk in chat.stream(request):
            turn["answer"] += chunk.text
            yield visible + [{"role": "assistant", "content": turn["answer"]}], _speech_value(chunk.audio), turns
        yield _chatbot_messages(turns + [turn]), gr.skip(), turns + [turn]

    @_shown_to_user
    def chat_send(text, image, audio, video, voice, voice_upload, thinking, speak, turns):
        content = user_content(text, image, audio, video)
        ref_audio = resolve_voice(voice, voice_upload, loaded.model_voice) if speak else None
        yield from _stream_turn(turns or [], content, describe_turn(text, image, audio, video), ref_audio, speak,
                                thinking)

    @_shown_to_user
    def chat_retry(voice, voice_upload, thinking, speak, turns):
        if not turns:
            raise gr.Error("nothing to retry yet: send a message first")
        last = turns[-1]
        ref_audio = resolve_voice(voice, voice_upload, loaded.model_voice) if speak else None
        yield from _stream_turn(turns[:-1], last["content"], last["shown"], ref_audio, speak, thinking)

    @_shown_to_user
    def chat_api(text, image, audio, video, voice, voice_upload, thinking, speak):
        """Non-streaming twin of the chat tab (one turn, no history): -> (answer text, speech wav or None)."""
        content = user_content(text, image, audio, video)
        ref_audio = resolve_voice(voice, voice_upload, loaded.model_voice) if speak else None
        answer, speech = chat.respond(ChatRequest(history=[], content=content, ref_audio=ref_audio,
                                                  generate_audio=speak, enable_thinking=thinking))
        return answer, ((SPEECH_RATE, to_int16(speech)) if speech.size else None)

    # --- live -------------------------------------------------------------------------------------------------------
    @_shown_to_user
    def live_start(system_prompt, voice, voice_upload, audio_only, speak, request: gr.Request):
        ref_audio = resolve_voice(voice, voice_upload, loaded.model_voice) if speak else None
        options = LiveOptions(system_prompt=(system_prompt or "").strip() or DUPLEX_SYSTEM_PROMPT,
                              ref_audio=ref_audio, generate_audio=speak, audio_only=audio_only)
        try:
            live, created = manager.start(request.session_hash, options)
        except LiveSessionsBusy as error:
            raise gr.Error(str(error)) from error
        state = "started" if created else "already running"
        return request.session_hash, render_status(live.stats, f"{state}: press Record on the microphone")

    def live_output(key):
        """The one long-lived output generator of a browser session: speech, timeline and status."""
        live = manager.get(key)
        if live is None:
            raise gr.Error("no live session: press Start")
        claim = live.claim_output()
        yield gr.skip(), render_timeline(live.events), render_status(live.stats, "listening")
        for update in live.updates(claim):
            if update.error:
                raise gr.Error(update.error)
            state = "speaking" if update.event is not None and update.event.action == "speak" else "listening"
            yield _speech_value(update.audio), render_timeline(live.events), render_status(live.stats, state)
        if live.output_claim == claim:  # ended, not replaced by a newer stream
            yield gr.skip(), render_timeline(live.events), render_status(
                live.stats, f"stopped ({live.error})" if live.error else "stopped")

    def live_audio_in(chunk, key):
        live = manager.get(key)
        if live is None or chunk is None:
            return
        rate, data = chunk
        try:
            live.push_audio(rate, data)
        except LiveSessionClosed:
            return

    def live_frame_in(frame, key):
        live = manager.get(key)
        if live is not None and frame is not None:
            live.set_frame(frame)

    def live_stop(key):
        live = manager.get(key)
        manager.close(key, "stopped by the user")
        stats = live.stats if live is not None else None
        return None, render_status(stats, "stopped") if stats else "stopped"

    @_shown_to_user
    def live_reset(key):
        live = manager.get(key)
        if live is None:
            raise gr.Error("no live session to reset: press Start")
        live.reset()
        return render_timeline(live.events), render_status(live.stats, "reset: listening")

    def on_unload(request: gr.Request):
        manager.close(request.session_hash, "the browser tab was closed")

    # --- replay -----------------------------------------------------------------------------------------------------
    @_shown_to_user
    def replay_api(recording, system_prompt, voice, voice_upload, speak):
        ref_audio = resolve_voice(voice, voice_upload, loaded.model_voice) if speak else None
        rows, output = run_replay(loaded, settings, recording, system_prompt, ref_audio, generate_audio=speak)
        speaking = sum(row[EVENT_COLUMNS.index("action")] == "speak" for row in rows)
        summary = f"{len(rows)} units, {speaking} speaking, output {output.shape[0] / OUTPUT_RATE:.2f} s"
        return rows, (OUTPUT_RATE, to_int16(output)), summary

    # --- layout -----------------------------------------------------------------------------------------------------
    with gr.Blocks(title="MiniCPM-o 4.5 (minicpmo)") as demo:
        gr.Markdown(f"# MiniCPM-o 4.5 — see, listen, speak\nModel: `{loaded.name}`")
        with gr.Tab("Chat"):
            turns = gr.State([])
            chatbot = gr.Chatbot(label="Conversation", height=360, elem_id="chatbot")
            with gr.Row():
                text = gr.Textbox(label="Message", lines=2, scale=4, placeholder="Ask anything…")
                with gr.Column(scale=1, min_width=120):
                    send = gr.Button("Send", variant="primary", elem_id="chat-send")
                    retry = gr.Button("Retry", elem_id="chat-retry")
                    clear = gr.Button("Clear", elem_id="chat-clear")
            with gr.Row():
                image = gr.Image(label="Image", sources=["upload", "webcam"], type="filepath")
                audio = gr.Audio(label="Audio", sources=["upload", "microphone"], type="filepath")
                video = gr.Video(label="Video", sources=["upload", "webcam"])
            with gr.Row():
                speak = gr.Checkbox(True, label="Speak the answer")
                thinking = gr.Checkbox(False, label="Thinking mode")
                voice, voice_upload = _voice_controls(loaded.model_voice)
            speech = gr.Audio(label="Spoken answer", streaming=True, autoplay=True, interactive=False,
                              elem_id="chat-speech")
            api_trigger = gr.Button(visible=False)
            api_text = gr.Textbox(visible=False)
            api_speech = gr.Audio(visible=False, type="filepath", format="wav")

        with gr.Tab("Live", id="live"):
            gr.Markdown("Full duplex: the model listens and may speak every second. Press **Start**, then "
                        "**Record** on the microphone (and allow the webcam unless audio-only).")
            with gr.Row():
                webcam = gr.Image(label="Webcam", sources=["webcam"], streaming=True, type="pil", height=240)
                mic = gr.Audio(label="Microphone", sources=["microphone"], streaming=True, type="numpy")
            with gr.Row():
                live_prompt = gr.Textbox(DUPLEX_SYSTEM_PROMPT, label="System prompt (e.g. proactive reminders)",
                                         lines=2, scale=3)
                with gr.Column(scale=2):
                    live_voice, live_voice_upload = _voice_controls(loaded.model_voice)
                    with gr.Row():
                        live_speak = gr.Checkbox(True, label="Speak")
                        audio_only = gr.Checkbox(False, label="Audio only (no webcam)")
            with gr.Row():
                start = gr.Button("Start", variant="primary", elem_id="live-start")
                stop = gr.Button("Stop", elem_id="live-stop")
                reset = gr.Button("Reset", elem_id="live-reset")
            live_status = gr.Textbox(label="Status", interactive=False, elem_id="live-status")
            live_speech = gr.Audio(label="Model speech", streaming=True, autoplay=True, interactive=False,
                                   elem_id="live-speech")
            timeline = gr.HTML(render_timeline([]), label="Listen / speak timeline", elem_id="live-timeline")
            live_key = gr.State(None, delete_callback=lambda key: manager.close(key, "session expired"))

        with gr.Tab("Replay"):
            gr.Markdown("Run a recording through a duplex session in 1-s units; the output is time-aligned with "
                        "the input.")
            with gr.Row():
                recording = gr.File(label="Recording (.wav / .mp4)", type="filepath",
                                    file_types=["audio", "video"])
                with gr.Column():
                    replay_prompt = gr.Textbox(DUPLEX_SYSTEM_PROMPT, label="System prompt")
                    replay_voice, replay_voice_upload = _voice_controls(loaded.model_voice)
                    replay_speak = gr.Checkbox(True, label="Speak")
            run = gr.Button("Replay", variant="primary")
            replay_summary = gr.Markdown()
            replay_audio = gr.Audio(label="Time-synchronous output (24 kHz)", type="filepath", format="wav")
            replay_events = gr.Dataframe(headers=EVENT_COLUMNS, label="Events", interactive=False)

        # --- events ---------------------------------------------------------------------------------------------------
        chat_inputs = [text, image, audio, video, voice, voice_upload, thinking, speak]
        send_event = send.click(chat_send, chat_inputs + [turns], [chatbot, speech, turns], api_visibility="private")
        text.submit(chat_send, chat_inputs + [turns], [chatbot, speech, turns], api_visibility="private")
        send_event.success(lambda: (None, None, None, None), None, [text, image, audio, video],
                           api_visibility="private")
        retry.click(chat_retry, [voice, voice_upload, thinking, speak, turns], [chatbot, speech, turns],
                    api_visibility="private")
        clear.click(lambda: ([], [], None), None, [chatbot, turns, speech], api_visibility="private")
        api_trigger.click(chat_api, chat_inputs, [api_text, api_speech], api_name="chat")

        start.click(live_start, [live_prompt, live_voice, live_voice_upload, audio_only, live_speak],
                    [live_key, live_status], api_visibility="private").success(
            live_output, [live_key], [live_speech, timeline, live_status],
            concurrency_limit=settings.max_live_sessions + 1, concurrency_id="live-output",
            api_visibility="private")
        stop.click(live_stop, [live_key], [live_key, live_status], api_visibility="private")
        reset.click(live_reset, [live_key], [timeline, live_status], api_visibility="private")
        mic.stream(live_audio_in, [mic, live_key], None, stream_every=MIC_STREAM_EVERY_S, time_limit=None,
                   concurrency_limit=None, show_progress="hidden", api_visibility="private")
        webcam.stream(live_frame_in, [webcam, live_key], None, stream_every=WEBCAM_STREAM_EVERY_S,
                      time_limit=None, concurrency_limit=None, show_progress="hidden", api_visibility="private")
        demo.unload(on_unload)

        run.click(replay_api, [recording, replay_prompt, replay_voice, replay_voice_upload, replay_speak],
                  [replay_events, replay_audio, replay_summary], api_name="replay")

    demo.queue(default_concurrency_limit=4)
    demo.minicpmo_live = manager
    return demo
