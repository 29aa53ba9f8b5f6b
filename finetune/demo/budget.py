"""Wall-clock budgets for recipe stages: size `max_steps` from a measured step, and stop at the deadline.

The demo is trained under a fixed time budget on a fixed machine, so a stage's length is given in seconds, not
steps. `fit_max_steps` times a few forward/backward passes on a real batch (gradients cleared afterwards, so the
weights are untouched) and sets `args.max_steps` so that the cosine schedule ends when the budget does;
`WallClockStop` stops training at the deadline in case the estimate was optimistic.
"""

from __future__ import annotations

import time

import numpy as np
from torch import nn
from transformers import TrainerCallback

from minicpmo.errors import TrainingError


class BudgetError(TrainingError):
    """A non-positive budget."""


class WallClockStop(TrainerCallback):
    """Stops training once `budget_s` seconds have passed since `on_train_begin`."""

    def __init__(self, budget_s: float):
        if budget_s <= 0:
            raise BudgetError(f"budget_s must be > 0, got {budget_s}")
        self.budget_s = float(budget_s)
        self.started = None

    def on_train_begin(self, args, state, control, **kwargs):
        self.started = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        if self.started is not None and time.perf_counter() - self.started >= self.budget_s:
            control.should_training_stop = True


def seconds_per_step(trainer, repeats: int = 3) -> float:
    """Median time of forward + backward on the first training batch (after one warm-up pass); grads cleared."""
    batch = next(iter(trainer.get_train_dataloader()))
    model = trainer.model
    model.train()
    times = []
    for index in range(repeats + 1):
        inputs = {key: value for key, value in batch.items()}
        started = time.perf_counter()
        loss = trainer.compute_loss(model, inputs)
        loss.backward()
        if index:
            times.append(time.perf_counter() - started)
    model.zero_grad(set_to_none=True)
    metrics = getattr(trainer, "_metrics", None)  # TRL's logged-metric buffers: drop the timing passes
    if metrics is not None:
        metrics["train"].clear()
    times.sort()
    return times[len(times) // 2]


def fit_max_steps(trainer, budget_s: float, overhead: float = 1.25, minimum: int = 10) -> int:
    """Set `trainer.args.max_steps` to what fits in `budget_s` (step time x `overhead` for the optimizer, data and
    logging); returns it."""
    if budget_s <= 0:
        raise BudgetError(f"budget_s must be > 0, got {budget_s}")
    per_step = seconds_per_step(trainer) * overhead
    trainer.args.max_steps = max(int(minimum), int(budget_s / per_step))
    return trainer.args.max_steps


def budgeted_step(optimizer, parameters, loss, lr: float, step: int, started: float, budget_s: float,
                  max_steps: int | None, warmup_steps: int, floor: float = 0.02) -> None:
    """One optimiser step of the demo's own loops (perception, reading): linear warm-up, then a cosine decay over
    the wall-clock budget (or over `max_steps` when given), never below `floor` x lr; gradients clipped to 1."""
    if max_steps:
        progress = min(1.0, step / max_steps)
    else:
        progress = min(1.0, (time.perf_counter() - started) / budget_s)
    scale = min(1.0, (step + 1) / warmup_steps) * 0.5 * (1 + np.cos(np.pi * progress))
    for group in optimizer.param_groups:
        group["lr"] = lr * max(scale, floor)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    nn.utils.clip_grad_norm_(parameters, 1.0)
    optimizer.step()


__all__ = ["BudgetError", "WallClockStop", "budgeted_step", "fit_max_steps", "seconds_per_step"]

