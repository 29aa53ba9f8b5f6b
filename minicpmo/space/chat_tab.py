"""Chat tab: text, image, audio and video in; streaming text and speech out; the /chat API endpoint."""

import gradio as gr

from .audio_io import to_int16
from .chat_examples import chat_examples
from .chat_handlers import ChatRequest, ChatService, describe_turn, resolve_voice, user_content
from .model_loading import LoadedModel
from .settings import SpaceSettings
from .tab_common import SPEECH_RATE, shown_to_user, speech_value, voice_controls


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


def build_chat_tab(loaded: LoadedModel, settings: SpaceSettings) -> None:
    """Lay out the Chat tab and wire its events (call inside the Space's gr.Blocks)."""
    chat = ChatService(loaded, settings)

    def _stream_turn(turns, content, shown, ref_audio, speak, thinking):
        turn = {"content": content, "shown": shown, "answer": ""}
        visible = _chatbot_messages(turns) + [{"role": "user", "content": shown}]
        yield visible + [{"role": "assistant", "content": "…"}], gr.skip(), turns
        request = ChatRequest(history=_model_history(turns), content=content, ref_audio=ref_audio,
                              generate_audio=speak, enable_thinking=thinking)
        for chunk in chat.stream(request):
            turn["answer"] += chunk.text
            yield visible + [{"role": "assistant", "content": turn["answer"]}], speech_value(chunk.audio), turns
        yield _chatbot_messages(turns + [turn]), gr.skip(), turns + [turn]

    @shown_to_user
    def chat_send(text, image, audio, video, voice, voice_upload, thinking, speak, turns):
        content = user_content(text, image, audio, video)
        ref_audio = resolve_voice(voice, voice_upload, loaded.model_voice) if speak else None
        yield from _stream_turn(turns or [], content, describe_turn(text, image, audio, video), ref_audio, speak,
                                thinking)

    @shown_to_user
    def chat_retry(voice, voice_upload, thinking, speak, turns):
        if not turns:
            raise gr.Error("nothing to retry yet: send a message first")
        last = turns[-1]
        ref_audio = resolve_voice(voice, voice_upload, loaded.model_voice) if speak else None
        yield from _stream_turn(turns[:-1], last["content"], last["shown"], ref_audio, speak, thinking)

    @shown_to_user
    def chat_api(text, image, audio, video, voice, voice_upload, thinking, speak):
        """Non-streaming twin of the chat tab (one turn, no history): -> (answer text, speech wav or None)."""
        content = user_content(text, image, audio, video)
        ref_audio = resolve_voice(voice, voice_upload, loaded.model_voice) if speak else None
        answer, speech = chat.respond(ChatRequest(history=[], content=content, ref_audio=ref_audio,
                                                  generate_audio=speak, enable_thinking=thinking))
        return answer, ((SPEECH_RATE, to_int16(speech)) if speech.size else None)

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
            voice, voice_upload = voice_controls(loaded.model_voice)
        speech = gr.Audio(label="Spoken answer", streaming=True, autoplay=True, interactive=False,
                          elem_id="chat-speech")
        examples = gr.Examples([[example.question, str(example.image_path)] for example in chat_examples()],
                               inputs=[text, image], label="Ask about a scene of the demo world (one click)",
                               examples_per_page=6, elem_id="chat-examples")
        api_trigger = gr.Button(visible=False)
        api_text = gr.Textbox(visible=False)
        api_speech = gr.Audio(visible=False, type="filepath", format="wav")

    chat_inputs = [text, image, audio, video, voice, voice_upload, thinking, speak]
    send_event = send.click(chat_send, chat_inputs + [turns], [chatbot, speech, turns], api_visibility="private")
    text.submit(chat_send, chat_inputs + [turns], [chatbot, speech, turns], api_visibility="private")
    send_event.success(lambda: (None, None, None, None), None, [text, image, audio, video],
                       api_visibility="private")
    retry.click(chat_retry, [voice, voice_upload, thinking, speak, turns], [chatbot, speech, turns],
                api_visibility="private")
    clear.click(lambda: ([], [], None), None, [chatbot, turns, speech], api_visibility="private")
    # an example fills the message and the image, then is sent at once: one click, a spoken answer
    examples.load_input_event.then(chat_send, chat_inputs + [turns], [chatbot, speech, turns],
                                   api_visibility="private")
    api_trigger.click(chat_api, chat_inputs, [api_text, api_speech], api_name="chat")
