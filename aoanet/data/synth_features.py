"""Region features for a synthetic scene that behave like a bottom-up detector's.

Every region gets a feature ``relu(class + colour + geometry + noise)``: fixed random projections (one
Gaussian vector per class, per colour, per setting, a matrix for the box geometry) drawn once from a constant
world seed, so the same object looks the same in every dataset built with the same width. Like Faster R-CNN
output, the features are non-negative and about half zeros, and there are more regions than objects:

- one region per salient object instance (strong class and colour signal), plus 0-2 *part* regions inside it
  (overlapping boxes with a weaker copy of the signal, as detectors return for wheels, heads...);
- 3-10 small *clutter* objects of other classes, never mentioned in the captions;
- 2-3 large *stuff* regions carrying the setting (road, grass, sand ...);
- low-signal background regions until there are at least ``MIN_REGIONS``.
The box geometry (position, size) is projected into every feature too, so relations and "large/small" can be
read from the features, not only from cocobu_box. Region order is shuffled: nothing can be learned from
position in the list. The fc vector is the mean over regions (as make_bu_data writes it), which blurs which
colour belongs to which object and where things are: exactly what the nearest-neighbour baseline lacks.
"""

from __future__ import annotations

import numpy as np

from aoanet.data.synth_world import ALL_COLOURS, CLASSES, SETTING_NAMES, Scene

WORLD_SEED = 20190901  # fixed: the projections are part of the dataset definition, not of the sample
MIN_REGIONS, MAX_REGIONS = 10, 100
# (class, colour, part, geometry, noise) amplitudes per kind of region
AMPLITUDE = {
    "object": (1.0, 0.8, 0.0, 1.0, 0.5),
    "part": (0.6, 0.5, 1.0, 1.0, 0.6),
    "clutter": (0.8, 0.6, 0.0, 1.0, 0.5),
    "stuff": (1.0, 0.0, 0.0, 0.5, 0.5),
    "background": (0.3, 0.0, 0.0, 0.5, 0.8),
}


def geometry(boxes: np.ndarray) -> np.ndarray:
    """(K, 4) normalised x1 y1 x2 y2 -> (K, 13) centred box descriptors, with a few sinusoids of the centre so
    that position is not only a linear direction of the feature space."""
    x1, y1, x2, y2 = boxes.T
    cx, cy, w, h = (x1 + x2) / 2, (y1 + y2) / 2, x2 - x1, y2 - y1
    cols = [
        x1 - 0.5,
        y1 - 0.5,
        x2 - 0.5,
        y2 - 0.5,
        cx - 0.5,
        cy - 0.5,
        w,
        h,
        np.sqrt(w * h),
        np.sin(np.pi * cx),
        np.cos(np.pi * cx),
        np.sin(np.pi * cy),
        np.cos(np.pi * cy),
    ]
    return np.stack(cols, axis=1)


class FeatureSpace:
    """The fixed projections for one feature width."""

    def __init__(self, feat_dim: int):
        if feat_dim < 16:
            raise ValueError(f"feat_dim must be >= 16 to carry class, colour and geometry, got {feat_dim}")
        rng = np.random.default_rng([WORLD_SEED, feat_dim])
        self.feat_dim = feat_dim
        self.cls = rng.standard_normal((len(CLASSES), feat_dim))
        self.stuff = rng.standard_normal((len(SETTING_NAMES), feat_dim))
        self.colour = rng.standard_normal((len(ALL_COLOURS), feat_dim))
        self.part = rng.standard_normal(feat_dim)
        self.geo = rng.standard_normal((13, feat_dim)) * 1.5

    def regions(self, scene: Scene, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        """(features (K, F) float32, boxes (K, 4) normalised) for one scene; K in [MIN_REGIONS,
        MAX_REGIONS]."""
        rows = []  # (kind, class vector, colour index or None, box)
        for g in scene.groups:
            for box in g.boxes:
                rows.append(("object", self.cls[g.cls], g.colour, box))
                x1, y1, x2, y2 = box
                for _ in range(int(rng.integers(0, 3))):
                    fw, fh = rng.uniform(0.3, 0.7, size=2)
                    px = x1 + rng.uniform(0, 1 - fw) * (x2 - x1)
                    py = y1 + rng.uniform(0, 1 - fh) * (y2 - y1)
                    rows.append(
                        (
                            "part",
                            self.cls[g.cls],
                            g.colour,
                            (px, py, px + fw * (x2 - x1), py + fh * (y2 - y1)),
                        )
                    )
        for c in scene.clutter:
            rows.append(("clutter", self.cls[c.cls], c.colour, c.box))
        stuff = self.stuff[SETTING_NAMES.index(scene.setting)]
        for _ in range(int(rng.integers(2, 4))):
            top = rng.uniform(0.3, 0.7)
            rows.append(("stuff", stuff, None, (rng.uniform(0, 0.1), top, rng.uniform(0.9, 1.0), 1.0)))
        while len(rows) < MIN_REGIONS:
            w, h = rng.uniform(0.1, 0.5, size=2)
            x1, y1 = rng.uniform(0, 1 - w), rng.uniform(0, 1 - h)
            rows.append(("background", self.cls[int(rng.integers(len(CLASSES)))], None, (x1, y1, x1 + w, y1 + h)))
        rows = rows[:MAX_REGIONS]
        boxes = np.clip(np.asarray([r[3] for r in rows], dtype=np.float64), 0.0, 1.0)
        amp = np.asarray([AMPLITUDE[r[0]] for r in rows])
        colour = np.stack([self.colour[ALL_COLOURS.index(r[2])] if r[2] else np.zeros(self.feat_dim) for r in rows])
        feats = (
            amp[:, :1] * np.stack([r[1] for r in rows])
            + amp[:, 1:2] * colour
            + amp[:, 2:3] * self.part
            + amp[:, 3:4] * (geometry(boxes) @ self.geo)
            + amp[:, 4:5] * rng.standard_normal((len(rows), self.feat_dim))
        )
        order = rng.permutation(len(rows))
        return np.maximum(feats[order], 0.0).astype(np.float32), boxes[order]
