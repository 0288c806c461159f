"""The embedded dataset's scenes (``aoanet.data.synth_world``) drawn as pictures, for the demo on pixels.

Every object class has its own silhouette (one of eight shapes) and marking (plain, stripes or spots), drawn in
the object's colour at its box, with an outline that keeps it visible on any background; each setting has its own
background (road, grass, sand and sea, trees, a room's wall and floor, snow) with a little texture and noise. The
captions are those of the feature generator (same seed, same scene), so the two versions of the dataset differ
only in what the model sees. Only Pillow and numpy.
"""

from __future__ import annotations

import math

import numpy as np
from PIL import Image, ImageDraw

from aoanet.data.synth_world import CLASSES, Scene

COLOURS = {
    "red": (215, 35, 35),
    "blue": (35, 70, 215),
    "green": (40, 165, 50),
    "yellow": (245, 215, 30),
    "white": (250, 250, 250),
    "black": (20, 20, 20),
    "brown": (125, 75, 30),
    "orange": (250, 135, 10),
    "pink": (250, 150, 205),
    "gray": (135, 135, 135),
    "purple": (125, 40, 170),
}
SHAPES = ("ellipse", "box", "triangle", "wedge", "diamond", "hexagon", "star", "cross")
MARKINGS = ("plain", "stripes", "spots")
# class index -> (shape, marking): 8 shapes x 3 markings = the 24 classes, each pair used once.
CLASS_LOOK = {i: (SHAPES[i % 8], MARKINGS[i // 8]) for i in range(len(CLASSES))}
# The scale of the rendered picture relative to the scene's nominal size (640 x 480 -> 320 x 240): the extractor
# resizes to 224 anyway, and smaller files decode faster.
RENDER_SCALE = 0.5


def _polygon(shape: str, x1, y1, x2, y2) -> list[tuple[float, float]]:
    cx, cy, w, h = (x1 + x2) / 2, (y1 + y2) / 2, x2 - x1, y2 - y1
    if shape == "triangle":
        return [(cx, y1), (x2, y2), (x1, y2)]
    if shape == "wedge":  # an upside-down triangle
        return [(x1, y1), (x2, y1), (cx, y2)]
    if shape == "diamond":
        return [(cx, y1), (x2, cy), (cx, y2), (x1, cy)]
    if shape == "hexagon":
        return [(cx + w / 2 * math.cos(a), cy + h / 2 * math.sin(a)) for a in np.arange(6) * math.pi / 3]
    if shape == "star":
        pts = []
        for k in range(10):
            r = 0.5 if k % 2 == 0 else 0.22
            a = -math.pi / 2 + k * math.pi / 5
            pts.append((cx + w * r * math.cos(a), cy + h * r * math.sin(a)))
        return pts
    if shape == "cross":
        a, b = w / 6, h / 6
        return [
            (cx - a, y1), (cx + a, y1), (cx + a, cy - b), (x2, cy - b), (x2, cy + b), (cx + a, cy + b),
            (cx + a, y2), (cx - a, y2), (cx - a, cy + b), (x1, cy + b), (x1, cy - b), (cx - a, cy - b),
        ]
    raise ValueError(shape)


def _mask(size, shape: str, box) -> Image.Image:
    mask = Image.new("L", size, 0)
    d = ImageDraw.Draw(mask)
    if shape == "ellipse":
        d.ellipse(box, fill=255)
    elif shape == "box":
        d.rectangle(box, fill=255)
    else:
        d.polygon(_polygon(shape, *box), fill=255)
    return mask


def draw_object(img: Image.Image, cls: int, colour: str, box_px) -> None:
    """One object: its class's silhouette filled with its colour, its marking, an outline."""
    shape, marking = CLASS_LOOK[cls]
    x1, y1, x2, y2 = box_px
    if x2 - x1 < 2 or y2 - y1 < 2:
        return
    # Drawn on a patch the size of the box, then pasted: a whole-picture layer per object is 10x slower.
    ox, oy = int(math.floor(x1)), int(math.floor(y1))
    pw, ph = int(math.ceil(x2)) - ox + 1, int(math.ceil(y2)) - oy + 1
    box = (x1 - ox, y1 - oy, x2 - ox, y2 - oy)
    bx1, by1, bx2, by2 = box
    rgb = COLOURS[colour]
    light = sum(rgb) > 380
    ink = (25, 25, 25) if light else (240, 240, 240)
    mask = _mask((pw, ph), shape, box)
    patch = Image.new("RGB", (pw, ph), rgb)
    d = ImageDraw.Draw(patch)
    w, h = bx2 - bx1, by2 - by1
    if marking == "stripes":
        step = max(3.0, h / 5)
        y = by1 + step / 2
        while y < by2:
            d.rectangle((bx1, y, bx2, y + max(1.0, step / 3)), fill=ink)
            y += step
    elif marking == "spots":
        r = max(1.5, min(w, h) / 10)
        for fx, fy in ((0.3, 0.35), (0.7, 0.35), (0.5, 0.65), (0.3, 0.75), (0.7, 0.75)):
            cx, cy = bx1 + fx * w, by1 + fy * h
            d.ellipse((cx - r, cy - r, cx + r, cy + r), fill=ink)
    img.paste(patch, (ox, oy), mask)
    outline = ImageDraw.Draw(img)
    line = (0, 0, 0) if colour != "black" else (235, 235, 235)
    width = max(1, round(min(w, h) / 25))
    if shape == "ellipse":
        outline.ellipse(box_px, outline=line, width=width)
    elif shape == "box":
        outline.rectangle(box_px, outline=line, width=width)
    else:
        pts = _polygon(shape, *box_px)
        outline.line(pts + [pts[0]], fill=line, width=width)


def _background(setting: str, w: int, h: int, rng: np.random.Generator) -> Image.Image:
    img = Image.new("RGB", (w, h))
    d = ImageDraw.Draw(img)
    horizon = int(h * rng.uniform(0.3, 0.45))
    if setting == "street":
        d.rectangle((0, 0, w, horizon), fill=(170, 195, 225))
        d.rectangle((0, horizon, w, h), fill=(90, 90, 95))
        y = (horizon + h) // 2
        for x in range(0, w, 40):
            d.rectangle((x, y - 2, x + 20, y + 2), fill=(240, 220, 60))
    elif setting == "field":
        d.rectangle((0, 0, w, horizon), fill=(150, 200, 240))
        d.rectangle((0, horizon, w, h), fill=(95, 165, 60))
        for _ in range(120):
            x, y = rng.uniform(0, w), rng.uniform(horizon, h)
            d.line((x, y, x + rng.uniform(-3, 3), y - rng.uniform(4, 9)), fill=(60, 125, 35), width=1)
    elif setting == "beach":
        d.rectangle((0, 0, w, horizon // 2), fill=(160, 205, 245))
        d.rectangle((0, horizon // 2, w, horizon), fill=(40, 110, 190))
        d.rectangle((0, horizon, w, h), fill=(225, 200, 145))
    elif setting == "park":
        d.rectangle((0, 0, w, horizon), fill=(165, 210, 240))
        d.rectangle((0, horizon, w, h), fill=(110, 175, 75))
        for _ in range(int(rng.integers(3, 6))):
            x = rng.uniform(0, w)
            d.rectangle((x - 3, horizon - 25, x + 3, horizon + 5), fill=(90, 60, 30))
            d.ellipse((x - 18, horizon - 55, x + 18, horizon - 18), fill=(35, 110, 40))
    elif setting == "room":
        d.rectangle((0, 0, w, horizon + 20), fill=(225, 210, 180))
        d.rectangle((0, horizon + 20, w, h), fill=(150, 100, 60))
        for y in range(horizon + 30, h, 14):
            d.line((0, y, w, y), fill=(120, 80, 45), width=1)
        d.rectangle((w * 0.1, h * 0.05, w * 0.3, horizon), outline=(120, 110, 100), width=2, fill=(190, 220, 240))
    elif setting == "snow":
        d.rectangle((0, 0, w, horizon), fill=(200, 210, 225))
        d.rectangle((0, horizon, w, h), fill=(240, 243, 250))
        for _ in range(60):
            x, y = rng.uniform(0, w), rng.uniform(0, h)
            d.ellipse((x - 1, y - 1, x + 1, y + 1), fill=(255, 255, 255))
    else:
        raise ValueError(setting)
    return img


def render_scene(scene: Scene, rng: np.random.Generator, scale: float = RENDER_SCALE) -> Image.Image:
    """The picture of ``scene`` at ``scale`` times its nominal size (scene.width x scene.height)."""
    w, h = max(8, round(scene.width * scale)), max(8, round(scene.height * scale))
    img = _background(scene.setting, w, h, rng)

    def px(box):
        x1, y1, x2, y2 = box
        return (x1 * w, y1 * h, x2 * w, y2 * h)

    for c in scene.clutter:
        draw_object(img, c.cls, c.colour, px(c.box))
    for g in reversed(scene.groups):  # the main group last, in front
        for box in g.boxes:
            draw_object(img, g.cls, g.colour, px(box))
    noise = rng.integers(-10, 11, size=(h, w, 3), dtype=np.int16)  # sensor-like noise, so no region is flat
    pixels = np.clip(np.asarray(img, dtype=np.int16) + noise, 0, 255).astype(np.uint8)
    return Image.fromarray(pixels, "RGB")
