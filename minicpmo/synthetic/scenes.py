"""Seeded toy scenes that change over time, their rendering, and ground-truth answers about a scene state.

A scene is a few objects (square / circle / triangle, one colour each, on a 3x3 grid) plus a timeline of
events at whole seconds (colour changes, objects appearing or disappearing). Frames are sampled at 1 fps, so an
event at second `t` is first visible on frame `t`: `SceneTimeline.state_at(t)` applies every event with time <= t.
Answers are computed from a state, never stored by hand, so they are right by construction.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace

import numpy as np
from PIL import Image, ImageDraw

from minicpmo.errors import SyntheticDataError


SHAPES = ("square", "circle", "triangle")
COLOURS = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (235, 200, 30),
    "purple": (140, 60, 170),
    "orange": (245, 130, 20),
}
NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
GRID = 3  # objects sit in the cells of a GRID x GRID layout, so they never overlap
BACKGROUND = (235, 235, 235)
EVENT_KINDS = ("colour", "appear", "disappear")


class SceneError(SyntheticDataError):
    """A scene, event or question that is inconsistent (unknown shape/colour, bad cell, ambiguous target...)."""


@dataclass(frozen=True)
class SceneObject:
    """One shape: `cell` is its grid cell (row * GRID + col); `size` is a fraction of the cell (0.5..0.9)."""

    object_id: int
    shape: str
    colour: str
    cell: int
    size: float = 0.7


@dataclass(frozen=True)
class SceneEvent:
    """A change at whole second `time_s`: kind 'colour' (new `colour`), 'appear' (`obj`) or 'disappear'."""

    time_s: int
    kind: str
    object_id: int
    colour: str | None = None
    obj: SceneObject | None = None


@dataclass(frozen=True)
class SceneState:
    """The objects visible at one instant, sorted by id."""

    objects: tuple[SceneObject, ...]

    def by_shape(self, shape: str) -> list[SceneObject]:
        _check_shape(shape)
        return [obj for obj in self.objects if obj.shape == shape]

    def by_colour(self, colour: str) -> list[SceneObject]:
        _check_colour(colour)
        return [obj for obj in self.objects if obj.colour == colour]

    def find(self, object_id: int) -> SceneObject | None:
        return next((obj for obj in self.objects if obj.object_id == object_id), None)

    def free_cells(self) -> list[int]:
        used = {obj.cell for obj in self.objects}
        return [cell for cell in range(GRID * GRID) if cell not in used]


@dataclass
class SceneTimeline:
    """Initial objects plus time-sorted events; `state_at(t)` is the scene at time t (seconds)."""

    initial: tuple[SceneObject, ...]
    events: list[SceneEvent] = field(default_factory=list)

    def state_at(self, time_s: float) -> SceneState:
        objects = {obj.object_id: obj for obj in self.initial}
        for event in self.events:
            if event.time_s > time_s + 1e-9:
                break
            objects = apply_event(objects, event)
        return SceneState(tuple(objects[key] for key in sorted(objects)))

    def add_event(self, event: SceneEvent) -> None:
        """Insert an event (kept sorted by time); raises SceneError if it does not apply at its time."""
        apply_event({obj.object_id: obj for obj in self.state_at(event.time_s).objects}, event)
        later = [e for e in self.events if e.time_s > event.time_s]
        if later:  # the later events must still apply after this one
            probe = SceneTimeline(self.initial, sorted(self.events + [event], key=lambda e: e.time_s))
            probe.state_at(max(e.time_s for e in later))
        self.events = sorted(self.events + [event], key=lambda e: e.time_s)

    def to_dict(self) -> dict:
        return {"initial": [asdict(obj) for obj in self.initial], "events": [_event_to_dict(e) for e in self.events]}

    @classmethod
    def from_dict(cls, data: dict) -> "SceneTimeline":
        return cls(
            tuple(SceneObject(**obj) for obj in data["initial"]),
            [_event_from_dict(event) for event in data["events"]],
        )


def _event_to_dict(event: SceneEvent) -> dict:
    data = asdict(event)
    if event.obj is None:
        data.pop("obj")
    return data


def _event_from_dict(data: dict) -> SceneEvent:
    data = dict(data)
    obj = data.pop("obj", None)
    return SceneEvent(**data, obj=None if obj is None else SceneObject(**obj))


def _check_shape(shape: str) -> None:
    if shape not in SHAPES:
        raise SceneError(f"unknown shape {shape!r}; expected one of {SHAPES}")


def _check_colour(colour: str) -> None:
    if colour not in COLOURS:
        raise SceneError(f"unknown colour {colour!r}; expected one of {tuple(COLOURS)}")


def apply_event(objects: dict[int, SceneObject], event: SceneEvent) -> dict[int, SceneObject]:
    """A new id -> object dict with `event` applied; raises SceneError when the event does not fit the state."""
    objects = dict(objects)
    if event.kind == "colour":
        _check_colour(event.colour)
        if event.object_id not in objects:
            raise SceneError(f"colour event at {event.time_s} s for absent object {event.object_id}")
        objects[event.object_id] = replace(objects[event.object_id], colour=event.colour)
    elif event.kind == "disappear":
        if event.object_id not in objects:
            raise SceneError(f"disappear event at {event.time_s} s for absent object {event.object_id}")
        del objects[event.object_id]
    elif event.kind == "appear":
        obj = event.obj
        if obj is None or obj.object_id != event.object_id:
            raise SceneError(f"appear event at {event.time_s} s needs the object with id {event.object_id}")
        _check_shape(obj.shape)
        _check_colour(obj.colour)
        if obj.object_id in objects:
            raise SceneError(f"object {obj.object_id} appears at {event.time_s} s but is already present")
        if obj.cell in {other.cell for other in objects.values()}:
            raise SceneError(f"object {obj.object_id} appears at {event.time_s} s in occupied cell {obj.cell}")
        objects[obj.object_id] = obj
    else:
        raise SceneError(f"unknown event kind {event.kind!r}; expected one of {EVENT_KINDS}")
    return objects


def random_scene(rng: np.random.Generator, n_objects: tuple[int, int] = (3, 6)) -> SceneTimeline:
    """A seeded initial scene with n_objects[0]..n_objects[1] objects and exactly one square (a watch target)."""
    low, high = n_objects
    if not 1 <= low <= high <= GRID * GRID:
        raise SceneError(f"n_objects must satisfy 1 <= low <= high <= {GRID * GRID}, got {n_objects}")
    count = int(rng.integers(low, high + 1))
    cells = rng.permutation(GRID * GRID)[:count]
    shapes = ["square"] + [str(rng.choice(("circle", "triangle"))) for _ in range(count - 1)]
    objects = [
        SceneObject(index, shape, str(rng.choice(list(COLOURS))), int(cell), float(rng.uniform(0.55, 0.85)))
        for index, (shape, cell) in enumerate(zip(shapes, cells))
    ]
    return SceneTimeline(tuple(objects))


def random_distractor_event(
    rng: np.random.Generator, timeline: SceneTimeline, time_s: int, protected: tuple[int, ...] = ()
) -> SceneEvent | None:
    """A random change at `time_s` that leaves the `protected` object ids alone (None if nothing fits)."""
    state = timeline.state_at(time_s)
    movable = [obj for obj in state.objects if obj.object_id not in protected]
    options = []
    if movable:
        options += ["colour", "colour"]
        if len(movable) > 1:
            options.append("disappear")
    if state.free_cells():
        options.append("appear")
    if not options:
        return None
    kind = str(rng.choice(options))
    if kind == "colour":
        obj = movable[int(rng.integers(len(movable)))]
        colour = str(rng.choice([c for c in COLOURS if c != obj.colour]))
        return SceneEvent(time_s, "colour", obj.object_id, colour=colour)
    if kind == "disappear":
        obj = movable[int(rng.integers(len(movable)))]
        return SceneEvent(time_s, "disappear", obj.object_id)
    new_id = 1 + max([o.object_id for o in timeline.initial] + [e.object_id for e in timeline.events])
    cell = int(rng.choice(state.free_cells()))
    obj = SceneObject(new_id, str(rng.choice(("circle", "triangle"))), str(rng.choice(list(COLOURS))), cell,
                      float(rng.uniform(0.55, 0.85)))
    return SceneEvent(time_s, "appear", new_id, obj=obj)


def render(state: SceneState, size: int = 224) -> Image.Image:
    """Draw a state as an RGB image of `size` x `size` pixels."""
    if int(size) < GRID * 8:
        raise SceneError(f"image size must be at least {GRID * 8} pixels, got {size}")
    image = Image.new("RGB", (size, size), BACKGROUND)
    draw = ImageDraw.Draw(image)
    cell_px = size / GRID
    for obj in state.objects:
        row, col = divmod(obj.cell, GRID)
        cx, cy = (col + 0.5) * cell_px, (row + 0.5) * cell_px
        half = obj.size * cell_px / 2
        colour = COLOURS[obj.colour]
        if obj.shape == "square":
            draw.rectangle([cx - half, cy - half, cx + half, cy + half], fill=colour, outline=(0, 0, 0))
        elif obj.shape == "circle":
            draw.ellipse([cx - half, cy - half, cx + half, cy + half], fill=colour, outline=(0, 0, 0))
        else:
            draw.polygon([(cx, cy - half), (cx + half, cy + half), (cx - half, cy + half)], fill=colour,
                         outline=(0, 0, 0))
    return image


# ---------------------------------------------------------------- questions and answers

QUESTION_KINDS = ("count_shape", "shape_colour", "count_colour", "exists_shape")


@dataclass(frozen=True)
class SceneQuestion:
    """What is asked: kind in QUESTION_KINDS with its `shape` and/or `colour` argument."""

    kind: str
    shape: str | None = None
    colour: str | None = None

    def text(self) -> str:
        """The user's spoken question."""
        if self.kind == "count_shape":
            return f"How many {self.shape}s are there?"
        if self.kind == "shape_colour":
            return f"What colour is the {self.shape}?"
        if self.kind == "count_colour":
            return f"How many {self.colour} shapes do you see?"
        if self.kind == "exists_shape":
            return f"Is there a {self.shape}?"
        raise SceneError(f"unknown question kind {self.kind!r}; expected one of {QUESTION_KINDS}")


def number_word(count: int) -> str:
    if not 0 <= count < len(NUMBER_WORDS):
        raise SceneError(f"count {count} has no number word")
    return NUMBER_WORDS[count]


def answer_question(state: SceneState, question: SceneQuestion) -> tuple[str, str]:
    """(short expected answer, full reply sentence) for `question` on `state`."""
    if question.kind == "count_shape":
        count = len(state.by_shape(question.shape))
        word = number_word(count)
        if count == 0:
            return word, f"There are no {question.shape}s."
        return word, f"There {'is' if count == 1 else 'are'} {word} {question.shape}{'' if count == 1 else 's'}."
    if question.kind == "shape_colour":
        matches = state.by_shape(question.shape)
        if len(matches) != 1:
            raise SceneError(f"'the {question.shape}' is ambiguous: the scene holds {len(matches)} of them")
        colour = matches[0].colour
        return colour, f"The {question.shape} is {colour}."
    if question.kind == "count_colour":
        count = len(state.by_colour(question.colour))
        word = number_word(count)
        if count == 0:
            return word, f"I see no {question.colour} shapes."
        return word, f"I see {word} {question.colour} shape{'' if count == 1 else 's'}."
    if question.kind == "exists_shape":
        present = bool(state.by_shape(question.shape))
        if present:
            return "yes", f"Yes, there is a {question.shape}."
        return "no", f"No, there is no {question.shape}."
    raise SceneError(f"unknown question kind {question.kind!r}; expected one of {QUESTION_KINDS}")


def random_question(rng: np.random.Generator, state: SceneState) -> SceneQuestion:
    """A question that has a well-defined answer on `state` (colour questions only for unique shapes)."""
    kinds = ["count_shape", "count_colour", "exists_shape"]
    unique = [shape for shape in SHAPES if len(state.by_shape(shape)) == 1]
    if unique:
        kinds.append("shape_colour")
    kind = str(rng.choice(kinds))
    if kind == "shape_colour":
        return SceneQuestion(kind, shape=str(rng.choice(unique)))
    if kind == "count_colour":
        return SceneQuestion(kind, colour=str(rng.choice(list(COLOURS))))
    return SceneQuestion(kind, shape=str(rng.choice(SHAPES)))


def describe(state: SceneState) -> str:
    """A long spoken description of a state, grouped by colour and shape (used as an interruptible reply)."""
    groups: dict[tuple[str, str], int] = {}
    for obj in state.objects:
        groups[(obj.colour, obj.shape)] = groups.get((obj.colour, obj.shape), 0) + 1
    parts = [
        f"{number_word(count) if count > 1 else 'one'} {colour} {shape}{'s' if count > 1 else ''}"
        for (colour, shape), count in sorted(groups.items(), key=lambda item: (item[0][1], item[0][0]))
    ]
    if not parts:
        return "I do not see any shapes right now."
    listed = parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]
    return f"Let me describe the picture. I can see {listed}."
