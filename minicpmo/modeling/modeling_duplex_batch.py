"""Several duplex sessions' units through the LLM in one batch, each session keeping its own KV cache.

Why stack per unit instead of one shared batched cache: sessions join and leave between ticks, their caches grow at
different rates (a listening unit adds ~15 positions, a speaking one up to ~35) and each slides its own window, so
a persistent batched cache would need per-row holes and per-row window surgery. transformers' paged cache (continuous
batching) serves `generate` requests, not caller-driven KV surgery between forwards. Here each unit tick
left-pads the sessions' caches to one length (`stack_contexts`), runs prefill, decode steps and the closing forward
on that batch with a 2-D attention mask (padding and finished rows are masked keys; every row has its own RoPE
positions) and cuts each row's real positions back into its session's cache (`unstack_contexts`). Masked keys get
exactly zero attention weight, so each session's outputs are those it would get alone, up to float summation order.
Copying the caches costs O(sessions x cache) memory traffic per tick, small next to the unit's matmuls.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import DynamicCache

from ..errors import DuplexError


class BatchedDuplexError(DuplexError, ValueError):
    """A batch with no sessions, inputs that do not match its rows, or a recording context (not batched)."""


@dataclass
class StackedContexts:
    """Sessions' caches padded into one batch: `valid[b, t]` says whether column t holds a real position of row b."""

    cache: DynamicCache
    valid: torch.Tensor  # [B, T] bool
    next_positions: list  # each row's next RoPE position


def stack_contexts(contexts: list, config) -> StackedContexts:
    """Left-pad the contexts' caches (DuplexLLMContext) to the longest and concatenate them along the batch."""
    if not contexts:
        raise BatchedDuplexError("a batch needs at least one session")
    if any(context.sequence_ids is not None for context in contexts):
        raise BatchedDuplexError("recording sessions (record=True) are stepped alone, not in a batch")
    lengths = [context.cache.get_seq_length() for context in contexts]
    longest = max(lengths)
    stacked = DynamicCache(config=config)
    for layer_index in range(len(contexts[0].cache.layers)):
        keys, values = [], []
        for context, length in zip(contexts, lengths):
            own = context.cache.layers[layer_index]
            pad = longest - length
            keys.append(torch.nn.functional.pad(own.keys, (0, 0, pad, 0)))
            values.append(torch.nn.functional.pad(own.values, (0, 0, pad, 0)))
        stacked.update(torch.cat(keys), torch.cat(values), layer_index)
    device = contexts[0].cache.layers[0].keys.device
    columns = torch.arange(longest, device=device)
    valid = torch.stack([columns >= longest - length for length in lengths])
    return StackedContexts(stacked, valid, [context.next_position for context in contexts])


def unstack_contexts(stacked: StackedContexts, contexts: list) -> None:
    """Write each row's real positions back into its session's cache (in place) and its next position."""
    for row, context in enumerate(contexts):
        keep = stacked.valid[row].nonzero().squeeze(-1)
        for layer_index, layer in enumerate(stacked.cache.layers):
            own = context.cache.layers[layer_index]
            own.keys = layer.keys[row:row + 1].index_select(2, keep).contiguous()
            own.values = layer.values[row:row + 1].index_select(2, keep).contiguous()
            if hasattr(own, "cumulative_length"):
                own.cumulative_length = own.keys.shape[2]
        context.next_position = stacked.next_positions[row]


def batched_feed(model, stacked: StackedContexts, rows: list, logits: bool = True) -> tuple:
    """Feed each row its new positions in one forward: `rows[b]` is [L_b, H] embeddings, a 1-D tensor of ids, or None
    (nothing for that row: it is padded and masked). Returns (last hidden state of each fed row [B, H] or None per
    row, and their logits [B, V] unless `logits=False`); `stacked` grows by the longest row, padding masked."""
    if len(rows) != stacked.valid.shape[0]:
        raise BatchedDuplexError(f"{len(rows)} inputs for a batch of {stacked.valid.shape[0]} sessions")
    embed = model.model.get_input_embeddings()
    device = stacked.valid.device
    embedded = [None if row is None else (embed(row.to(device)) if row.dtype == torch.long else row.to(device))
                for row in rows]
    lengths = [0 if row is None else row.shape[0] for row in embedded]
    width = max(lengths)
    if width == 0:
        raise BatchedDuplexError("no row has anything to feed")
    hidden_size = model.config.hidden_size
    template = next(row for row in embedded if row is not None)
    padded = torch.stack([torch.nn.functional.pad(row, (0, 0, 0, width - row.shape[0])) if row is not None
                          else template.new_zeros(width, hidden_size) for row in embedded])
    steps = torch.arange(width, device=device)
    new_valid = torch.stack([steps < length for length in lengths])
    positions = torch.stack([start + steps for start in stacked.next_positions])
    mask = torch.cat((stacked.valid, new_valid), dim=1)
    out = model.model.language_model(inputs_embeds=padded, attention_mask=mask.long(), position_ids=positions,
                                     cache=stacked.cache, use_cache=True)
    stacked.valid = mask
    stacked.next_positions = [start + length for start, length in zip(stacked.next_positions, lengths)]
    ends = torch.tensor(lengths, device=device).clamp(min=1) - 1
    last = out.last_hidden_state[torch.arange(len(rows), device=device), ends]
    hidden = [last[row] if length else None for row, length in enumerate(lengths)]
    if not logits:
        return hidden, None
    head = model.lm_head(last)
    return hidden, [head[row] if length else None for row, length in enumerate(lengths)]


__all__ = ["BatchedDuplexError", "StackedContexts", "batched_feed", "stack_contexts", "unstack_contexts"]
