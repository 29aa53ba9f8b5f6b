"""Conventions of transformers 5.24 models that tools rely on (issue: "Behaves like a transformers model"), in the
style of transformers' model tests: a ModelTester builds a tiny config and inputs; each test checks one convention
against the model's own dict outputs."""

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from minicpmo import MiniCPMOForConditionalGeneration, tiny_config  # noqa: E402


class MiniCPMOModelTester:
    """Tiny text-only inputs for the full model and its bare backbone."""

    def __init__(self, batch_size: int = 2, seq_length: int = 7, seed: int = 0):
        self.batch_size, self.seq_length, self.seed = batch_size, seq_length, seed

    def prepare_config_and_inputs(self):
        config = tiny_config()
        generator = torch.Generator().manual_seed(self.seed)
        input_ids = torch.randint(0, 1000, (self.batch_size, self.seq_length), generator=generator)
        return config, {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids)}

    def model(self, config):
        torch.manual_seed(self.seed)
        return MiniCPMOForConditionalGeneration(config).eval()


@pytest.fixture(scope="module")
def tester():
    return MiniCPMOModelTester()


def test_return_dict_false_gives_the_tuple_of_the_dict_outputs(tester):
    config, inputs = tester.prepare_config_and_inputs()
    model = tester.model(config)
    with torch.no_grad():
        as_dict = model(**inputs, labels=inputs["input_ids"])
        as_tuple = model(**inputs, labels=inputs["input_ids"], return_dict=False)
        bare_dict = model.model(**inputs)
        bare_tuple = model.model(**inputs, return_dict=False)
    assert isinstance(as_tuple, tuple) and isinstance(bare_tuple, tuple)
    expected = as_dict.to_tuple()
    assert len(as_tuple) == len(expected)
    for got, want in zip(as_tuple[:2], expected[:2]):  # loss, logits
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    torch.testing.assert_close(bare_tuple[0], bare_dict.last_hidden_state, rtol=0, atol=0)


def test_past_key_values_is_accepted_as_the_cache_and_continues_the_prompt(tester):
    from transformers import DynamicCache

    config, inputs = tester.prepare_config_and_inputs()
    model = tester.model(config)
    ids = inputs["input_ids"]
    with torch.no_grad():
        full = model(input_ids=ids).logits
        first = model(input_ids=ids[:, :4], past_key_values=DynamicCache(config=config), use_cache=True)
        second = model(input_ids=ids[:, 4:], past_key_values=first.cache, use_cache=True)
        via_cache = model(input_ids=ids[:, 4:], cache=model(input_ids=ids[:, :4], use_cache=True).cache,
                          use_cache=True)
    assert first.cache.get_seq_length() == 4 + ids.shape[1] - 4  # the same cache object grew
    torch.testing.assert_close(second.logits, full[:, 4:], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(via_cache.logits, second.logits, rtol=0, atol=0)
    used, ignored = DynamicCache(config=config), DynamicCache(config=config)
    with pytest.warns(FutureWarning, match="Both `past_key_values` and `cache` are set"):  # as 5.24's Qwen3 does
        model(input_ids=ids, cache=used, past_key_values=ignored, use_cache=True)
    assert used.get_seq_length() == ids.shape[1] and ignored.get_seq_length() == 0
