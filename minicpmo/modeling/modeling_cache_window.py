"""Sliding-window surgery on a transformers `DynamicCache` whose keys carry RoPE (Qwen3 / Llama).

Long duplex sessions must keep the KV cache bounded. Dropping a span of old positions leaves the later keys
rotated for positions that no longer exist; because RoPE is a rotation, shifting them back by the number of
dropped positions (`k' = R(-n) k`) gives exactly the keys a fresh forward at contiguous positions would produce.
Values carry no position and are just cut.
"""

import torch
from transformers import DynamicCache

from ..errors import ContextLengthError


class CacheWindowError(ContextLengthError):
    """A requested cache span is out of range."""


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    first, second = x.chunk(2, dim=-1)
    return torch.cat((-second, first), dim=-1)


def rerotate_keys(keys: torch.Tensor, shift: int, inv_freq: torch.Tensor) -> torch.Tensor:
    """Move RoPE keys [B, H, T, D] by `shift` positions (negative = earlier); a pure rotation keeps any scaling."""
    angles = shift * inv_freq.to(device=keys.device, dtype=torch.float32)
    angles = torch.cat((angles, angles), dim=-1)
    return keys * angles.cos().to(keys.dtype) + _rotate_half(keys) * angles.sin().to(keys.dtype)


def drop_cache_span(cache: DynamicCache, start: int, length: int, inv_freq: torch.Tensor) -> None:
    """Remove cache positions [start, start + length) in place and re-rotate the later keys to close the gap."""
    if length <= 0:
        return
    total = cache.get_seq_length()
    if start < 0 or start + length > total:
        raise CacheWindowError(f"cannot drop positions [{start}, {start + length}) from a cache of {total}")
    for layer in cache.layers:
        keys, values = layer.keys, layer.values
        tail_keys = rerotate_keys(keys[:, :, start + length :], -length, inv_freq)
        layer.keys = torch.cat((keys[:, :, :start], tail_keys), dim=2)
        layer.values = torch.cat((values[:, :, :start], values[:, :, start + length :]), dim=2)
        if hasattr(layer, "cumulative_length"):
            layer.cumulative_length = layer.keys.shape[2]


def cache_nbytes(cache: DynamicCache) -> int:
    """Bytes held by all keys and values (for memory bounds in tests and benchmarks)."""
    total = 0
    for layer in cache.layers:
        for tensor in (getattr(layer, "keys", None), getattr(layer, "values", None)):
            if isinstance(tensor, torch.Tensor):
                total += tensor.numel() * tensor.element_size()
    return total
