"""MiniCPM-o processing: tokenizer, image slicing, audio features, chat template and the processor."""

from .chat_template_minicpmo import CHAT_TEMPLATE, UnsupportedContentTypeError, render_chat_prompt
from .feature_extraction_minicpmo import (
    InvalidAudioError,
    MiniCPMOFeatureExtractor,
    MultiChannelAudioError,
    UnsupportedSamplingRateError,
    audio_token_count,
)
from .image_processing_minicpmo import (
    InvalidImageError,
    MiniCPMOImageProcessor,
    UnsupportedImageTypeError,
    image_placeholder_text,
)
from .media_loading_minicpmo import MediaLoadingError, load_audio, load_image
from .processing_minicpmo import MiniCPMOProcessor, PlaceholderCountMismatchError, PromptTooLongError
from .tokenization_minicpmo import MiniCPMOSpecialTokens, load_bad_token_ids, load_minicpmo_tokenizer

__all__ = [
    "CHAT_TEMPLATE",
    "InvalidAudioError",
    "InvalidImageError",
    "MediaLoadingError",
    "MiniCPMOFeatureExtractor",
    "MiniCPMOImageProcessor",
    "MiniCPMOProcessor",
    "MiniCPMOSpecialTokens",
    "MultiChannelAudioError",
    "PlaceholderCountMismatchError",
    "PromptTooLongError",
    "UnsupportedContentTypeError",
    "UnsupportedImageTypeError",
    "UnsupportedSamplingRateError",
    "audio_token_count",
    "image_placeholder_text",
    "load_audio",
    "load_bad_token_ids",
    "load_image",
    "load_minicpmo_tokenizer",
    "render_chat_prompt",
]
