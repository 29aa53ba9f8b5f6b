"""One exception tree: every error class of minicpmo/ and finetune/ derives from `MiniCPMOError` via one family.

The classes are discovered by importing every module of both packages, so a new error class that forgets its
family (or reuses another class's name) fails here. A few real calls check that the family is the one a caller
would expect and that the message still names the bad value.
"""

import importlib
import os
import pkgutil

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import pytest  # noqa: E402

import finetune  # noqa: E402
import minicpmo  # noqa: E402
from minicpmo.errors import (  # noqa: E402
    FAMILIES,
    AudioInputError,
    ConfigError,
    ContextLengthError,
    ImageInputError,
    MiniCPMOError,
    PromptError,
)

PACKAGES = (minicpmo, finetune)
OPTIONAL_DEPENDENCIES = ("vector_quantize_pytorch", "onnx", "onnxruntime", "matplotlib")
# Error classes in files that are being moved (the duplex package); re-based with their move. Empty this set then.


def _import_all_modules() -> list[str]:
    """Import every module of minicpmo/ and finetune/; return the names skipped for a missing optional package."""
    skipped = []
    for package in PACKAGES:
        for info in pkgutil.walk_packages(package.__path__, package.__name__ + "."):
            if info.name.rsplit(".", 1)[-1] == "__main__":  # importing it would run the command
                continue
            try:
                importlib.import_module(info.name)
            except ModuleNotFoundError as error:
                if (error.name or "").split(".")[0] not in OPTIONAL_DEPENDENCIES:
                    raise
                skipped.append(info.name)
    return skipped


def _subclasses(cls: type) -> set[type]:
    found = set()
    for sub in cls.__subclasses__():
        found |= {sub} | _subclasses(sub)
    return found


@pytest.fixture(scope="module")
def error_classes() -> list[type]:
    _import_all_modules()
    roots = {package.__name__ for package in PACKAGES}
    classes = [cls for cls in _subclasses(BaseException) if cls.__module__.split(".")[0] in roots]
    return sorted(classes, key=lambda cls: (cls.__module__, cls.__qualname__))


def test_every_error_class_derives_from_one_family(error_classes):
    assert len(error_classes) > 60  # the discovery really found the package's classes
    orphans = [f"{cls.__module__}.{cls.__qualname__}" for cls in error_classes
               if not issubclass(cls, MiniCPMOError)]
    assert not orphans, f"error classes outside the MiniCPMOError tree: {orphans}"
    for cls in error_classes:
        if cls is MiniCPMOError or cls in FAMILIES or not issubclass(cls, MiniCPMOError):
            continue
        families = [family for family in FAMILIES if issubclass(cls, family)]
        assert len(families) == 1, f"{cls.__qualname__} is in families {families}"


def test_families_are_the_direct_children_of_the_root():
    assert issubclass(MiniCPMOError, ValueError)
    assert set(MiniCPMOError.__subclasses__()) == set(FAMILIES)
    assert 6 <= len(FAMILIES) <= 14
    for family in FAMILIES:
        assert family.__module__ == "minicpmo.errors"
        assert family.__doc__ and "\n" not in family.__doc__.strip(), f"{family.__name__} needs a one-line docstring"
        assert getattr(minicpmo, family.__name__) is family  # exported from the package
    assert minicpmo.MiniCPMOError is MiniCPMOError


def test_no_two_error_classes_share_a_name(error_classes):
    by_name = {}
    for cls in error_classes:
        by_name.setdefault(cls.__name__, []).append(f"{cls.__module__}.{cls.__qualname__}")
    duplicates = {name: where for name, where in by_name.items() if len(where) > 1}
    assert not duplicates, f"error classes with the same name: {duplicates}"


def test_extra_builtin_bases_are_kept():
    from minicpmo.audio_utils import AudioDtypeError
    from minicpmo.processing.image_processing_minicpmo import UnsupportedImageTypeError
    from minicpmo.space.live_sessions import LiveSessionClosed, LiveSessionsBusy

    assert issubclass(AudioDtypeError, (AudioInputError)) and issubclass(AudioDtypeError, TypeError)
    assert issubclass(UnsupportedImageTypeError, ImageInputError) and issubclass(UnsupportedImageTypeError, TypeError)
    assert issubclass(LiveSessionsBusy, RuntimeError) and issubclass(LiveSessionClosed, RuntimeError)


def test_moved_families_still_import_from_their_old_homes():
    from minicpmo.modeling.modeling_audio import AudioInputError as from_audio
    from minicpmo.modeling.modeling_minicpmo import ContextLengthError as from_model
    from minicpmo.modeling.modeling_speech_output import SpeechOutputError as from_speech

    assert from_audio is AudioInputError and from_model is ContextLengthError
    assert from_speech is minicpmo.SpeechOutputError


# ------------------------------------------------------------------------------------------------- real calls


@pytest.fixture(scope="module")
def processor():
    return minicpmo.MiniCPMOProcessor.from_defaults()


def _tone(seconds: float = 1.0) -> np.ndarray:
    return (0.1 * np.random.default_rng(0).standard_normal(int(seconds * 16000))).astype(np.float32)


def test_processor_errors_fall_in_the_expected_families(processor):
    from minicpmo.audio_utils import MultiChannelAudioError
    from minicpmo.processing.feature_extraction_minicpmo import UnsupportedSamplingRateError
    from minicpmo.processing.processing_minicpmo import PlaceholderCountMismatchError, PromptTooLongError

    stereo = np.zeros((2, 16000), np.float32)
    with pytest.raises(AudioInputError, match=r"shape \(2, 16000\).*pass mono") as caught:
        processor(text="<audio>./</audio>", audio=[stereo])
    assert isinstance(caught.value, MultiChannelAudioError)
    with pytest.raises(AudioInputError, match="8000") as caught:
        processor(text="<audio>./</audio>", audio=[_tone()], sampling_rate=8000)
    assert isinstance(caught.value, UnsupportedSamplingRateError)
    with pytest.raises(PromptError, match="no image") as caught:
        processor(text="<image>./</image>")
    assert isinstance(caught.value, PlaceholderCountMismatchError)
    with pytest.raises(ContextLengthError, match="max_length=5") as caught:
        processor(text="a fairly long prompt " * 10, max_length=5)
    assert isinstance(caught.value, PromptTooLongError)


def test_image_config_and_recipe_errors_fall_in_the_expected_families(processor):
    from finetune.config import RecipeError, recipe_from_dict
    from minicpmo.configuration.configuration_minicpmo import MiniCPMOConfigError

    with pytest.raises(ImageInputError, match="str") as caught:
        processor.image_processor("not-an-image")
    assert isinstance(caught.value, TypeError)  # UnsupportedImageTypeError keeps its TypeError base
    with pytest.raises(ConfigError, match="query_num") as caught:
        minicpmo.tiny_config(query_num=0)
    assert isinstance(caught.value, MiniCPMOConfigError)
    with pytest.raises(ConfigError, match="unknown recipe keys") as caught:
        recipe_from_dict({"model": "m", "data": {"train": "t"}, "optimizer": {}})
    assert isinstance(caught.value, RecipeError)
    # one `except` for all of them
    with pytest.raises(MiniCPMOError):
        minicpmo.tiny_config(audio_pool_step=0)
