"""The official `MultiModalProjector`: Linear -> ReLU -> Linear, both biased.

It maps Whisper features into the LLM (`audio_projection_layer`) and LLM hidden states into the speech decoder
(`tts.projector_semantic`, `tts.projector_spk`); parameter names `linear1` / `linear2` are the official ones.
"""

import torch
from torch import nn


class MultiModalProjector(nn.Module):
    def __init__(self, in_dim: int, out_dim: int):
        super().__init__()
        self.linear1 = nn.Linear(in_dim, out_dim, bias=True)
        self.relu = nn.ReLU()
        self.linear2 = nn.Linear(out_dim, out_dim, bias=True)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.linear2(self.relu(self.linear1(hidden)))
