"""The Space: Chat, Live (full duplex) and Replay tabs, each built in its own module.

Per-user data lives in gr.State only (chat turns, the live session key); the model is shared and every model
call takes its lock. Named API endpoints for gradio_client: /chat (non-streaming twin of the chat tab) and
/replay. Streaming-input events (microphone, webcam) are browser-only.
"""

import gradio as gr

from .chat_tab import build_chat_tab
from .live_tab import build_live_tab
from .model_loading import LoadedModel
from .replay_tab import build_replay_tab
from .settings import SpaceSettings


def build_demo(loaded: LoadedModel, settings: SpaceSettings | None = None) -> gr.Blocks:
    """The whole Space. `demo.minicpmo_live` is the live-session manager (tests and shutdown use it)."""
    settings = settings or SpaceSettings.from_env()
    with gr.Blocks(title="MiniCPM-o 4.5 (minicpmo)") as demo:
        gr.Markdown(f"# MiniCPM-o 4.5 — see, listen, speak\nModel: `{loaded.name}`")
        build_chat_tab(loaded, settings)
        manager = build_live_tab(loaded, settings, demo)
        build_replay_tab(loaded, settings)
    demo.queue(default_concurrency_limit=4)
    demo.minicpmo_live = manager
    return demo
