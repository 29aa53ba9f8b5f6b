"""Replay tab: a recording through a duplex session in 1-s units; the /replay API endpoint."""

import gradio as gr

from .audio_io import to_int16
from .chat_handlers import resolve_voice
from .model_loading import LoadedModel
from .replay_handler import EVENT_COLUMNS, OUTPUT_RATE, run_replay
from .settings import SpaceSettings
from .tab_common import DUPLEX_SYSTEM_PROMPT, shown_to_user, voice_controls


def build_replay_tab(loaded: LoadedModel, settings: SpaceSettings) -> None:
    """Lay out the Replay tab and wire its events (call inside the Space's gr.Blocks)."""
    @shown_to_user
    def replay_api(recording, system_prompt, voice, voice_upload, speak):
        ref_audio = resolve_voice(voice, voice_upload, loaded.model_voice) if speak else None
        rows, output = run_replay(loaded, settings, recording, system_prompt, ref_audio, generate_audio=speak)
        speaking = sum(row[EVENT_COLUMNS.index("action")] == "speak" for row in rows)
        summary = f"{len(rows)} units, {speaking} speaking, output {output.shape[0] / OUTPUT_RATE:.2f} s"
        return rows, (OUTPUT_RATE, to_int16(output)), summary

    with gr.Tab("Replay"):
        gr.Markdown("Run a recording through a duplex session in 1-s units; the output is time-aligned with "
                    "the input.")
        with gr.Row():
            recording = gr.File(label="Recording (.wav / .mp4)", type="filepath",
                                file_types=["audio", "video"])
            with gr.Column():
                replay_prompt = gr.Textbox(DUPLEX_SYSTEM_PROMPT, label="System prompt")
                replay_voice, replay_voice_upload = voice_controls(loaded.model_voice)
                replay_speak = gr.Checkbox(True, label="Speak")
        run = gr.Button("Replay", variant="primary")
        replay_summary = gr.Markdown()
        replay_audio = gr.Audio(label="Time-synchronous output (24 kHz)", type="filepath", format="wav")
        replay_events = gr.Dataframe(headers=EVENT_COLUMNS, label="Events", interactive=False)

    run.click(replay_api, [recording, replay_prompt, replay_voice, replay_voice_upload, replay_speak],
              [replay_events, replay_audio, replay_summary], api_name="replay")
