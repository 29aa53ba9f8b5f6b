"""attn_implementation="sdpa_gqa" (the default): sdpa's own grouped-query attention on masked multi-token forwards,
equal to transformers' sdpa, without the repeated key/value copy."""

import numpy as np
import pytest
import torch
from helpers import processor, tiny_model, tone
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from minicpmo import MiniCPMOForConditionalGeneration, tiny_config
from minicpmo.modeling.attention_gqa import SDPA_GQA, sdpa_gqa_attention_forward


class _GroupedAttention(torch.nn.Module):
    num_key_value_groups = 3
    is_causal = True


def _qkv_and_mask(q_len=5, cached=7, heads=6, kv_heads=2, dim=8, seed=0):
    generator = torch.Generator().manual_seed(seed)
    kv_len = cached + q_len
    query = torch.randn(2, heads, q_len, dim, generator=generator)
    key, value = (torch.randn(2, kv_heads, kv_len, dim, generator=generator) for _ in range(2))
    # queries after a cache: query i sees keys 0 .. cached + i (the duplex unit layout), batch row 1 left-padded
    allowed = torch.arange(kv_len)[None, :] <= cached + torch.arange(q_len)[:, None]
    mask = allowed[None, None].repeat(2, 1, 1, 1)
    mask[1, :, :, :2] = False
    return query, key, value, mask


def test_masked_multi_token_attention_equals_sdpa_and_keeps_kv_heads_unrepeated(monkeypatch):
    query, key, value, mask = _qkv_and_mask()
    module = _GroupedAttention()
    expected, _ = sdpa_attention_forward(module, query, key, value, mask, scaling=0.3)
    seen = []
    kernel = torch.nn.functional.scaled_dot_product_attention

    def recording_kernel(q, k, v, **kwargs):
        seen.append((k.shape[1], kwargs.get("enable_gqa", False)))
        return kernel(q, k, v, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", recording_kernel)
    got, _ = sdpa_gqa_attention_forward(module, query, key, value, mask, scaling=0.3)
    assert seen == [(2, True)]  # the two key/value heads go in as they are
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6)
    assert got.shape == (2, 5, 6, 8)


@pytest.mark.parametrize("case", ["one_query", "no_mask"])
def test_other_calls_are_transformers_sdpa_unchanged(case):
    query, key, value, mask = _qkv_and_mask(q_len=1 if case == "one_query" else 5, cached=0 if case == "no_mask" else 7)
    mask = None if case == "no_mask" else mask
    module = _GroupedAttention()
    expected, _ = sdpa_attention_forward(module, query, key, value, mask, is_causal=True)
    got, _ = sdpa_gqa_attention_forward(module, query, key, value, mask, is_causal=True)
    torch.testing.assert_close(got, expected, rtol=0, atol=0)


def test_models_default_to_sdpa_gqa_and_an_explicit_choice_is_kept():
    assert tiny_model().config._attn_implementation == SDPA_GQA
    assert tiny_model().model.vpm.config._attn_implementation == SDPA_GQA  # towers follow (and fall back to sdpa)
    for explicit in ("sdpa", "eager"):
        config = tiny_config()
        config._attn_implementation = explicit
        assert MiniCPMOForConditionalGeneration(config).config._attn_implementation == explicit


def test_duplex_session_and_chat_logits_equal_plain_sdpa():
    gqa, plain = tiny_model(), tiny_model(0, "sdpa")
    assert plain.config._attn_implementation == "sdpa"
    controls = dict(record=True, generate_audio=False, force_listen_count=1, listen_bias=-5.0,
                    max_speak_tokens_per_unit=4)
    rng = np.random.default_rng(0)
    chunks = [(0.05 * rng.standard_normal(16000)).astype(np.float32) + tone(1.0, 300 + 60 * k) for k in range(3)]
    runs = []
    for model in (gqa, plain):
        session = model.duplex_session(processor(), **controls)
        outputs = [session.step(chunk) for chunk in chunks]
        runs.append(([o.token_ids for o in outputs], session.state.llm.decision_logits))
    assert runs[0][0] == runs[1][0]
    for a, b in zip(runs[0][1], runs[1][1]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    ids = processor().tokenizer("Hello there, how are you today?", return_tensors="pt").input_ids
    with torch.no_grad():
        prefix = [model(input_ids=ids[:, :4], use_cache=True) for model in (gqa, plain)]
        rest = [model(input_ids=ids[:, 4:], cache=out.past_key_values).logits
                for model, out in zip((gqa, plain), prefix)]
    torch.testing.assert_close(rest[0], rest[1], rtol=1e-5, atol=1e-5)
