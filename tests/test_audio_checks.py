"""One waveform check for every audio entry point: the same bad input gets the same typed error everywhere."""

import numpy as np
import pytest
import torch

from minicpmo.audio_utils import (
    AudioDtypeError,
    EmptyAudioError,
    InvalidAudioError,
    MultiChannelAudioError,
    NonFiniteAudioError,
    mono_waveform,
)


def test_accepted_containers_shapes_and_pcm_scaling():
    samples = np.linspace(-0.5, 0.5, 800, dtype=np.float32)
    for value in (samples, samples[None], samples[:, None], torch.from_numpy(samples), samples.tolist()):
        out = mono_waveform(value)
        assert out.dtype == torch.float32 and out.shape == (800,)
        torch.testing.assert_close(out, torch.from_numpy(samples))
    torch.testing.assert_close(mono_waveform(np.array([-32768, 16384], np.int16)), torch.tensor([-1.0, 0.5]))
    torch.testing.assert_close(mono_waveform(np.array([2**30], np.int32)), torch.tensor([0.5]))
    assert mono_waveform(np.zeros(4, np.float64)).dtype == torch.float32


@pytest.mark.parametrize(
    "value, error, message",
    [
        (np.zeros((2, 800), np.float32), MultiChannelAudioError, "multi-channel audio is not supported, pass mono"),
        (np.zeros((2, 2, 800), np.float32), InvalidAudioError, "1-D mono"),
        (np.zeros(0, np.float32), EmptyAudioError, "empty"),
        (np.array([0.0, np.inf], np.float32), NonFiniteAudioError, "NaN or infinite"),
        (np.zeros(8, np.uint8), AudioDtypeError, "unsupported dtype uint8"),
        (torch.zeros(8, dtype=torch.bool), AudioDtypeError, "unsupported dtype bool"),
        ("talk.wav", AudioDtypeError, "numpy array or torch tensor"),
    ],
)
def test_every_entry_point_raises_the_same_error(value, error, message):
    from minicpmo.modeling.audio_frontends_token2wav import kaldi_fbank_16k
    from minicpmo.modeling.modeling_speech_tokenizer import log_mel_128
    from minicpmo.processing.feature_extraction_minicpmo import validate_waveform

    for check in (mono_waveform, validate_waveform, log_mel_128, kaldi_fbank_16k):
        with pytest.raises(error, match=message):
            check(value)
    assert issubclass(error, InvalidAudioError)
    assert issubclass(AudioDtypeError, TypeError)
