"""minicpmo: MiniCPM-o 4.5 native to transformers 5.

Importing the package registers the classes with the Auto API, so `AutoModel.from_pretrained(folder)` and
`AutoProcessor.from_pretrained(folder)` resolve to this code without `trust_remote_code`.
"""

from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForImageTextToText,
    AutoProcessor,
    AutoTokenizer,
)

from .configuration.configuration_minicpmo import (
    MiniCPMOConfig,
    MiniCPMOConfigError,
    MiniCPMTTSConfig,
    MiniCPMVSliceConfig,
)
from .configuration.configuration_presets import demo_config, official_config, tiny_config
from .duplex import DuplexConfig, DuplexOutput, DuplexSession
from .errors import (
    AudioInputError,
    CheckpointError,
    ConfigError,
    ContextLengthError,
    DataFormatError,
    DuplexError,
    ImageInputError,
    MiniCPMOError,
    PromptError,
    SpaceError,
    SpeechOutputError,
    SyntheticDataError,
    TrainingError,
)
from .modeling.modeling_minicpmo import (
    MiniCPMOForConditionalGeneration,
    MiniCPMOModel,
    MiniCPMOPreTrainedModel,
)
from .modeling.modeling_multimodal_merge import PlaceholderMismatchError
from .processing.processing_minicpmo import MiniCPMOProcessor
from .quantization import QuantizationError, quantization_config
from .processing.tokenization_minicpmo import MiniCPMOTokenizerFast

AutoConfig.register(MiniCPMOConfig.model_type, MiniCPMOConfig, exist_ok=True)
for _auto in (AutoModel, AutoModelForCausalLM, AutoModelForImageTextToText):
    _auto.register(MiniCPMOConfig, MiniCPMOForConditionalGeneration, exist_ok=True)
AutoProcessor.register(MiniCPMOConfig, MiniCPMOProcessor, exist_ok=True)
AutoTokenizer.register(MiniCPMOConfig, fast_tokenizer_class=MiniCPMOTokenizerFast, exist_ok=True)

__all__ = [
    "QuantizationError",
    "quantization_config",
    "AudioInputError",
    "CheckpointError",
    "ConfigError",
    "ContextLengthError",
    "DataFormatError",
    "DuplexError",
    "ImageInputError",
    "MiniCPMOError",
    "PromptError",
    "SpaceError",
    "SpeechOutputError",
    "SyntheticDataError",
    "TrainingError",
    "DuplexConfig",
    "DuplexOutput",
    "DuplexSession",
    "MiniCPMOConfig",
    "MiniCPMOConfigError",
    "MiniCPMOForConditionalGeneration",
    "MiniCPMOModel",
    "MiniCPMOPreTrainedModel",
    "MiniCPMOProcessor",
    "MiniCPMOTokenizerFast",
    "MiniCPMTTSConfig",
    "MiniCPMVSliceConfig",
    "PlaceholderMismatchError",
    "official_config",
    "tiny_config",
    "demo_config",
]
