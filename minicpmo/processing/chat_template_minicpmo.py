"""MiniCPM-o 4.5 chat template: the official Qwen3-style template, extended to multimodal content items.

Content items `{"type": "text" | "image" | "audio"}` become the official prompt strings ("<image>./</image>",
"<audio>./</audio>") joined with "\\n", or with "" in omni mode. Video items are expanded beforehand into
interleaved 1-fps frames and 1-s audio segments (see `media_loading_minicpmo.expand_video_items`). The
generation prompt is "<|im_start|>assistant\\n", then "<think>\\n\\n</think>\\n\\n" unless `enable_thinking`,
then "<|tts_bos|>" if `use_tts_template`.

`render_chat_prompt` is the same template in plain Python (used by tests and by code that must not depend on
Jinja); both produce identical strings.
"""

from __future__ import annotations

import json
from typing import Any

from ..errors import PromptError


IMAGE_PATTERN = "<image>./</image>"
AUDIO_PATTERN = "<audio>./</audio>"
SUPPORTED_CONTENT_TYPES = ("text", "image", "audio", "video")


class UnsupportedContentTypeError(PromptError):
    """A message content item whose `type` MiniCPM-o cannot render."""


CHAT_TEMPLATE = r"""{%- set sep = '' if (omni_mode is defined and omni_mode) else '\n' -%}
{%- macro render(content, sep) -%}
    {%- if content is string -%}
        {{- content -}}
    {%- elif content is not none -%}
        {%- for item in content -%}
            {%- if not loop.first -%}{{- sep -}}{%- endif -%}
            {%- if item is string -%}
                {{- item -}}
            {%- elif item.type == 'text' -%}
                {{- item.text -}}
            {%- elif item.type == 'image' -%}
                {{- '<image>./</image>' -}}
            {%- elif item.type == 'audio' -%}
                {{- '<audio>./</audio>' -}}
            {%- elif item.type == 'video' -%}
                {{- raise_exception('video items must be expanded into frames and audio first: use MiniCPMOProcessor.apply_chat_template') -}}
            {%- else -%}
                {{- raise_exception('unsupported content type: ' ~ item.type) -}}
            {%- endif -%}
        {%- endfor -%}
    {%- endif -%}
{%- endmacro -%}
{%- if tools %}
    {{- '<|im_start|>system\n' }}
    {%- if messages[0].role == 'system' %}
        {{- render(messages[0].content, sep) + '\n\n' }}
    {%- endif %}
    {{- "# Tools\n\nYou may call one or more functions to assist with the user query.\n\nYou are provided with function signatures within <tools></tools> XML tags:\n<tools>" }}
    {%- for tool in tools %}
        {{- "\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\n</tools>\n\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n{\"name\": <function-name>, \"arguments\": <args-json-object>}\n</tool_call><|im_end|>\n" }}
{%- else %}
    {%- if messages[0].role == 'system' %}
        {{- '<|im_start|>system\n' + render(messages[0].content, sep) + '<|im_end|>\n' }}
    {%- endif %}
{%- endif %}
{%- set ns = namespace(multi_step_tool=true, last_query_index=messages|length - 1) %}
{%- for message in messages[::-1] %}
    {%- set index = (messages|length - 1) - loop.index0 %}
    {%- set text = render(message.content, sep) %}
    {%- if ns.multi_step_tool and message.role == "user" and not(text.startswith('<tool_response>') and text.endswith('</tool_response>')) %}
        {%- set ns.multi_step_tool = false %}
        {%- set ns.last_query_index = index %}
    {%- endif %}
{%- endfor %}
{%- for message in messages %}
    {%- set text = render(message.content, sep) %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) %}
        {{- '<|im_start|>' + message.role + '\n' + text + '<|im_end|>' + '\n' }}
    {%- elif message.role == "assistant" %}
        {%- set content = text %}
        {%- set reasoning_content = '' %}
        {%- if message.reasoning_content is defined and message.reasoning_content is not none %}
            {%- set reasoning_content = message.reasoning_content %}
        {%- else %}
            {%- if '</think>' in text %}
                {%- set content = text.split('</think>')[-1].lstrip('\n') %}
                {%- set reasoning_content = text.split('</think>')[0].rstrip('\n').split('<think>')[-1].lstrip('\n') %}
            {%- endif %}
        {%- endif %}
        {%- if loop.index0 > ns.last_query_index %}
            {%- if loop.last or (not loop.last and reasoning_content) %}
                {{- '<|im_start|>' + message.role + '\n<think>\n' + reasoning_content.strip('\n') + '\n</think>\n\n' + content.lstrip('\n') }}
            {%- else %}
                {{- '<|im_start|>' + message.role + '\n' + content }}
            {%- endif %}
        {%- else %}
            {{- '<|im_start|>' + message.role + '\n' + content }}
        {%- endif %}
        {%- if message.tool_calls %}
            {%- for tool_call in message.tool_calls %}
                {%- if (loop.first and content) or (not loop.first) %}
                    {{- '\n' }}
                {%- endif %}
                {%- if tool_call.function %}
                    {%- set tool_call = tool_call.function %}
                {%- endif %}
                {{- '<tool_call>\n{"name": "' }}
                {{- tool_call.name }}
                {{- '", "arguments": ' }}
                {%- if tool_call.arguments is string %}
                    {{- tool_call.arguments }}
                {%- else %}
                    {{- tool_call.arguments | tojson }}
                {%- endif %}
                {{- '}\n</tool_call>' }}
            {%- endfor %}
        {%- endif %}
        {{- '<|im_end|>\n' }}
    {%- elif message.role == "tool" %}
        {%- if loop.first or (messages[loop.index0 - 1].role != "tool") %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\n<tool_response>\n' }}
        {{- text }}
        {{- '\n</tool_response>' }}
        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}
            {{- '<|im_end|>\n' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\n' }}
    {%- if not (enable_thinking is defined and enable_thinking) %}
        {{- '<think>\n\n</think>\n\n' }}
    {%- endif %}
    {%- if use_tts_template is defined and use_tts_template %}
        {{- '<|tts_bos|>' }}
    {%- endif %}
{%- endif %}
"""


def render_content(content: Any, omni_mode: bool = False) -> str:
    """One message's content as official prompt text (items joined with "\\n", or "" in omni mode)."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    parts = []
    for item in content:
        if isinstance(item, str):
            parts.append(item)
            continue
        item_type = item.get("type") if isinstance(item, dict) else None
        if item_type == "text":
            parts.append(item.get("text", ""))
        elif item_type == "image":
            parts.append(IMAGE_PATTERN)
        elif item_type == "audio":
            parts.append(AUDIO_PATTERN)
        elif item_type == "video":
            raise UnsupportedContentTypeError(
                "video items must be expanded into frames and audio first: use MiniCPMOProcessor.apply_chat_template"
            )
        else:
            raise UnsupportedContentTypeError(
                f"unsupported content type {item_type!r}; expected one of {SUPPORTED_CONTENT_TYPES}"
            )
    return ("" if omni_mode else "\n").join(parts)


def _split_reasoning(message: dict, text: str) -> tuple[str, str]:
    """(reasoning, answer) of an assistant message, following the Qwen3 template rules."""
    if message.get("reasoning_content") is not None:
        return message["reasoning_content"], text
    if "</think>" in text:
        answer = text.split("</think>")[-1].lstrip("\n")
        reasoning = text.split("</think>")[0].rstrip("\n").split("<think>")[-1].lstrip("\n")
        return reasoning, answer
    return "", text


def messages_have_audio(messages: list[dict]) -> bool:
    """True when any message holds an audio item: the official chat() then ends the prompt with <|tts_bos|>."""
    return any(
        isinstance(item, dict) and item.get("type") == "audio"
        for message in messages if isinstance(message.get("content"), (list, tuple))
        for item in message["content"]
    )


def render_chat_prompt(
    messages: list[dict],
    add_generation_prompt: bool = False,
    enable_thinking: bool = False,
    use_tts_template: bool | None = None,
    omni_mode: bool = False,
) -> str:
    """The official MiniCPM-o prompt string for `messages` (before placeholder expansion), without Jinja.

    `use_tts_template=None` follows the official chat(): on when any message holds an audio item.
    """
    if not messages:
        raise ValueError("messages is empty")
    if use_tts_template is None:
        use_tts_template = messages_have_audio(messages)
    texts = [render_content(message.get("content"), omni_mode) for message in messages]
    out = []
    if messages[0]["role"] == "system":
        out.append("<|im_start|>system\n" + texts[0] + "<|im_end|>\n")
    last_query_index = len(messages) - 1
    for index in range(len(messages) - 1, -1, -1):
        text = texts[index]
        if messages[index]["role"] == "user" and not (
            text.startswith("<tool_response>") and text.endswith("</tool_response>")
        ):
            last_query_index = index
            break
    for index, (message, text) in enumerate(zip(messages, texts)):
        role = message["role"]
        is_last = index == len(messages) - 1
        if role == "user" or (role == "system" and index > 0):
            out.append(f"<|im_start|>{role}\n{text}<|im_end|>\n")
        elif role == "assistant":
            reasoning, answer = _split_reasoning(message, text)
            if index > last_query_index and (is_last or reasoning):
                out.append(
                    f"<|im_start|>{role}\n<think>\n" + reasoning.strip("\n") + "\n</think>\n\n" + answer.lstrip("\n")
                )
            else:
                out.append(f"<|im_start|>{role}\n{answer}")
            for call_index, call in enumerate(message.get("tool_calls") or []):
                if (call_index == 0 and answer) or call_index > 0:
                    out.append("\n")
                call = call.get("function", call)
                arguments = call["arguments"]
                arguments = arguments if isinstance(arguments, str) else json.dumps(arguments, ensure_ascii=False)
                out.append('<tool_call>\n{"name": "' + call["name"] + '", "arguments": ' + arguments + "}\n</tool_call>")
            out.append("<|im_end|>\n")
        elif role == "tool":
            if index == 0 or messages[index - 1]["role"] != "tool":
                out.append("<|im_start|>user")
            out.append("\n<tool_response>\n" + text + "\n</tool_response>")
            if is_last or messages[index + 1]["role"] != "tool":
                out.append("<|im_end|>\n")
    if add_generation_prompt:
        out.append("<|im_start|>assistant\n")
        if not enable_thinking:
            out.append("<think>\n\n</think>\n\n")
        if use_tts_template:
            out.append("<|tts_bos|>")
    return "".join(out)
