"""`attn_implementation="sdpa_gqa"`, the model's default: sdpa that keeps grouped-query attention inside the kernel.

transformers' sdpa passes `enable_gqa` only for unmasked calls (CUDA's fused kernels take no mask with it) and
otherwise repeats every key/value head `num_key_value_groups` times. A duplex unit is a masked multi-token forward
over the whole KV cache (its queries start after the cache, so `is_causal` cannot stand in for the mask), so each
unit copied the cache once per layer. On CPU, where sdpa's kernels accept a mask with `enable_gqa`, this function
calls sdpa with it instead; every other case (other devices, one query, no mask, no groups, position bias) is
transformers' own `sdpa_attention_forward`. Outputs equal sdpa's (tests/test_attention_gqa.py).
"""

from __future__ import annotations

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

SDPA_GQA = "sdpa_gqa"


def _kernel_takes_masked_gqa(query: torch.Tensor) -> bool:
    return query.device.type == "cpu"


def sdpa_gqa_attention_forward(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                               attention_mask: torch.Tensor | None, dropout: float = 0.0,
                               scaling: float | None = None, is_causal: bool | None = None,
                               **kwargs) -> tuple[torch.Tensor, None]:
    groups = getattr(module, "num_key_value_groups", 1)
    plain_sdpa = (groups == 1 or attention_mask is None or query.shape[2] == 1
                  or not _kernel_takes_masked_gqa(query) or kwargs.get("position_bias") is not None
                  or kwargs.get("softcap") is not None or kwargs.get("output_attentions", False))
    if plain_sdpa:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      is_causal=is_causal, **kwargs)
    output = torch.nn.functional.scaled_dot_product_attention(query, key, value, attn_mask=attention_mask,
                                                              dropout_p=dropout, scale=scaling, enable_gqa=True)
    return output.transpose(1, 2).contiguous(), None


AttentionInterface.register(SDPA_GQA, sdpa_gqa_attention_forward)
AttentionMaskInterface.register(SDPA_GQA, sdpa_mask)

__all__ = ["SDPA_GQA", "sdpa_gqa_attention_forward"]
