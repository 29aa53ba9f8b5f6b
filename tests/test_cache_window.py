"""Dropping a span of a RoPE KV cache equals a fresh forward over the kept tokens at contiguous positions.

With one layer a cached key/value depends only on its token and position, so the equality is exact. In deeper
models the kept entries keep the context they were computed with (as in the official sliding window); only their
positions move.
"""

import pytest
import torch
from transformers import DynamicCache, Qwen3Config, Qwen3ForCausalLM

from minicpmo.modeling.modeling_cache_window import CacheWindowError, cache_nbytes, drop_cache_span


@pytest.fixture(scope="module")
def lm():
    torch.manual_seed(0)
    config = Qwen3Config(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=256)
    return Qwen3ForCausalLM(config).eval()


def test_drop_span_equals_recompute(lm):
    ids = torch.randint(0, 97, (1, 30))
    prefix, dropped, kept, new = ids[:, :5], ids[:, 5:17], ids[:, 17:24], ids[:, 24:]
    cache = DynamicCache(config=lm.config)
    with torch.no_grad():
        lm(input_ids=torch.cat([prefix, dropped, kept], 1), cache=cache, use_cache=True)
        before = cache_nbytes(cache)
        drop_cache_span(cache, start=5, length=dropped.shape[1], inv_freq=lm.model.rotary_emb.inv_freq)
        assert cache.get_seq_length() == 12 and cache_nbytes(cache) < before
        positions = torch.arange(12, 12 + new.shape[1]).unsqueeze(0)
        incremental = lm(input_ids=new, cache=cache, position_ids=positions, use_cache=True).logits
        fresh = lm(input_ids=torch.cat([prefix, kept, new], 1)).logits[:, -new.shape[1]:]
    torch.testing.assert_close(incremental, fresh, rtol=1e-4, atol=1e-5)


def test_without_rerotation_it_would_differ(lm):
    ids = torch.randint(0, 97, (1, 20))
    cache = DynamicCache(config=lm.config)
    with torch.no_grad():
        lm(input_ids=ids[:, :16], cache=cache, use_cache=True)
        drop_cache_span(cache, 2, 6, inv_freq=torch.zeros_like(lm.model.rotary_emb.inv_freq))  # no rotation
        positions = torch.arange(10, 14).unsqueeze(0)
        wrong = lm(input_ids=ids[:, 16:], cache=cache, position_ids=positions, use_cache=True).logits
        fresh = lm(input_ids=torch.cat([ids[:, :2], ids[:, 8:]], 1)).logits[:, -4:]
    assert not torch.allclose(wrong, fresh, atol=1e-4)


def test_out_of_range_is_a_typed_error(lm):
    cache = DynamicCache(config=lm.config)
    with torch.no_grad():
        lm(input_ids=torch.randint(0, 97, (1, 8)), cache=cache, use_cache=True)
    with pytest.raises(CacheWindowError, match="cannot drop"):
        drop_cache_span(cache, 4, 10, inv_freq=lm.model.rotary_emb.inv_freq)
