"""`MiniCPMOProcessor`: tokenizer + LLaVA-UHD image slicing + 16 kHz log-mel audio + chat template.

Text holds the official patterns "<image>./</image>" and "<audio>./</audio>"; each one is replaced by its
placeholder (image: `image_placeholder_text`, audio: `<|audio_start|>` + `<unk>`*n + `<|audio_end|>`). The
model finds the slots itself: the `<unk>` tokens between `<image>`/`<slice>` and their closing tokens take the
image slices in reading order (64 each), the `<unk>` tokens between `<|audio_start|>` and `<|audio_end|>` take
the audio tokens in reading order. Every `<|listen|>` id is removed from tokenized prompts (official behaviour).
"""

from __future__ import annotations

import os
import re
from typing import Any

import numpy as np
from transformers.feature_extraction_utils import BatchFeature
from transformers.processing_utils import ProcessorMixin

from ..errors import ContextLengthError, PromptError
from .chat_template_minicpmo import (
    AUDIO_PATTERN,
    CHAT_TEMPLATE,
    IMAGE_PATTERN,
    SUPPORTED_CONTENT_TYPES,
    UnsupportedContentTypeError,
    messages_have_audio,
)
from .duplex_inputs_minicpmo import DuplexInputsMixin
from .feature_extraction_minicpmo import MiniCPMOFeatureExtractor, UnsupportedSamplingRateError, validate_waveform
from .image_processing_minicpmo import MiniCPMOImageProcessor, stack_patch_strips
from .media_loading_minicpmo import MediaLoadingError, expand_video_items, load_audio, load_image
from .tokenization_minicpmo import MiniCPMOSpecialTokens, load_minicpmo_tokenizer


class PlaceholderCountMismatchError(PromptError):
    """The number of "<image>./</image>" / "<audio>./</audio>" patterns differs from the media given."""


class PromptTooLongError(ContextLengthError):
    """A tokenized prompt is longer than the `max_length` that was asked for."""


_PATTERN_RE = re.compile("(" + re.escape(IMAGE_PATTERN) + "|" + re.escape(AUDIO_PATTERN) + ")")
_FORWARDED_KWARG_GROUPS = ("text_kwargs", "images_kwargs", "audio_kwargs", "videos_kwargs", "common_kwargs")


def _is_waveform(value: Any) -> bool:
    if isinstance(value, (np.ndarray, str, os.PathLike)) or type(value).__module__.startswith("torch"):
        return True
    # A list of numbers is one waveform; a list of paths is a list of items.
    return (isinstance(value, (list, tuple)) and len(value) > 0 and np.isscalar(value[0])
            and not isinstance(value[0], (str, bytes)))


def _split_per_sample(items: Any, counts: list[int], is_item, modality: str, pattern: str) -> list[list[Any]]:
    """Media per sample: accepts a nested list (one list per sample) or a flat list in order of appearance."""
    total = sum(counts)
    if items is None:
        if total:
            raise PlaceholderCountMismatchError(f"text has {total} {pattern} pattern(s) but no {modality} was given")
        return [[] for _ in counts]
    if is_item(items):
        items = [items]
    items = list(items)
    nested = len(items) == len(counts) and all(
        isinstance(entry, (list, tuple)) and not is_item(entry) for entry in items
    )
    if nested:
        per_sample = [list(entry) for entry in items]
        for index, (entry, count) in enumerate(zip(per_sample, counts)):
            if len(entry) != count:
                raise PlaceholderCountMismatchError(
                    f"sample {index} has {count} {pattern} pattern(s) but {len(entry)} {modality} item(s) were given"
                )
        return per_sample
    if len(items) != total:
        raise PlaceholderCountMismatchError(
            f"text has {total} {pattern} pattern(s) but {len(items)} {modality} item(s) were given"
        )
    per_sample, start = [], 0
    for count in counts:
        per_sample.append(items[start : start + count])
        start += count
    return per_sample


class MiniCPMOProcessor(DuplexInputsMixin, ProcessorMixin):
    """Turns MiniCPM-o prompts (or chat messages) plus images and 16 kHz audio into model inputs.

    Output keys: `input_ids`, `attention_mask` (left padded with `<|endoftext|>`), and when present
    `pixel_values` [N_slices, 3, 14, L_max*14] with `tgt_sizes` [N_slices, 2] (h, w in patches), and
    `input_features` [N_pieces, 80, T_max] with `input_features_mask` [N_pieces, T_max].
    """

    def __init__(self, image_processor, feature_extractor, tokenizer, chat_template=None, **kwargs):
        super().__init__(
            image_processor,
            feature_extractor,
            tokenizer,
            chat_template=CHAT_TEMPLATE if chat_template is None else chat_template,
            **kwargs,
        )
        self.special_tokens = MiniCPMOSpecialTokens.from_tokenizer(tokenizer)

    # ---- construction ---------------------------------------------------------------------------------------
    @classmethod
    def from_defaults(cls, max_slice_nums: int = 9, use_image_id: bool = True, **image_kwargs) -> "MiniCPMOProcessor":
        """Processor built from the tokenizer files shipped in this package, with the official defaults."""
        return cls(
            MiniCPMOImageProcessor(max_slice_nums=max_slice_nums, use_image_id=use_image_id, **image_kwargs),
            MiniCPMOFeatureExtractor(),
            load_minicpmo_tokenizer(),
            chat_template=CHAT_TEMPLATE,
        )

    @classmethod
    def _get_arguments_from_pretrained(cls, pretrained_model_name_or_path, processor_dict=None, **kwargs):
        """Build the sub-processors with our own classes, so loading needs no Auto-class registration."""
        kwargs.pop("subfolder", None)
        processor_dict = processor_dict or {}
        image_config = processor_dict.get("image_processor")
        if isinstance(image_config, dict):
            image_processor = MiniCPMOImageProcessor(**image_config)
        else:
            image_processor = MiniCPMOImageProcessor.from_pretrained(pretrained_model_name_or_path, **kwargs)
        audio_config = processor_dict.get("feature_extractor")
        if isinstance(audio_config, dict):
            feature_extractor = MiniCPMOFeatureExtractor(**audio_config)
        else:
            feature_extractor = MiniCPMOFeatureExtractor.from_pretrained(pretrained_model_name_or_path, **kwargs)
        tokenizer = load_minicpmo_tokenizer(pretrained_model_name_or_path, **kwargs)
        return [image_processor, feature_extractor, tokenizer]

    @property
    def model_input_names(self) -> list[str]:
        return ["input_ids", "attention_mask", "pixel_values", "tgt_sizes", "input_features", "input_features_mask"]

    # ---- placeholders ---------------------------------------------------------------------------------------
    def audio_placeholder_text(self, num_samples: int) -> str:
        """`<|audio_start|>` + `<unk>` x (10 per second) + `<|audio_end|>` for a 16 kHz waveform."""
        return "<|audio_start|>" + "<unk>" * self.feature_extractor.token_count(num_samples) + "<|audio_end|>"

    # ---- main call ------------------------------------------------------------------------------------------
    def __call__(
        self,
        text: str | list[str] | None = None,
        images: Any = None,
        audio: Any = None,
        max_slice_nums: int | None = None,
        use_image_id: bool | None = None,
        return_tensors: str | None = None,
        *,
        videos: Any = None,
        sampling_rate: int | None = None,
        max_length: int | None = None,
        padding_side: str = "left",
        add_special_tokens: bool = False,
        ref_audio: Any = None,
        **kwargs,
    ) -> BatchFeature:
        """Expand the media patterns of `text`, tokenize, left-pad and stack pixels and audio features.

        Args:
            text: one prompt or a batch; `<image>./</image>` and `<audio>./</audio>` mark where media go.
            images: one list per sample or a flat list in order of appearance (PIL images, arrays, local paths).
            audio: likewise; 16 kHz mono arrays or local audio files (resampled on load).
            max_slice_nums / use_image_id: image slicing (default: the image processor's, 9 slices, ids on).
            return_tensors: "pt" for tensors, None for lists.
            videos: video files or frame lists, expanded into 1-fps frames + 1-s audio (chat template layout).
            sampling_rate: the rate of array audio (must be 16000; files are resampled).
            max_length: raise PromptTooLongError beyond this many ids instead of truncating.
            padding_side: "left" (generation) or "right" (training).
            add_special_tokens: passed to the tokenizer (MiniCPM-o prompts carry their own).
            ref_audio: the voice to speak with (16 kHz mono), handed through as the `ref_audio` output for
                `generate(..., return_audio=True)`; apply_chat_template passes the audio of the system message here.

        Returns:
            BatchFeature with `input_ids`, `attention_mask`, and when present `pixel_values` [N_slices, 3, 14,
            L_max*14], `tgt_sizes` [N_slices, 2], `input_features` [N_pieces, 80, T_max], `input_features_mask`
            [N_pieces, T_max], `ref_audio`. Mismatched media counts raise PlaceholderCountMismatchError; bad audio
            raises InvalidAudioError (or a subclass) naming the item.
        """
        for group in _FORWARDED_KWARG_GROUPS:  # nested kwargs that ProcessorMixin.apply_chat_template may pass
            for key, value in (kwargs.pop(group, None) or {}).items():
                kwargs.setdefault(key, value)
        max_slice_nums = kwargs.pop("max_slice_nums", max_slice_nums)
        use_image_id = kwargs.pop("use_image_id", use_image_id)
        return_tensors = kwargs.pop("return_tensors", return_tensors)
        sampling_rate = kwargs.pop("sampling_rate", sampling_rate)
        max_length = kwargs.pop("max_length", max_length)
        if kwargs:
            raise TypeError(f"MiniCPMOProcessor got unexpected arguments: {sorted(kwargs)}")
        if text is None:
            raise ValueError("MiniCPMOProcessor needs `text` (a prompt string or a list of them)")
        if videos is not None:
            raise TypeError(
                "MiniCPMOProcessor takes videos as frames and audio: use apply_chat_template with "
                "{'type': 'video', ...} items, or put the frames in `images`"
            )
        if padding_side not in ("left", "right"):
            raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
        is_batched = not isinstance(text, str)
        texts = [text] if not is_batched else list(text)
        if not all(isinstance(sample, str) for sample in texts):
            raise TypeError("text must be a string or a list of strings")
        use_image_id = self.image_processor.use_image_id if use_image_id is None else bool(use_image_id)

        image_counts = [sample.count(IMAGE_PATTERN) for sample in texts]
        audio_counts = [sample.count(AUDIO_PATTERN) for sample in texts]
        is_image = lambda value: not isinstance(value, (list, tuple))  # noqa: E731
        images_per_sample = _split_per_sample(images, image_counts, is_image, "image", IMAGE_PATTERN)
        audio_per_sample = _split_per_sample(audio, audio_counts, _is_waveform, "audio", AUDIO_PATTERN)

        if sampling_rate is not None and int(sampling_rate) != self.feature_extractor.sampling_rate:
            raise UnsupportedSamplingRateError(
                f"audio sampling rate is {sampling_rate} Hz but MiniCPM-o needs "
                f"{self.feature_extractor.sampling_rate} Hz; resample it (apply_chat_template does this for files)"
            )

        strips, tgt_sizes, waveforms, expanded_texts, slices_per_sample = [], [], [], [], []
        for sample, sample_images, sample_audio in zip(texts, images_per_sample, audio_per_sample):
            image_parts, audio_parts, sample_slices = [], [], 0
            for image in sample_images:
                sliced = self.image_processor.preprocess([load_image(image)], max_slice_nums=max_slice_nums)
                strips.extend(sliced["pixel_values"][0])
                tgt_sizes.append(sliced["tgt_sizes"][0])
                sample_slices += len(sliced["tgt_sizes"][0])
                image_parts.append(
                    self.image_processor.placeholder_text(sliced["grids"][0], len(image_parts), use_image_id)
                )
            slices_per_sample.append(sample_slices)
            for waveform in sample_audio:
                if isinstance(waveform, (str, os.PathLike)):
                    waveform = load_audio(waveform)  # local file: mono, resampled to 16 kHz
                waveform = validate_waveform(waveform, name=f"audio[{len(waveforms)}]")
                waveforms.append(waveform)
                audio_parts.append(self.audio_placeholder_text(waveform.shape[0]))
            pieces, image_iter, audio_iter = _PATTERN_RE.split(sample), iter(image_parts), iter(audio_parts)
            expanded_texts.append(
                "".join(
                    next(image_iter) if piece == IMAGE_PATTERN else next(audio_iter) if piece == AUDIO_PATTERN else piece
                    for piece in pieces
                )
            )

        data: dict[str, Any] = {}
        if ref_audio is not None:
            data["ref_audio"] = validate_waveform(load_audio(ref_audio) if isinstance(ref_audio, (str, os.PathLike))
                                                  else ref_audio, name="ref_audio")
        if waveforms:
            features = self.feature_extractor(waveforms)
            data["input_features"] = features["input_features"]
            data["input_features_mask"] = features["input_features_mask"]
        if strips:
            data["pixel_values"] = stack_patch_strips(strips)
            data["tgt_sizes"] = np.concatenate(tgt_sizes, axis=0).astype(np.int64)

        input_ids = self._tokenize(expanded_texts, add_special_tokens, max_length)
        self._check_slot_groups(input_ids, slices_per_sample, audio_counts)
        data["input_ids"], data["attention_mask"] = self._pad(input_ids, padding_side)
        return BatchFeature(data=data, tensor_type=return_tensors)

    def frame_inputs(self, frame, max_slice_nums: int = 1) -> BatchFeature:
        """One duplex video frame -> pixel_values [n, 3, p, L*p] and tgt_sizes [n, 2] tensors (448-class, no slicing)."""
        sliced = self.image_processor.preprocess([load_image(frame)], max_slice_nums=max_slice_nums)
        data = {"pixel_values": stack_patch_strips(sliced["pixel_values"][0]),
                "tgt_sizes": np.asarray(sliced["tgt_sizes"][0], dtype=np.int64)}
        return BatchFeature(data=data, tensor_type="pt")

    def _tokenize(self, texts: list[str], add_special_tokens: bool, max_length: int | None) -> list[list[int]]:
        listen = self.special_tokens.listen
        encoded = self.tokenizer(texts, add_special_tokens=add_special_tokens)["input_ids"]
        input_ids = [[token for token in ids if token != listen] for ids in encoded]
        if max_length is not None:
            for index, ids in enumerate(input_ids):
                if len(ids) > max_length:
                    raise PromptTooLongError(
                        f"prompt {index} has {len(ids)} tokens after placeholder expansion, more than "
                        f"max_length={max_length}; shorten the text, use fewer/smaller images or shorter audio"
                    )
        return input_ids

    def _check_slot_groups(self, input_ids, slices_per_sample, audio_counts) -> None:
        """Raw special tokens typed into the text would shift the slots: refuse them with a clear message."""
        ids = self.special_tokens
        for index, (sample, n_slices, n_audio) in enumerate(zip(input_ids, slices_per_sample, audio_counts)):
            image_groups = sum(1 for token in sample if token in (ids.image_start, ids.slice_start))
            audio_groups = sum(1 for token in sample if token == ids.audio_start)
            if image_groups != n_slices:
                raise PlaceholderCountMismatchError(
                    f"sample {index} has {image_groups} <image>/<slice> groups but {n_slices} image slices; the "
                    f"text must not contain raw <image> or <slice> tokens, only {IMAGE_PATTERN}"
                )
            if audio_groups != n_audio:
                raise PlaceholderCountMismatchError(
                    f"sample {index} has {audio_groups} <|audio_start|> groups but {n_audio} audio inputs; the "
                    f"text must not contain raw <|audio_start|> tokens, only {AUDIO_PATTERN}"
                )

    def _pad(self, input_ids: list[list[int]], padding_side: str) -> tuple[list[list[int]], list[list[int]]]:
        pad_id = self.special_tokens.endoftext
        longest = max(len(ids) for ids in input_ids)
        padded, masks = [], []
        for ids in input_ids:
            fill = longest - len(ids)
            if padding_side == "left":
                padded.append([pad_id] * fill + ids)
                masks.append([0] * fill + [1] * len(ids))
            else:
                padded.append(ids + [pad_id] * fill)
                masks.append([1] * len(ids) + [0] * fill)
        return padded, masks

    # ---- chat -----------------------------------------------------------------------------------------------
    def apply_chat_template(self, conversation, chat_template: str | None = None, **kwargs):
        """transformers' `apply_chat_template`, with video items expanded into 1-fps frames + 1-s audio.

        Args:
            conversation: a list of messages (or a batch of lists); content is a string or a list of
                {"type": "text" | "image" | "audio" | "video", ...} items.
            chat_template: another Jinja template (default: the official MiniCPM-o 4.5 one).
            **kwargs: transformers' options (`tokenize`, `return_dict`, `add_generation_prompt`, `return_tensors`,
                `processor_kwargs` such as `{"max_slice_nums": 1}` with `tokenize=True`) and the template switches:
                `enable_thinking` (default False: "<think>\\n\\n</think>\\n\\n" is appended), `use_tts_template`
                (append "<|tts_bos|>"; on whenever any message holds audio, as the official chat()), `omni_mode`
                (join items with ""; on by default with videos). Explicit values are kept.

        Returns:
            The prompt string(s), or with `tokenize=True, return_dict=True` the processor's BatchFeature (see
            `__call__`).
        """
        is_batched = isinstance(conversation, (list, tuple)) and bool(conversation) and (
            isinstance(conversation[0], (list, tuple)) or hasattr(conversation[0], "messages")
        )
        conversations = [list(c) for c in conversation] if is_batched else [list(conversation)]
        if not all(conversations):
            raise ValueError("conversation is empty")
        expanded, any_video = [], False
        for messages in conversations:
            messages = [dict(message) for message in messages]
            for message in messages:
                self._check_content_types(message)
            messages, has_video = expand_video_items(messages)
            any_video = any_video or has_video
            expanded.append(messages)
        if any_video and "omni_mode" not in kwargs:
            kwargs["omni_mode"] = True
        if "use_tts_template" not in kwargs and any(messages_have_audio(messages) for messages in expanded):
            kwargs["use_tts_template"] = True  # official chat(): any audio in the messages ends the prompt in tts_bos
        return super().apply_chat_template(expanded if is_batched else expanded[0], chat_template, **kwargs)

    @staticmethod
    def _check_content_types(message: dict) -> None:
        content = message.get("content")
        if content is None or isinstance(content, str):
            return
        if not isinstance(content, (list, tuple)):
            raise UnsupportedContentTypeError(
                f"message content must be a string or a list of items, got {type(content).__name__}"
            )
        for item in content:
            if isinstance(item, str):
                continue
            item_type = item.get("type") if isinstance(item, dict) else None
            if item_type not in SUPPORTED_CONTENT_TYPES and item_type != "image_url":
                raise UnsupportedContentTypeError(
                    f"unsupported content type {item_type!r} in a {message.get('role')!r} message; "
                    f"expected one of {SUPPORTED_CONTENT_TYPES}"
                )

    def _multimodal_inputs_from_conversations(self, conversations, audio_loading_params, load_audio_from_video=False):
        """Load images (PIL or local path) and audio (16 kHz array or local file) in order of appearance.

        The first audio item of the system message is the reference voice: it is handed to `__call__` as
        `ref_audio` (for a batch, only when every conversation carries the same voice).
        """
        batch_images, batch_videos, batch_audios, voices = [], [], [], []
        for messages in conversations:
            images, voice = [], None
            for message in messages:
                content = message.get("content")
                if content is None or isinstance(content, str):
                    continue
                for item in content:
                    if isinstance(item, str) or item.get("type") == "text":
                        continue
                    item_type = item.get("type")
                    source = next((item[key] for key in (item_type, "path", "url", "base64") if key in item), None)
                    if source is None:
                        raise MediaLoadingError(f"{item_type} item has no {item_type!r} or 'path' entry: {item!r}")
                    if item_type == "image":
                        images.append(load_image(source))
                    elif item_type == "audio":
                        batch_audios.append(load_audio(source, item.get("sampling_rate")))
                        if voice is None and message.get("role") == "system":
                            voice = batch_audios[-1]
                    else:
                        raise UnsupportedContentTypeError(f"unsupported content type {item_type!r}")
            batch_images.append(images)
            batch_videos.append([])
            voices.append(voice)
        same_voice = all(v is not None and np.array_equal(np.asarray(v), np.asarray(voices[0])) for v in voices)
        return batch_images, batch_videos, batch_audios, ({"ref_audio": voices[0]} if voices and same_voice else {})
