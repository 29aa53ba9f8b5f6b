"""`OmniSFTTrainer`: TRL's `SFTTrainer` plus the speech-decoder loss, from one LLM forward.

loss = text_loss_weight x (TRL's text loss, fused LM head, unchanged) + speech_loss_weight x speech loss.
With `labelled_logits_only=True` the text loss is instead computed from the LM head at the labelled positions
only (`labelled_cross_entropy`, same value, no TRL entropy/accuracy metrics).

When a batch carries `speech_*` targets (collators `speech` and `duplex`, see speech_targets), the trainer pops
them, lets `SFTTrainer.compute_loss` run the model as usual and catches the LLM's final-norm hidden states
(`model.model`'s `last_hidden_state`) from that same forward with a forward hook. It gathers them at the spoken
positions and runs the speech decoder with teacher forcing (`MiniCPMOSpeechDecoder.teacher_forced_forward`), so
gradients reach the speech decoder and, through `projector_semantic`, the LLM. Batches without speech targets take
exactly TRL's path.

The speech loss is the mean cross-entropy over the batch's code targets; with gradient accumulation it is divided
by the number of accumulation steps (TRL does the same with its MoE auxiliary loss). `speech_loss` and
`text_loss` are logged next to `loss`.

Multi-GPU: the speech decoder runs outside the DDP-wrapped forward, so set `ddp_find_unused_parameters: false`
(every trainable parameter then gets a gradient each step: keep a speech target in every batch).
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
from trl import SFTTrainer

from minicpmo.errors import TrainingError

from .labels import IGNORE_INDEX
from .speech_targets import SPEECH_KEYS, speech_sequences


class SpeechTrainingError(TrainingError):
    """Speech targets in a batch for a model that cannot use them (no speech decoder, no backbone)."""


class OmniSFTTrainer(SFTTrainer):
    """`SFTTrainer` whose loss adds the speech decoder's teacher-forced loss (see module docstring).

    Extra arguments: `speech_loss_weight` (default 1.0), `text_loss_weight` (default 1.0) and
    `labelled_logits_only`. The data collator is used as given: a speech collator that encodes target audio is
    built with its speech tokenizer (`finetune.sft.build_trainer` passes the model's `token2wav.speech_tokenizer`).
    """

    def __init__(self, *args, speech_loss_weight: float = 1.0, text_loss_weight: float = 1.0,
                 labelled_logits_only: bool = False, **kwargs):
        super().__init__(*args, **kwargs)
        self.speech_loss_weight = float(speech_loss_weight)
        self.text_loss_weight = float(text_loss_weight)
        self.labelled_logits_only = bool(labelled_logits_only)

    def _core_model(self, model):
        """The `MiniCPMOForConditionalGeneration` inside DDP / PEFT wrappers (LoRA layers stay in place)."""
        model = self.accelerator.unwrap_model(model)
        if hasattr(model, "get_base_model"):
            model = model.get_base_model()
        return model

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        targets = {key: inputs.pop(key) for key in SPEECH_KEYS if key in inputs}
        has_speech = bool(targets) and targets["speech_row"].numel() > 0
        if not has_speech and not self.labelled_logits_only:
            return super().compute_loss(model, inputs, return_outputs=return_outputs,
                                        num_items_in_batch=num_items_in_batch)
        core = self._core_model(model)
        if has_speech and getattr(core, "tts", None) is None:
            raise SpeechTrainingError("the batch has speech targets but the model has no speech decoder (`tts`)")
        if not hasattr(core, "model"):
            raise SpeechTrainingError("the model has no `model` backbone whose hidden states the losses read")
        with capture_last_hidden_state(core) as captured:
            if self.labelled_logits_only:
                labels = inputs.pop("labels")
                outputs = model(**inputs, logits_to_keep=1)
            else:
                result = super().compute_loss(model, inputs, return_outputs=return_outputs,
                                              num_items_in_batch=num_items_in_batch)
        if not captured:
            raise SpeechTrainingError("the LLM backbone did not run, so there are no hidden states for the losses")
        if self.labelled_logits_only:
            text_loss = labelled_cross_entropy(core.get_output_embeddings(), captured[0], labels, num_items_in_batch)
        else:
            text_loss, outputs = result if return_outputs else (result, None)
        loss = self.text_loss_weight * text_loss
        mode = "train" if self.model.training else "eval"
        if has_speech:
            sequences = speech_sequences(targets, inputs["input_ids"], captured[0])
            speech = core.tts.teacher_forced_forward(sequences).loss
            steps = self.current_gradient_accumulation_steps if num_items_in_batch is not None else 1
            loss = loss + self.speech_loss_weight * speech.to(text_loss.device) / steps
            self._metrics[mode]["speech_loss"].append(float(speech.detach()))
        self._metrics[mode]["text_loss"].append(float(text_loss.detach()))
        return (loss, outputs) if return_outputs else loss


@contextmanager
def capture_last_hidden_state(core):
    """Within the block, the first forward of `core.model` (the MiniCPMOModel backbone) appends its final-norm
    `last_hidden_state` to the yielded list: the losses read it without asking the model for full logits."""
    captured: list[torch.Tensor] = []

    def keep_first(module, args, output):
        if not captured:
            captured.append(output.last_hidden_state)

    handle = core.model.register_forward_hook(keep_first)
    try:
        yield captured
    finally:
        handle.remove()


def labelled_cross_entropy(lm_head, hidden: torch.Tensor, labels: torch.Tensor, num_items_in_batch=None) -> torch.Tensor:
    """The causal LM loss from the LM head at labelled positions only (position t predicts label t + 1).

    Same value as the full-logit loss. Duplex batches label a few control/text tokens among thousands of
    positions; on CPU, TRL's chunked fused head still walks every position (measured ~6x slower than this on the
    demo model), so small-model recipes set `labelled_logits_only: true`. Sum over tokens divided by
    `num_items_in_batch` when given (gradient accumulation), else the mean."""
    targets = labels[:, 1:]
    keep = targets != IGNORE_INDEX
    if not bool(keep.any()):
        return hidden.sum() * 0.0
    logits = lm_head(hidden[:, :-1][keep]).float()
    loss = torch.nn.functional.cross_entropy(logits, targets[keep].to(logits.device), reduction="sum")
    count = num_items_in_batch if num_items_in_batch is not None else keep.sum()
    return loss / torch.as_tensor(count, device=loss.device, dtype=loss.dtype)


__all__ = ["OmniSFTTrainer", "SpeechTrainingError", "capture_last_hidden_state",
           "labelled_cross_entropy"]
