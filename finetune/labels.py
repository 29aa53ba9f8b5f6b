"""Loss masks for chat SFT: learn exactly the tokens the model generates at inference time.

For every assistant turn `<|im_start|>assistant\\n ... <|im_end|>\\n` the labels keep the tokens after the
header up to and including `<|im_end|>`; the header, the newline after `<|im_end|>`, system/user/tool turns,
media placeholders and padding are -100. An empty thinking block `<think>\\n\\n</think>\\n\\n` right after the
header is also masked: with `enable_thinking=False` it is part of the generation prompt, not of the answer; so is a
`<|tts_bos|>` right after it (chat() ends the prompt with it whenever the conversation holds audio).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

# The label ignore index of the package's duplex serializer (torch / transformers losses skip it): one value for
# every label tensor the collators build.
from minicpmo.errors import DataFormatError
from minicpmo.special_tokens import IGNORE_INDEX
from minicpmo.special_tokens import MiniCPMOSpecialTokens

_token = MiniCPMOSpecialTokens.token_string
EMPTY_THINK_TEXT = f"{_token('think_start')}\n\n{_token('think_end')}\n\n"


class LabelMaskError(DataFormatError):
    """The tokenized conversation does not show the assistant turns the messages promise."""


@dataclass(frozen=True)
class ChatTokenIds:
    """Token ids that delimit chat turns, resolved once from the tokenizer."""

    im_start: int
    im_end: int
    assistant: int
    empty_think: tuple[int, ...]
    tts_bos: int | None = None

    @classmethod
    def from_tokenizer(cls, tokenizer) -> "ChatTokenIds":
        def one_id(text: str) -> int:
            ids = tokenizer(text, add_special_tokens=False)["input_ids"]
            if len(ids) != 1:
                raise LabelMaskError(f"expected {text!r} to be one token, the tokenizer gives {ids}")
            return ids[0]

        empty_think = tuple(tokenizer(EMPTY_THINK_TEXT, add_special_tokens=False)["input_ids"])
        return cls(
            one_id(_token("im_start")), one_id(_token("im_end")), one_id("assistant"), empty_think,
            one_id(_token("tts_bos")),
        )


def assistant_spans(input_ids: list[int], ids: ChatTokenIds) -> list[tuple[int, int]]:
    """[start, end) token ranges of every assistant answer, `<|im_end|>` included, the header excluded."""
    spans = []
    position = 0
    length = len(input_ids)
    while position < length - 1:
        if input_ids[position] == ids.im_start and input_ids[position + 1] == ids.assistant:
            start = position + 3  # <|im_start|> assistant "\n"
            think = ids.empty_think
            if think and tuple(input_ids[start : start + len(think)]) == think:
                start += len(think)
            if ids.tts_bos is not None and start < length and input_ids[start] == ids.tts_bos:
                start += 1
            end = start
            while end < length and input_ids[end] != ids.im_end:
                end += 1
            if end == length:
                raise LabelMaskError(
                    f"assistant turn starting at token {position} has no closing <|im_end|> (truncated sequence?)"
                )
            spans.append((start, end + 1))
            position = end + 1
        else:
            position += 1
    return spans


def assistant_only_labels(
    input_ids: torch.LongTensor,
    attention_mask: torch.Tensor,
    ids: ChatTokenIds,
    expected_turns: list[int] | None = None,
    last_turn_only: bool = False,
) -> torch.LongTensor:
    """[B, L] labels: input ids on assistant answers (see module doc), -100 elsewhere.

    `expected_turns[b]` is the number of assistant messages of sample b; a different number of assistant
    headers in the tokens (e.g. a user typed "<|im_start|>assistant") raises `LabelMaskError`.
    """
    labels = torch.full_like(input_ids, IGNORE_INDEX)
    for row in range(input_ids.shape[0]):
        tokens = input_ids[row].tolist()
        spans = assistant_spans(tokens, ids)
        if expected_turns is not None and len(spans) != expected_turns[row]:
            raise LabelMaskError(
                f"sample {row}: found {len(spans)} assistant turns in the tokens but the messages have "
                f"{expected_turns[row]}; message text must not contain raw chat tokens such as <|im_start|>"
            )
        if last_turn_only:
            spans = spans[-1:]
        for start, end in spans:
            labels[row, start:end] = input_ids[row, start:end]
    return labels.masked_fill(attention_mask == 0, IGNORE_INDEX)


__all__ = ["ChatTokenIds", "EMPTY_THINK_TEXT", "IGNORE_INDEX", "LabelMaskError", "assistant_only_labels", "assistant_spans"]
