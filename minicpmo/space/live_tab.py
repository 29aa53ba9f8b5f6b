"""Live tab: webcam + microphone streamed in 1-s units into one duplex session per browser session."""

import gradio as gr

from .chat_handlers import resolve_voice
from .live_episode import demo_episode, play_episode
from .live_sessions import LiveOptions, LiveSessionClosed, LiveSessionManager, LiveSessionsBusy
from .live_view import render_status, render_timeline
from .model_loading import LoadedModel
from .settings import SpaceSettings
from .tab_common import DUPLEX_SYSTEM_PROMPT, shown_to_user, speech_value, voice_controls

MIC_STREAM_EVERY_S = 0.5
WEBCAM_STREAM_EVERY_S = 0.5


def build_live_tab(loaded: LoadedModel, settings: SpaceSettings, demo: gr.Blocks) -> LiveSessionManager:
    """Lay out the Live tab and wire its events (inside `demo`); returns the live-session manager."""
    manager = LiveSessionManager(loaded, settings)

    @shown_to_user
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

    @shown_to_user
    def live_play_start(system_prompt, voice, voice_upload, speak, episode_index, request: gr.Request):
        """Start (or restart) this browser's session for a generated episode: scene video + user speech."""
        manager.close(request.session_hash, "replaced by a demo episode")
        ref_audio = resolve_voice(voice, voice_upload, loaded.model_voice) if speak else None
        options = LiveOptions(system_prompt=(system_prompt or "").strip() or DUPLEX_SYSTEM_PROMPT,
                              ref_audio=ref_audio, generate_audio=speak, audio_only=False)
        try:
            manager.start(request.session_hash, options)
        except LiveSessionsBusy as error:
            raise gr.Error(str(error)) from error
        episode = demo_episode(int(episode_index))
        said = " / ".join(segment.text for segment in episode.user_segments)
        return request.session_hash, f"demo episode ({episode.episode_type}, {episode.duration_s} s): “{said}”"

    def live_play_feed(key, episode_index):
        """Play the episode into the session in real time, showing each frame as the model gets it."""
        live = manager.get(key)
        if live is None:
            raise gr.Error("no live session: press Play again")
        try:
            yield from play_episode(live, demo_episode(int(episode_index)))
        except LiveSessionClosed:
            return

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
            yield speech_value(update.audio), render_timeline(live.events), render_status(live.stats, state)
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

    @shown_to_user
    def live_reset(key):
        live = manager.get(key)
        if live is None:
            raise gr.Error("no live session to reset: press Start")
        live.reset()
        return render_timeline(live.events), render_status(live.stats, "reset: listening")

    def on_unload(request: gr.Request):
        manager.close(request.session_hash, "the browser tab was closed")

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
                live_voice, live_voice_upload = voice_controls(loaded.model_voice)
                with gr.Row():
                    live_speak = gr.Checkbox(True, label="Speak")
                    audio_only = gr.Checkbox(False, label="Audio only (no webcam)")
        with gr.Row():
            episode_view = gr.Image(label="Demo episode: what the model sees", interactive=False, height=240,
                                    elem_id="live-episode-view")
            with gr.Column():
                episode_index = gr.Dropdown([("question about the scene", 0), ("watch for a change", 1),
                                             ("interrupting the answer", 2)], value=0,
                                            label="Demo episode (no webcam or microphone needed)")
                play = gr.Button("Play demo episode", elem_id="live-play")
                episode_said = gr.Markdown(elem_id="live-episode-said")
        with gr.Row():
            start = gr.Button("Start", variant="primary", elem_id="live-start")
            stop = gr.Button("Stop", elem_id="live-stop")
            reset = gr.Button("Reset", elem_id="live-reset")
        live_status = gr.Textbox(label="Status", interactive=False, elem_id="live-status")
        live_speech = gr.Audio(label="Model speech", streaming=True, autoplay=True, interactive=False,
                               elem_id="live-speech")
        timeline = gr.HTML(render_timeline([]), label="Listen / speak timeline", elem_id="live-timeline")
        live_key = gr.State(None, delete_callback=lambda key: manager.close(key, "session expired"))

    start.click(live_start, [live_prompt, live_voice, live_voice_upload, audio_only, live_speak],
                [live_key, live_status], api_visibility="private").success(
        live_output, [live_key], [live_speech, timeline, live_status],
        concurrency_limit=settings.max_live_sessions + 1, concurrency_id="live-output",
        api_visibility="private")
    played = play.click(live_play_start, [live_prompt, live_voice, live_voice_upload, live_speak, episode_index],
                        [live_key, episode_said], api_visibility="private")
    played.success(live_output, [live_key], [live_speech, timeline, live_status],
                   concurrency_limit=settings.max_live_sessions + 1, concurrency_id="live-output",
                   api_visibility="private")
    played.success(live_play_feed, [live_key, episode_index], [episode_view],
                   concurrency_limit=settings.max_live_sessions + 1, concurrency_id="live-feed",
                   show_progress="hidden", api_visibility="private")
    stop.click(live_stop, [live_key], [live_key, live_status], api_visibility="private")
    reset.click(live_reset, [live_key], [timeline, live_status], api_visibility="private")
    mic.stream(live_audio_in, [mic, live_key], None, stream_every=MIC_STREAM_EVERY_S, time_limit=None,
               concurrency_limit=None, show_progress="hidden", api_visibility="private")
    webcam.stream(live_frame_in, [webcam, live_key], None, stream_every=WEBCAM_STREAM_EVERY_S,
                  time_limit=None, concurrency_limit=None, show_progress="hidden", api_visibility="private")
    demo.unload(on_unload)
    return manager
