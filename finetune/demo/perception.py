"""Perception curriculum: the vision tower + resampler learn what is in every grid cell before the LLM sees them.

Trained end to end from question/answer pairs alone, the demo's vision side learnt too little for the LLM to
answer by looking (it answered colour questions by prior). The scene generator knows every cell's shape and
colour, so this stage trains `vpm` + `resampler` with a linear probe on the resampler's query outputs
(query i -> cell i: 4 shape classes incl. empty + 7 colour classes incl. empty, one head shared by the nine
cells, see CellProbe): the image tokens the LLM later reads then name one cell each, linearly. The probe is thrown
away; only the encoder weights stay. Two more queries carry the scene's counts (CountProbe: query 9 the count of
each shape, query 10 of each colour), because an LLM reading nine clean cell tokens learnt colour and existence
questions but not counts (0.68 / 0.47 held-out after 12 min of fresh questions, see reading.py). Scenes are
drawn fresh every step, so there is no overfitting to measure,
and accuracy is reported on held-out scenes of the world's own generator (`random_scene`).
"""

from __future__ import annotations

import time

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from minicpmo.errors import TrainingError
from minicpmo.processing.image_processing_minicpmo import stack_patch_strips
from minicpmo.synthetic.scenes import (
    COLOURS,
    GRID,
    SHAPES,
    SceneObject,
    SceneState,
    random_scene,
    render,
)

from .budget import budgeted_step

CELLS = GRID * GRID
COUNT_CLASSES = CELLS + 1  # 0..9 objects of one shape or colour
SHAPE_CLASSES = ("empty",) + SHAPES
COLOUR_CLASSES = ("empty",) + tuple(COLOURS)


class PerceptionError(TrainingError):
    """Bad arguments for the perception stage (non-positive budget or batch size)."""


def cell_labels(state: SceneState) -> tuple[torch.Tensor, torch.Tensor]:
    """Per cell: the shape class and the colour class (0 = empty cell), each a LongTensor [9]."""
    shapes = torch.zeros(CELLS, dtype=torch.long)
    colours = torch.zeros(CELLS, dtype=torch.long)
    for obj in state.objects:
        shapes[obj.cell] = SHAPE_CLASSES.index(obj.shape)
        colours[obj.cell] = COLOUR_CLASSES.index(obj.colour)
    return shapes, colours


def random_cells_state(rng: np.random.Generator, max_objects: int = 7) -> SceneState:
    """A state with 0..`max_objects` objects of any shape and colour: wider than the world's scenes (which always
    hold one square), so the encoder cannot learn the world's priors in place of looking."""
    count = int(rng.integers(0, max_objects + 1))
    cells = rng.permutation(CELLS)[:count]
    return SceneState(tuple(
        SceneObject(index, str(rng.choice(SHAPES)), str(rng.choice(list(COLOURS))), int(cell),
                    float(rng.uniform(0.55, 0.85)))
        for index, cell in enumerate(cells)
    ))


class CellProbe(nn.Module):
    """Resampler query i (i < 9) -> cell i's shape and colour logits, through one linear head shared by all cells.

    Per token and shared, so each of the first nine image tokens the LLM reads names one cell in the same
    subspace: counting "the red shapes" is then one attention pattern over the tokens, not a decoding of the
    whole set of queries (a probe over all queries at once reached 0.98 scene accuracy, yet the LLM trained on top
    of it still answered counts by prior). The other queries are left free."""

    def __init__(self, query_num: int, hidden_size: int):
        super().__init__()
        if query_num < CELLS:
            raise PerceptionError(f"the cell probe needs query_num >= {CELLS} (one query per cell), got {query_num}")
        self.linear = nn.Linear(hidden_size, len(SHAPE_CLASSES) + len(COLOUR_CLASSES))

    def forward(self, queries: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = self.linear(queries[:, :CELLS])  # [B, 9, 11]
        return logits[..., : len(SHAPE_CLASSES)], logits[..., len(SHAPE_CLASSES):]


class CountProbe(nn.Module):
    """Resampler query 9 -> the number of objects of each shape, query 10 -> of each colour (0..9 each, linear).

    A count is then one token the LLM looks up, instead of a sum it must form over nine tokens with attention."""

    def __init__(self, query_num: int, hidden_size: int):
        super().__init__()
        if query_num < CELLS + 2:
            raise PerceptionError(f"the count probe needs query_num >= {CELLS + 2} (cells + 2 count queries), "
                                  f"got {query_num}")
        self.shapes = nn.Linear(hidden_size, len(SHAPES) * COUNT_CLASSES)
        self.colours = nn.Linear(hidden_size, len(COLOURS) * COUNT_CLASSES)

    def forward(self, queries: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        shapes = self.shapes(queries[:, CELLS]).view(-1, len(SHAPES), COUNT_CLASSES)
        colours = self.colours(queries[:, CELLS + 1]).view(-1, len(COLOURS), COUNT_CLASSES)
        return shapes, colours


def count_labels(states: list[SceneState]) -> tuple[torch.Tensor, torch.Tensor]:
    """Per state: objects of each shape [B, 3] and of each colour [B, 6]."""
    shapes = torch.tensor([[len(state.by_shape(shape)) for shape in SHAPES] for state in states])
    colours = torch.tensor([[len(state.by_colour(colour)) for colour in COLOURS] for state in states])
    return shapes, colours


def _image_batch(states: list[SceneState], image_processor, image_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    features = image_processor([render(state, image_size) for state in states], max_slice_nums=1)
    strips = [strip for per_image in features["pixel_values"] for strip in per_image]
    if len(strips) != len(states):
        raise PerceptionError(f"expected one slice per {image_size}-px scene, got {len(strips)} for {len(states)}")
    sizes = torch.from_numpy(np.concatenate(features["tgt_sizes"]))
    return torch.from_numpy(stack_patch_strips(strips)), sizes


def _labels(states: list[SceneState]) -> tuple[torch.Tensor, torch.Tensor]:
    pairs = [cell_labels(state) for state in states]
    return torch.stack([p[0] for p in pairs]), torch.stack([p[1] for p in pairs])


def _probe_loss(logits: tuple[torch.Tensor, ...], labels: tuple[torch.Tensor, ...]) -> torch.Tensor:
    """Sum, in order, of the cross-entropy of each probe output over all its slots (cells, or shapes / colours)."""
    return sum(F.cross_entropy(out.flatten(0, 1), target.flatten()) for out, target in zip(logits, labels))


def _queries(model, pixel_values, tgt_sizes) -> torch.Tensor:
    return model.model.get_image_features(pixel_values, tgt_sizes).pooler_output  # [B, query_num, hidden]


@torch.no_grad()
def evaluate_cells(model, probe: CellProbe, image_processor, n: int = 200, seed: int = 1, image_size: int = 224,
                   batch_size: int = 50, count_probe: CountProbe | None = None) -> dict:
    """Held-out accuracy on `n` scenes of the world's generator: per cell (shape, colour) and whole scene; with
    `count_probe`, also per count (each shape's and each colour's number of objects)."""
    rng = np.random.default_rng(np.random.SeedSequence([int(seed), 404]))
    states = [random_scene(rng).state_at(0) for _ in range(int(n))]
    right = {"shape": 0, "colour": 0, "scene": 0, "shape_count": 0, "colour_count": 0}
    was_training = model.training
    model.eval()
    for start in range(0, len(states), batch_size):
        chunk = states[start : start + batch_size]
        queries = _queries(model, *_image_batch(chunk, image_processor, image_size))
        shape_logits, colour_logits = probe(queries)
        shapes, colours = _labels(chunk)
        shape_ok = shape_logits.argmax(-1) == shapes
        colour_ok = colour_logits.argmax(-1) == colours
        right["shape"] += int(shape_ok.sum())
        right["colour"] += int(colour_ok.sum())
        right["scene"] += int((shape_ok & colour_ok).all(-1).sum())
        if count_probe is not None:
            shape_counts, colour_counts = count_labels(chunk)
            shape_count_logits, colour_count_logits = count_probe(queries)
            right["shape_count"] += int((shape_count_logits.argmax(-1) == shape_counts).sum())
            right["colour_count"] += int((colour_count_logits.argmax(-1) == colour_counts).sum())
    model.train(was_training)
    cells = len(states) * CELLS
    report = {"cell_shape_accuracy": right["shape"] / cells, "cell_colour_accuracy": right["colour"] / cells,
              "scene_accuracy": right["scene"] / len(states), "scenes": len(states)}
    if count_probe is not None:
        report["shape_count_accuracy"] = right["shape_count"] / (len(states) * len(SHAPES))
        report["colour_count_accuracy"] = right["colour_count"] / (len(states) * len(COLOURS))
    return report


def train_perception(model, image_processor, budget_s: float, seed: int = 0, batch_size: int = 32,
                     lr: float = 3e-3, max_steps: int | None = None, image_size: int = 224, counts: bool = True,
                     log=print) -> dict:
    """Train `vpm` + `resampler` in place with a cell probe (and, with `counts`, the count probe) for `budget_s`
    seconds (or `max_steps`); returns the report (steps, first/last losses, held-out accuracy before and after)."""
    if budget_s <= 0 or batch_size < 1:
        raise PerceptionError(f"need budget_s > 0 and batch_size >= 1, got {budget_s}, {batch_size}")
    core = model.model
    torch.manual_seed(seed)
    probe = CellProbe(model.config.query_num, model.config.hidden_size)
    count_probe = CountProbe(model.config.query_num, model.config.hidden_size) if counts else None
    parameters = list(core.vpm.parameters()) + list(core.resampler.parameters()) + list(probe.parameters())
    if count_probe is not None:
        parameters += list(count_probe.parameters())
    optimizer = torch.optim.AdamW(parameters, lr=lr, weight_decay=0.0)
    rng = np.random.default_rng(np.random.SeedSequence([int(seed), 303]))
    before = evaluate_cells(model, probe, image_processor, n=100, image_size=image_size, count_probe=count_probe)
    started = time.perf_counter()
    planned = max_steps or 10**9
    losses, step = [], 0
    model.train()
    while step < planned and time.perf_counter() - started < budget_s:
        states = [random_cells_state(rng) if rng.random() < 0.5 else random_scene(rng).state_at(0)
                  for _ in range(batch_size)]
        queries = _queries(model, *_image_batch(states, image_processor, image_size))
        shapes, colours = _labels(states)
        logits, labels = probe(queries), (shapes, colours)
        if count_probe is not None:
            logits, labels = logits + count_probe(queries), labels + count_labels(states)
        loss = _probe_loss(logits, labels)
        budgeted_step(optimizer, parameters, loss, lr, step, started, budget_s, max_steps, warmup_steps=20)
        losses.append(loss.item())
        step += 1
        if step % 50 == 0:
            log(f"[perception] step {step}: loss {np.mean(losses[-50:]):.3f}")
    after = evaluate_cells(model, probe, image_processor, image_size=image_size, count_probe=count_probe)
    model.zero_grad(set_to_none=True)
    report = {"steps": step, "seconds": time.perf_counter() - started, "batch_size": batch_size,
              "counts": bool(counts), "first_loss": losses[0] if losses else None,
              "last_loss": float(np.mean(losses[-20:])) if losses else None,
              "heldout_before": before, "heldout": after}
    log(f"[perception] done: {step} steps, held-out {after}")
    return report


__all__ = ["COUNT_CLASSES", "CellProbe", "CountProbe", "PerceptionError", "cell_labels", "count_labels",
           "evaluate_cells", "random_cells_state", "train_perception"]
