"""The training loop shape shared by the speech-unit recipes: step until a wall-clock budget runs out.

`BudgetedLoop` yields step numbers while time (and `max_steps`) remain, sets every optimizer group's learning
rate to `lr x group.get("scale", 1) x (linear warm-up, then cosine over the budget down to 10%)`, records each
step's losses, logs every `log_every` steps, and summarises them as `first_<name>` (step 1) and `<name>` (mean of
the last 20 steps). A budget of 0 runs no step.
"""

from __future__ import annotations

import json
import math
import time

import numpy as np

SUMMARY_WINDOW = 20


def budget_lr_factor(step: int, elapsed: float, budget_s: float, warmup: int) -> float:
    """Linear warm-up over `warmup` steps, then cosine decay over the wall-clock budget down to 10%."""
    progress = min(1.0, elapsed / budget_s) if budget_s > 0 else 1.0
    return min(1.0, (step + 1) / warmup) * (0.1 + 0.45 * (1 + math.cos(math.pi * progress)))


class BudgetedLoop:
    def __init__(self, name: str, optimizer, lr: float, budget_s: float, max_steps: int | None = None,
                 warmup: int = 30, log=print, log_every: int = 50):
        self.name = name
        self.optimizer = optimizer
        self.lr = float(lr)
        self.budget_s = float(budget_s)
        self.max_steps = max_steps
        self.warmup = int(warmup)
        self.log = log
        self.log_every = int(log_every)
        self.history: list[dict[str, float]] = []
        self.start = time.monotonic()

    @property
    def steps(self) -> int:
        return len(self.history)

    def __iter__(self):
        self.start = time.monotonic()
        while True:
            elapsed = time.monotonic() - self.start
            if elapsed >= self.budget_s or (self.max_steps is not None and self.steps >= self.max_steps):
                return
            factor = budget_lr_factor(self.steps, elapsed, self.budget_s, self.warmup)
            for group in self.optimizer.param_groups:
                group["lr"] = group.get("scale", 1.0) * self.lr * factor
            yield self.steps

    def record(self, **losses: float) -> None:
        """The finished step's losses (plain floats)."""
        self.history.append({name: float(value) for name, value in losses.items()})
        if self.log is not None and (self.steps == 1 or self.steps % self.log_every == 0):
            values = " ".join(f"{name} {value:.3f}" for name, value in self.history[-1].items())
            self.log(f"{self.name} step {self.steps} ({time.monotonic() - self.start:.0f}s): {values}")

    def summary(self, **extra) -> dict:
        """steps, seconds, `first_<loss>` and `<loss>` (last-20 mean) for every recorded loss, plus `extra`."""
        metrics: dict = {"steps": self.steps, "seconds": round(time.monotonic() - self.start, 1), **extra}
        if self.history:
            for name in self.history[0]:
                metrics[f"first_{name}"] = self.history[0][name]
                metrics[name] = float(np.mean([entry[name] for entry in self.history[-SUMMARY_WINDOW:]]))
        return metrics

    def finish(self, **extra) -> dict:
        """`summary(**extra)`, logged as one JSON line."""
        metrics = self.summary(**extra)
        if self.log is not None:
            self.log(f"{self.name} done: {json.dumps(metrics)}")
        return metrics


__all__ = ["BudgetedLoop", "budget_lr_factor"]
