"""Finding multimodal slots in a token sequence and pouring encoder features into them.

The official prompts mark every image slice and audio piece with a span of `<unk>` tokens between an opening
and a closing token (`<image>`/`<slice>` ... `</image>`/`</slice>`, `<|audio_start|>` ... `<|audio_end|>`). The
slots are found from the ids alone, so left padding, batching and truncation need no extra bookkeeping, and the
n-th feature row fills the n-th slot in reading order (row-major over the batch).
"""

import torch

from ..errors import PromptError


class PlaceholderMismatchError(PromptError):
    """The number of placeholder slots in the prompt differs from the number of encoder features."""


def span_slot_mask(input_ids: torch.LongTensor, open_ids, close_ids, slot_id: int) -> torch.BoolTensor:
    """True where `input_ids` holds `slot_id` inside an open...close span."""
    open_ids = torch.as_tensor(list(open_ids), device=input_ids.device)
    close_ids = torch.as_tensor(list(close_ids), device=input_ids.device)
    depth = torch.isin(input_ids, open_ids).long().cumsum(-1) - torch.isin(input_ids, close_ids).long().cumsum(-1)
    return (depth > 0) & (input_ids == slot_id)


def scatter_into_slots(
    inputs_embeds: torch.Tensor, slot_mask: torch.BoolTensor, features: torch.Tensor, modality: str
) -> torch.Tensor:
    """Out-of-place replacement of the slot embeddings (PEFT input-grad hooks forbid in-place writes)."""
    n_slots = int(slot_mask.sum())
    n_features = features.shape[0]
    if n_slots != n_features:
        raise PlaceholderMismatchError(
            f"{modality}: the prompt has {n_slots} placeholder slots but the encoder produced {n_features} "
            f"feature vectors; build prompts with MiniCPMOProcessor so placeholder counts match the inputs"
        )
    if n_slots == 0:
        return inputs_embeds
    features = features.to(device=inputs_embeds.device, dtype=inputs_embeds.dtype)
    return inputs_embeds.masked_scatter(slot_mask.unsqueeze(-1).expand_as(inputs_embeds), features)
