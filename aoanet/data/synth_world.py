"""The world of the embedded dataset: object classes, colours, settings, and how a scene is laid out.

A scene has a setting (street, field, beach, ...), one to three *salient* object groups and some clutter. A
group is one class in one colour and size, with 1-3 instances placed next to each other. The first group is
the one the captions are mostly about; the second is placed left/right/above/below it, which is what the
relation words in the captions describe. Clutter objects are small and never mentioned; a captioner has to
learn to ignore them.

Coordinates are fractions of the image (0..1, y pointing down), turned into pixels only when boxes are
written.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

ANIMAL_COLOURS = ("white", "black", "brown", "gray")
ALL_COLOURS = (
    "red",
    "blue",
    "green",
    "yellow",
    "white",
    "black",
    "brown",
    "orange",
    "pink",
    "gray",
    "purple",
)


@dataclass(frozen=True)
class ObjectClass:
    name: str
    plural: str
    kind: str  # "animal" | "person" | "vehicle" | "thing": picks colours, verbs and how colour is said
    synonyms: tuple[tuple[str, str], ...] = ()  # (singular, plural) alternatives used by some annotators

    @property
    def colours(self) -> tuple[str, ...]:
        return ANIMAL_COLOURS if self.kind == "animal" else ALL_COLOURS


CLASSES: tuple[ObjectClass, ...] = (
    ObjectClass("dog", "dogs", "animal", (("puppy", "puppies"),)),
    ObjectClass("cat", "cats", "animal", (("kitten", "kittens"),)),
    ObjectClass("horse", "horses", "animal", (("pony", "ponies"),)),
    ObjectClass("cow", "cows", "animal"),
    ObjectClass("sheep", "sheep", "animal", (("lamb", "lambs"),)),
    ObjectClass("elephant", "elephants", "animal"),
    ObjectClass("bird", "birds", "animal"),
    ObjectClass("bear", "bears", "animal"),
    ObjectClass("man", "men", "person", (("guy", "guys"),)),
    ObjectClass("woman", "women", "person", (("lady", "ladies"),)),
    ObjectClass("boy", "boys", "person", (("kid", "kids"),)),
    ObjectClass("girl", "girls", "person", (("child", "children"),)),
    ObjectClass("car", "cars", "vehicle"),
    ObjectClass("bus", "buses", "vehicle"),
    ObjectClass("truck", "trucks", "vehicle"),
    ObjectClass("bicycle", "bicycles", "vehicle", (("bike", "bikes"),)),
    ObjectClass("motorcycle", "motorcycles", "vehicle", (("motorbike", "motorbikes"),)),
    ObjectClass("boat", "boats", "vehicle"),
    ObjectClass("ball", "balls", "thing"),
    ObjectClass("kite", "kites", "thing"),
    ObjectClass("umbrella", "umbrellas", "thing"),
    ObjectClass("chair", "chairs", "thing"),
    ObjectClass("bench", "benches", "thing"),
    ObjectClass("suitcase", "suitcases", "thing", (("bag", "bags"),)),
)

# Settings: the "stuff" regions of a detector (road, grass, sand ...) and the phrases people use for them.
SETTINGS: dict[str, tuple[str, ...]] = {
    "street": ("on a street", "on the street", "on a city street", "on the road", "in the city"),
    "field": ("in a field", "in a grassy field", "on the grass", "in the grass"),
    "beach": ("on a beach", "on the beach", "on the sand", "near the water"),
    "park": ("in a park", "at the park", "in the park"),
    "room": ("in a room", "in a living room", "inside a room", "indoors"),
    "snow": ("in the snow", "on a snowy hill", "on the snow"),
}
SETTING_NAMES = tuple(SETTINGS)
IMAGE_SIZES = ((640, 480), (480, 640), (640, 427), (500, 375), (375, 500), (640, 640))


@dataclass
class Group:
    """One salient object group: ``count`` instances of a class in one colour and size."""

    cls: int
    colour: str
    large: bool
    count: int
    boxes: list[tuple[float, float, float, float]] = field(default_factory=list)  # x1 y1 x2 y2 in 0..1

    def centre(self) -> tuple[float, float]:
        b = np.asarray(self.boxes)
        return float((b[:, 0] + b[:, 2]).mean() / 2), float((b[:, 1] + b[:, 3]).mean() / 2)


@dataclass
class Clutter:
    cls: int
    colour: str
    box: tuple[float, float, float, float]


@dataclass
class Scene:
    setting: str
    groups: list[Group]  # salient groups, the most prominent first
    clutter: list[Clutter]
    width: int
    height: int

    def relation(self, a: int = 0, b: int = 1) -> str:
        """Where group a is relative to group b: "left", "right", "above" or "below" (from the box
        centres)."""
        (ax, ay), (bx, by) = self.groups[a].centre(), self.groups[b].centre()
        dx, dy = bx - ax, by - ay
        if abs(dx) >= abs(dy):
            return "left" if dx > 0 else "right"
        return "above" if dy > 0 else "below"

    def describe(self) -> dict:
        """A JSON-able summary of what the image shows (kept in dataset_coco.json for analysis)."""
        out = {
            "setting": self.setting,
            "objects": [
                {
                    "class": CLASSES[g.cls].name,
                    "colour": g.colour,
                    "size": "large" if g.large else "small",
                    "count": g.count,
                }
                for g in self.groups
            ],
        }
        if len(self.groups) > 1:
            out["relation"] = self.relation()
        return out


def _place_group(rng: np.random.Generator, g: Group, region: tuple[float, float, float, float]) -> None:
    """Boxes for the instances of ``g`` side by side inside ``region`` (x1 y1 x2 y2)."""
    rx1, ry1, rx2, ry2 = region
    slot_w = (rx2 - rx1) / g.count
    for k in range(g.count):
        scale = rng.uniform(0.75, 1.0) if g.large else rng.uniform(0.4, 0.55)
        w = slot_w * scale
        h = min(ry2 - ry1, (ry2 - ry1) * scale * rng.uniform(0.8, 1.1))
        x1 = rx1 + k * slot_w + rng.uniform(0, slot_w - w)
        y1 = ry1 + rng.uniform(0, (ry2 - ry1) - h)
        g.boxes.append((x1, y1, x1 + w, y1 + h))


def sample_scene(rng: np.random.Generator) -> Scene:
    """A random scene: setting, 1-3 salient groups at related positions, 3-10 small clutter objects."""
    n_groups = int(rng.choice([1, 2, 3], p=[0.2, 0.6, 0.2]))
    classes = rng.choice(len(CLASSES), size=n_groups, replace=False)
    groups = []
    for c in classes:
        cls = CLASSES[int(c)]
        groups.append(
            Group(
                cls=int(c),
                colour=str(rng.choice(cls.colours)),
                large=bool(rng.random() < 0.5),
                count=int(rng.choice([1, 2, 3], p=[0.7, 0.2, 0.1])),
            )
        )
    # The first two groups split the image along the relation's axis; a third takes a corner band.
    if n_groups == 1:
        _place_group(rng, groups[0], (0.1, 0.15, 0.9, 0.95))
    else:
        axis = "x" if rng.random() < 0.6 else "y"
        first_low = rng.random() < 0.5  # group 0 on the left (x) or at the top (y)
        halves = (
            ((0.0, 0.1, 0.5, 0.95), (0.5, 0.1, 1.0, 0.95))
            if axis == "x"
            else ((0.1, 0.0, 0.9, 0.48), (0.1, 0.52, 0.9, 1.0))
        )
        a, b = (halves[0], halves[1]) if first_low else (halves[1], halves[0])
        if n_groups == 3:  # leave a band for the third group
            a = (a[0], a[1], a[2], a[3] * 0.8) if axis == "x" else (a[0], a[1], a[2] * 0.75, a[3])
            b = (b[0], b[1], b[2], b[3] * 0.8) if axis == "x" else (b[0], b[1], b[2] * 0.75, b[3])
        _place_group(rng, groups[0], a)
        _place_group(rng, groups[1], b)
        if n_groups == 3:
            band = (0.05, 0.8, 0.95, 1.0) if axis == "x" else (0.76, 0.1, 1.0, 0.9)
            groups[2].large = False
            _place_group(rng, groups[2], band)
    others = [i for i in range(len(CLASSES)) if i not in set(classes.tolist())]
    clutter = []
    for _ in range(int(rng.integers(3, 11))):
        c = int(rng.choice(others))
        w, h = rng.uniform(0.03, 0.09, size=2)
        x1, y1 = rng.uniform(0, 1 - w), rng.uniform(0, 1 - h)
        clutter.append(Clutter(cls=c, colour=str(rng.choice(CLASSES[c].colours)), box=(x1, y1, x1 + w, y1 + h)))
    width, height = IMAGE_SIZES[int(rng.integers(len(IMAGE_SIZES)))]
    return Scene(setting=str(rng.choice(SETTING_NAMES)), groups=groups, clutter=clutter, width=width, height=height)
