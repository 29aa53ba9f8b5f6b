"""`output_hidden_states` for the encoder towers, which are plain modules run in chunks (not transformers models
with output recording): forward hooks collect the input of the first layer and the output of every layer."""

from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import nn


def _tensor(value):
    return value[0] if isinstance(value, (tuple, list)) else value


@contextmanager
def recorded_layer_states(layers: nn.ModuleList, enabled: bool):
    """Yields a list that, after the block, holds (embeddings, layer 1 output, ..., layer n output), the
    `hidden_states` tuple transformers encoders return (empty when not `enabled`). Run the tower once (one chunk)
    inside the block: the hooks record every call."""
    states: list[torch.Tensor] = []
    if not enabled or len(layers) == 0:
        yield states
        return
    handles = [layers[0].register_forward_pre_hook(lambda _m, args, kwargs: states.append(
        _tensor(args) if args else _tensor(next(iter(kwargs.values())))), with_kwargs=True)]
    handles += [layer.register_forward_hook(lambda _m, _args, output: states.append(_tensor(output)))
                for layer in layers]
    try:
        yield states
    finally:
        for handle in handles:
            handle.remove()


__all__ = ["recorded_layer_states"]
