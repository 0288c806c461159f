"""Where the model looks: a caption's attention weights drawn as pictures, and written as JSON (numpy + Pillow).

The decoder attends over the image's regions at every word (docs/model.md, "Decoder step"); the weights of each
chosen word come from the search (``Captioner.caption(..., return_attention=True)``, per head). A picture shows the
mean over heads, one panel per word with the word as its title, after a first panel with the picture itself:

* **grid features** (an image extractor's cells, ``grid`` = (rows, columns)): the cell weights as a smooth map
  over the picture (bicubic interpolation between the cells' centres);
* **region features with boxes** (bottom-up ``cocobu_box``): each box filled with its weight, overlapping boxes
  adding up; on the picture when there is one, else on a grey canvas that shows the boxes' outlines;
* **no boxes**: a bar chart of the weights over the regions, by index.

Every panel is scaled to its own maximum (the JSON has the raw weights). docs/attention.md has examples.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

__all__ = ["attention_record", "colormap", "draw_attention", "grid_shape", "weight_map"]

# A perceptually ordered dark-to-bright ramp (the "inferno" colour map sampled at 0, 1/4, 1/2, 3/4, 1): unattended
# parts of the picture go dark, attended ones bright.
_RAMP = np.array(
    [[0, 0, 4], [87, 16, 110], [188, 55, 84], [249, 142, 9], [252, 255, 164]], dtype=np.float32
)
OVERLAY = 0.6  # share of the colour map in a panel, the rest is the picture
BACKGROUND = (255, 255, 255)
CANVAS = (225, 225, 225)
TEXT = (20, 20, 20)


def colormap(v: np.ndarray) -> np.ndarray:
    """Values in 0..1 -> uint8 RGB [..., 3] along the ramp."""
    x = np.clip(np.asarray(v, dtype=np.float32), 0.0, 1.0) * (len(_RAMP) - 1)
    lo = np.minimum(x.astype(np.int64), len(_RAMP) - 2)
    frac = (x - lo)[..., None]
    return np.rint(_RAMP[lo] * (1.0 - frac) + _RAMP[lo + 1] * frac).astype(np.uint8)


def grid_shape(boxes: np.ndarray, rtol: float = 1e-3) -> tuple[int, int] | None:
    """(rows, columns) when ``boxes`` [N, 4] (x1, y1, x2, y2) are the cells of a grid in row-major order that tile
    their extent (an image extractor's cells, as ``aoanet-data extract`` writes them to cocobu_box); else None."""
    boxes = np.asarray(boxes, dtype=np.float64)
    if boxes.ndim != 2 or boxes.shape[1] != 4 or len(boxes) == 0:
        return None
    scale = max(float(np.abs(boxes).max()), 1e-12) * rtol
    xs, ys = np.unique(np.round(boxes[:, 0] / scale)), np.unique(np.round(boxes[:, 1] / scale))
    rows, cols = len(ys), len(xs)
    if rows * cols != len(boxes):
        return None
    cells = boxes.reshape(rows, cols, 4)
    same_row = np.allclose(cells[:, :, 1], cells[:, :1, 1], atol=scale) and np.allclose(
        cells[:, :, 3], cells[:, :1, 3], atol=scale
    )
    same_col = np.allclose(cells[:, :, 0], cells[:1, :, 0], atol=scale) and np.allclose(
        cells[:, :, 2], cells[:1, :, 2], atol=scale
    )
    ordered = np.all(np.diff(cells[0, :, 0]) > 0) and np.all(np.diff(cells[:, 0, 1]) > 0)
    # neighbours touch: each cell starts where the previous one ends
    touching = np.allclose(cells[0, 1:, 0], cells[0, :-1, 2], atol=scale) and np.allclose(
        cells[1:, 0, 1], cells[:-1, 0, 3], atol=scale
    )
    return (rows, cols) if same_row and same_col and ordered and touching else None


def weight_map(
    weights: np.ndarray, size: tuple[int, int], boxes: np.ndarray, grid: tuple[int, int] | None = None
) -> np.ndarray:
    """float32 [height, width] of a canvas of ``size`` = (width, height): the regions' ``weights`` [N] spread over
    their ``boxes`` [N, 4] (canvas pixels). ``grid`` (rows, columns): the boxes are row-major cells and the map is
    interpolated smoothly between the cells' centres (bicubic, clipped at 0); otherwise each box is filled with its
    weight and overlapping boxes add up."""
    width, height = int(size[0]), int(size[1])
    weights = np.asarray(weights, dtype=np.float32)
    boxes = np.asarray(boxes, dtype=np.float64)
    out = np.zeros((height, width), dtype=np.float32)
    if grid is not None:
        rows, cols = grid
        x1, y1 = boxes[:, 0].min(), boxes[:, 1].min()
        x2, y2 = boxes[:, 2].max(), boxes[:, 3].max()
        left, top = max(0, int(round(x1))), max(0, int(round(y1)))
        right, bottom = min(width, int(round(x2))), min(height, int(round(y2)))
        if right > left and bottom > top:
            cells = Image.fromarray(weights.reshape(rows, cols).astype(np.float32), "F")
            smooth = np.asarray(cells.resize((right - left, bottom - top), Image.Resampling.BICUBIC))
            out[top:bottom, left:right] = np.maximum(smooth, 0.0)
        return out
    for w, (x1, y1, x2, y2) in zip(weights, boxes):
        left, top = max(0, int(math.floor(x1))), max(0, int(math.floor(y1)))
        right, bottom = min(width, int(math.ceil(x2))), min(height, int(math.ceil(y2)))
        if right > left and bottom > top:
            out[top:bottom, left:right] += w
    return out


def _font(size: int):
    try:
        return ImageFont.load_default(size=size)  # Pillow >= 10.1 with FreeType: a scalable font
    except TypeError:
        return ImageFont.load_default()


def _text_width(draw: ImageDraw.ImageDraw, text: str, font) -> float:
    return draw.textlength(text, font=font)


def _fit(draw: ImageDraw.ImageDraw, text: str, font, width: int) -> str:
    """``text`` shortened with an ellipsis to fit ``width`` pixels."""
    if _text_width(draw, text, font) <= width:
        return text
    while text and _text_width(draw, text + "…", font) > width:
        text = text[:-1]
    return text + "…"


def _wrap(draw: ImageDraw.ImageDraw, text: str, font, width: int) -> list[str]:
    lines, line = [], ""
    for word in text.split():
        trial = f"{line} {word}".strip()
        if line and _text_width(draw, trial, font) > width:
            lines.append(line)
            line = word
        else:
            line = trial
    return [*lines, line] if line else lines


def _heat_panel(base: np.ndarray, heat: np.ndarray) -> Image.Image:
    """``base`` uint8 [h, w, 3] under the colour map of ``heat`` [h, w] scaled to its maximum."""
    peak = float(heat.max(initial=0.0))
    v = heat / peak if peak > 0 else heat
    mixed = base.astype(np.float32) * (1.0 - OVERLAY) + colormap(v).astype(np.float32) * OVERLAY
    return Image.fromarray(np.clip(np.rint(mixed), 0, 255).astype(np.uint8), "RGB")


def _bar_panel(weights: np.ndarray, size: tuple[int, int], font) -> Image.Image:
    """A bar per region (index order), heights scaled to the panel's maximum weight."""
    w, h = size
    img = Image.new("RGB", size, CANVAS)
    draw = ImageDraw.Draw(img)
    n = len(weights)
    margin, axis = 6, 14
    peak = float(np.max(weights, initial=0.0)) or 1.0
    span = (w - 2 * margin) / max(n, 1)
    for i, value in enumerate(weights):
        top = (h - axis) - (h - axis - margin) * float(value) / peak
        colour = tuple(int(c) for c in colormap(float(value) / peak))
        draw.rectangle([margin + i * span, top, margin + (i + 1) * span - (span > 3), h - axis], fill=colour)
    draw.line([margin, h - axis, w - margin, h - axis], fill=TEXT)
    draw.text((margin, h - axis + 1), "0", fill=TEXT, font=font)
    last = str(n - 1)
    draw.text((w - margin - _text_width(draw, last, font), h - axis + 1), last, fill=TEXT, font=font)
    return img


def draw_attention(
    tokens: Sequence[str],
    weights: np.ndarray,
    picture: Image.Image | None = None,
    boxes: np.ndarray | None = None,
    grid: tuple[int, int] | None = None,
    size: tuple[int, int] | None = None,
    caption: str | None = None,
    panel: int = 192,
    columns: int = 5,
) -> Image.Image:
    """One picture: the image, then one panel per token with the token as its title.

    ``weights``: [T, N] or [T, heads, N] (the mean over heads is drawn) for the T ``tokens`` over the N regions.
    ``picture``: the image (RGB); ``boxes`` [N, 4]: the regions in its pixels (or, without a picture, in those of a
    canvas of ``size``, by default the boxes' extent); ``grid``: (rows, columns) when the boxes are an extractor's
    cells (drawn smoothly; found from the boxes with ``grid_shape`` when not given). Without boxes: a bar chart per
    token. ``caption``: a header line (default: the tokens joined). ``panel``: the longer side of a panel in pixels.
    """
    weights = np.asarray(weights, dtype=np.float32)
    if weights.ndim == 3:
        weights = weights.mean(axis=1)
    if weights.ndim != 2 or weights.shape[0] != len(tokens):
        raise ValueError(f"weights must be [tokens, regions] or [tokens, heads, regions] for {len(tokens)} tokens, "
                         f"got shape {weights.shape}")
    n = weights.shape[1]
    if boxes is not None:
        boxes = np.asarray(boxes, dtype=np.float64)
        if boxes.shape != (n, 4):
            raise ValueError(f"boxes must be [{n}, 4] (one per region: x1 y1 x2 y2), got shape {boxes.shape}")
        if grid is None:
            grid = grid_shape(boxes)
        elif grid[0] * grid[1] != n:
            raise ValueError(f"a grid of {grid[0]}x{grid[1]} cells for {n} regions")
    font, title_font = _font(13), _font(15)

    if boxes is None:
        pw, ph = panel, int(panel * 0.6)
        base = None
    else:
        if picture is not None:
            full = picture.size
        elif size is not None:
            full = (int(size[0]), int(size[1]))
        else:
            full = (max(1, int(math.ceil(boxes[:, 2].max()))), max(1, int(math.ceil(boxes[:, 3].max()))))
        scale = panel / max(full)
        pw, ph = max(1, int(round(full[0] * scale))), max(1, int(round(full[1] * scale)))
        if picture is not None:
            base_img = picture.convert("RGB").resize((pw, ph), Image.Resampling.BILINEAR)
        else:
            base_img = Image.new("RGB", (pw, ph), CANVAS)
            outline = ImageDraw.Draw(base_img)
            for x1, y1, x2, y2 in boxes * scale:
                outline.rectangle([x1, y1, x2, y2], outline=(150, 150, 150))
        base = np.asarray(base_img)
        scaled_boxes = boxes * scale

    panels: list[tuple[str, Image.Image]] = []
    if base is not None:
        panels.append(("(picture)" if picture is not None else "(regions)", Image.fromarray(base)))
    elif picture is not None:
        scale = panel / max(picture.size)
        thumb = picture.convert("RGB").resize(
            (max(1, int(picture.size[0] * scale)), max(1, int(picture.size[1] * scale))), Image.Resampling.BILINEAR
        )
        panels.append(("(picture)", thumb))
    for t, token in enumerate(tokens):
        if base is None:
            panels.append((token, _bar_panel(weights[t], (pw, ph), font)))
        else:
            panels.append((token, _heat_panel(base, weight_map(weights[t], (pw, ph), scaled_boxes, grid))))

    if not panels:  # an empty caption of features without boxes: nothing to draw but the header
        panels.append(("(no words)", Image.new("RGB", (pw, ph), CANVAS)))
    cols = max(1, min(columns, len(panels)))
    rows = math.ceil(len(panels) / cols)
    cell_w = max(p.size[0] for _, p in panels) + 8
    title_h, pad = 20, 8
    cell_h = max(p.size[1] for _, p in panels) + title_h + pad
    width = cols * cell_w + pad
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    header = _wrap(probe, caption if caption is not None else " ".join(tokens), title_font, width - 2 * pad)
    header_h = pad + 20 * max(1, len(header))
    out = Image.new("RGB", (width, header_h + rows * cell_h + pad), BACKGROUND)
    draw = ImageDraw.Draw(out)
    for i, line in enumerate(header):
        draw.text((pad, pad + 20 * i), line, fill=TEXT, font=title_font)
    for i, (title, img) in enumerate(panels):
        x = pad + (i % cols) * cell_w
        y = header_h + (i // cols) * cell_h
        text = _fit(draw, title, font, cell_w - 8)
        draw.text((x + (img.size[0] - _text_width(draw, text, font)) / 2, y + 2), text, fill=TEXT, font=font)
        out.paste(img, (x, y + title_h))
    return out


def attention_record(
    tokens: Sequence[str],
    weights: np.ndarray,
    boxes: np.ndarray | None = None,
    grid: tuple[int, int] | None = None,
    digits: int = 6,
    **fields,
) -> dict:
    """The JSON of one image's attention: ``fields`` (image_id, caption, ...), then ``tokens``, ``regions``,
    ``heads``, ``attention`` (per token, the mean over heads, [T][N]), ``attention_heads`` ([T][heads][N]),
    ``boxes`` ([N][4] or null), ``grid`` ([rows, columns] or null) and ``drawn_as`` (grid, boxes or bars)."""
    weights = np.asarray(weights, dtype=np.float64)
    if weights.ndim == 2:
        weights = weights[:, None, :]
    drawn = "bars" if boxes is None else ("grid" if grid is not None else "boxes")
    return {
        **fields,
        "tokens": list(tokens),
        "regions": int(weights.shape[2]),
        "heads": int(weights.shape[1]),
        "attention": np.round(weights.mean(axis=1), digits).tolist(),
        "attention_heads": np.round(weights, digits).tolist(),
        "boxes": None if boxes is None else np.round(np.asarray(boxes, dtype=np.float64), 2).tolist(),
        "grid": None if grid is None else [int(grid[0]), int(grid[1])],
        "drawn_as": drawn,
    }


class AttentionWriter:
    """Writes ``<image id>.png`` (``draw_attention``) and ``<image id>.json`` (``attention_record``) per image into
    ``directory``, each atomically (``aoanet-infer --attention DIR``). Pictures are decoded again for drawing, at
    a reduced scale when they are JPEGs (``aoanet_runtime.images.load_rgb``).

    ``background=True``: ``write`` hands the drawing to one worker thread (Pillow and numpy release the GIL for most
    of it) and returns, so that drawing overlaps the next batch's decoding; ``close()`` waits for every drawing and
    raises the first error. At most ``max_pending`` drawings wait at once."""

    def __init__(self, directory, panel: int = 192, columns: int = 5, background: bool = False,
                 max_pending: int = 64):
        from pathlib import Path

        self.directory, self.panel, self.columns = Path(directory), int(panel), int(columns)
        self.written = 0
        self.seconds = 0.0  # spent drawing and writing (on the worker thread when in the background)
        self._pool = None
        self._pending: list = []
        self._max_pending = int(max_pending)
        if background:
            from concurrent.futures import ThreadPoolExecutor

            self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="aoanet-attention")

    def write(self, image_id, caption: str, tokens: Sequence[str], weights: np.ndarray, **kwargs) -> None:
        """Draw and write one image's attention (see ``draw_one`` for the arguments); in the background when the
        writer was made with ``background=True``."""
        if self._pool is None:
            self.draw_one(image_id, caption, tokens, weights, **kwargs)
            return
        while len(self._pending) >= self._max_pending:
            self._pending.pop(0).result()
        still = []
        for future in self._pending:
            if future.done():
                future.result()  # a drawing's error is raised here, at the latest by close()
            else:
                still.append(future)
        self._pending = still
        self._pending.append(self._pool.submit(self.draw_one, image_id, caption, tokens, weights, **kwargs))

    def close(self) -> None:
        """Wait for the drawings still running (raising the first error) and stop the worker."""
        if self._pool is None:
            return
        try:
            for future in self._pending:
                future.result()
        finally:
            for future in self._pending:
                future.cancel()
            self._pending = []
            self._pool.shutdown(wait=True)
            self._pool = None

    def draw_one(
        self,
        image_id,
        caption: str,
        tokens: Sequence[str],
        weights: np.ndarray,
        picture=None,
        boxes: np.ndarray | None = None,
        grid: tuple[int, int] | None = None,
        size: tuple[int, int] | None = None,
        **fields,
    ) -> None:
        """``picture``: a path (or PIL image) to draw on; ``boxes`` [N, 4] in the pixels of an image of ``size`` =
        (width, height) (the picture's size when not given; without a picture, the canvas); ``grid``: found from the
        boxes when not given; ``fields``: more JSON fields (file_name, ...). The JSON keeps the boxes as given."""
        import time

        from aoanet_runtime import atomic
        from aoanet_runtime.images import load_rgb

        start = time.perf_counter()
        if boxes is not None and grid is None:
            grid = grid_shape(boxes)
        img, drawn_boxes = None, boxes
        if picture is not None:
            img = picture if isinstance(picture, Image.Image) else load_rgb(picture, min_size=self.panel)
            if size is None:
                size = img.size
            elif boxes is not None and tuple(size) != img.size:
                # a JPEG is decoded at a reduced scale for drawing: the boxes follow
                sx, sy = img.size[0] / size[0], img.size[1] / size[1]
                drawn_boxes = np.asarray(boxes, np.float64) * np.array([sx, sy, sx, sy])
        drawing = draw_attention(tokens, weights, img, drawn_boxes, grid, size if img is None else None, caption,
                                 self.panel, self.columns)
        record = attention_record(tokens, weights, boxes, grid, image_id=image_id, caption=caption, **fields)
        record["image_size"] = None if size is None else [int(size[0]), int(size[1])]
        with atomic.atomic_path(self.directory / f"{image_id}.png") as tmp, open(tmp, "wb") as f:
            # zlib level 3: a third of the default level's time for files ~10% larger (docs/attention.md)
            drawing.save(f, format="PNG", compress_level=3)
        atomic.write_json(self.directory / f"{image_id}.json", record, ensure_ascii=False)
        self.written += 1
        self.seconds += time.perf_counter() - start
