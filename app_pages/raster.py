"""Many map points drawn into one PNG, and the points inside a box or lasso.

Streamlit gives a Plotly chart a new identity whenever its figure changes, so the browser builds
the chart anew on every slider move; for a WebGL scatter that means a new WebGL context each
time (about 0.9 s on a 100k run in headless Chromium, BENCHMARKS (c2)). An image costs the same
whatever the number of points, so a large map is drawn as one, with a hundred or so hoverable
points on top, and a box or lasso is resolved here over every point, drawn or not.
"""

from __future__ import annotations

import base64
import io

import numpy as np
from PIL import Image

WIDTH, HEIGHT = 1200, 600  # pixels; stretched over the plot area
VIRIDIS = ("#440154", "#482878", "#3e4989", "#31688e", "#26828e", "#1f9e89", "#35b779", "#6ece58", "#b5de2b", "#fde725")
PAD = 0.02  # share of the data range left free on each side


def bounds(x: np.ndarray, y: np.ndarray) -> tuple[float, float, float, float]:
    """(x0, x1, y0, y1) of the finite points with a small margin: the map's fixed axis ranges."""
    ok = np.isfinite(x) & np.isfinite(y)
    if not ok.any():
        return 0.0, 1.0, 0.0, 1.0
    box = [float(x[ok].min()), float(x[ok].max()), float(y[ok].min()), float(y[ok].max())]
    dx, dy = max(box[1] - box[0], 1e-9) * PAD, max(box[3] - box[2], 1e-9) * PAD
    return box[0] - dx, box[1] + dx, box[2] - dy, box[3] + dy


def rgb(hex_colour: str) -> np.ndarray:
    return np.array([int(hex_colour[i : i + 2], 16) for i in (1, 3, 5)], dtype=np.uint8)


def viridis(values: np.ndarray, low: float, high: float) -> np.ndarray:
    """Viridis RGB [n, 3] of values scaled from [low, high], as Plotly's scale maps them."""
    stops = np.array([rgb(c) for c in VIRIDIS], dtype=float)
    t = np.clip((np.asarray(values, dtype=float) - low) / max(high - low, 1e-12), 0.0, 1.0)
    where = np.linspace(0.0, 1.0, len(VIRIDIS))
    return np.stack([np.interp(t, where, stops[:, c]) for c in range(3)], axis=1).round().astype(np.uint8)


class Canvas:
    """An RGBA image over fixed data bounds; later layers are drawn over earlier ones."""

    def __init__(self, box: tuple[float, float, float, float], width: int = WIDTH, height: int = HEIGHT) -> None:
        self.box, self.pixels = box, np.zeros((height, width, 4), dtype=np.uint8)

    def draw(self, x: np.ndarray, y: np.ndarray, colours: np.ndarray, size: int = 2, alpha: int = 255) -> None:
        """Points as size x size squares; `colours` one RGB per point, or one for all."""
        height, width = self.pixels.shape[:2]
        x0, x1, y0, y1 = self.box
        ok = np.isfinite(x) & np.isfinite(y)
        col = np.floor((x[ok] - x0) / (x1 - x0) * width).astype(np.int64)
        row = np.floor((y1 - y[ok]) / (y1 - y0) * height).astype(np.int64)  # image rows grow downwards
        colours = np.broadcast_to(np.asarray(colours, dtype=np.uint8), (len(x), 3))[ok]
        rgba = np.concatenate([colours, np.full((len(colours), 1), alpha, dtype=np.uint8)], axis=1)
        for dr in range(size):
            for dc in range(size):
                self.pixels[np.clip(row + dr, 0, height - 1), np.clip(col + dc, 0, width - 1)] = rgba

    def shade(self, x: np.ndarray, y: np.ndarray, colour: np.ndarray | None = None, values: np.ndarray | None = None,
              span: tuple[float, float] = (0.0, 1.0), alpha: int = 255) -> None:  # fmt: skip
        """Points as a density over what the canvas holds: a pixel's opacity grows with the log of
        the points on it (a lone point stays visible, at 30% of `alpha`), its colour is `colour` or
        the Viridis colour of the mean of `values` there (`span`: the scale's ends). For maps of
        millions of points, where drawing squares would only show the last layer's outline."""
        height, width = self.pixels.shape[:2]
        x0, x1, y0, y1 = self.box
        ok = np.isfinite(x) & np.isfinite(y)
        col = np.clip(np.floor((x[ok] - x0) / (x1 - x0) * width).astype(np.int64), 0, width - 1)
        row = np.clip(np.floor((y1 - y[ok]) / (y1 - y0) * height).astype(np.int64), 0, height - 1)
        index = row * width + col
        count = np.bincount(index, minlength=height * width)
        hit = np.flatnonzero(count)
        if not len(hit):
            return
        if values is None:
            src = np.broadcast_to(np.asarray(colour, dtype=float), (len(hit), 3))
        else:
            total = np.bincount(index, weights=np.asarray(values, dtype=float)[ok], minlength=height * width)
            src = viridis(total[hit] / count[hit], *span).astype(float)
        a = alpha / 255 * (0.3 + 0.7 * np.log1p(count[hit]) / np.log1p(count.max()))
        flat = self.pixels.reshape(-1, 4)
        dst, dst_a = flat[hit, :3].astype(float), flat[hit, 3].astype(float) / 255
        out_a = a + dst_a * (1 - a)
        mixed = (src * a[:, None] + dst * (dst_a * (1 - a))[:, None]) / np.maximum(out_a, 1e-9)[:, None]
        flat[hit, :3] = np.clip(mixed.round(), 0, 255).astype(np.uint8)
        flat[hit, 3] = np.clip((out_a * 255).round(), 0, 255).astype(np.uint8)

    def data_uri(self) -> str:
        buffer = io.BytesIO()
        Image.fromarray(self.pixels, "RGBA").save(buffer, format="PNG", compress_level=1)
        return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")

    def layout_image(self) -> dict:
        """The image as a Plotly layout image over the data bounds, under the traces."""
        x0, x1, y0, y1 = self.box
        return dict(source=self.data_uri(), xref="x", yref="y", x=x0, y=y1, sizex=x1 - x0, sizey=y1 - y0,
                    sizing="stretch", layer="below")  # fmt: skip


def inside_polygon(x: np.ndarray, y: np.ndarray, px: np.ndarray, py: np.ndarray) -> np.ndarray:
    """True for the points inside the closed polygon (px, py), by the even-odd rule."""
    inside = np.zeros(len(x), dtype=bool)
    px, py = np.asarray(px, dtype=float), np.asarray(py, dtype=float)
    for i in range(len(px)):
        ax, ay, bx, by = px[i - 1], py[i - 1], px[i], py[i]
        crosses = (ay > y) != (by > y)
        with np.errstate(divide="ignore", invalid="ignore"):
            at = ax + (y - ay) * (bx - ax) / (by - ay)
        inside ^= crosses & (x < at)
    return inside


def inside_shape(x: np.ndarray, y: np.ndarray, shape: dict, box: bool) -> np.ndarray:
    """True for the points inside one box ({"x": [x0, x1], "y": [y0, y1]}) or lasso ({"x": [...],
    "y": [...]}), as Streamlit reports a Plotly selection; NaN points are never inside."""
    if not box:
        return inside_polygon(x, y, shape["x"], shape["y"])
    (xa, xb), (ya, yb) = sorted(shape["x"]), sorted(shape["y"])
    with np.errstate(invalid="ignore"):
        return (x >= xa) & (x <= xb) & (y >= ya) & (y <= yb)


def selected_rows(x: np.ndarray, y: np.ndarray, boxes: list[dict], lassos: list[dict]) -> np.ndarray:
    """Rows inside any of the boxes or lassos."""
    chosen = np.zeros(len(x), dtype=bool)
    for box, shapes in ((True, boxes), (False, lassos)):
        for shape in shapes:
            chosen |= inside_shape(x, y, shape, box)
    return np.flatnonzero(chosen)


def axis_index(ref: str) -> int:
    """0 for Plotly's axis "x" or "y", k - 1 for "xk" / "yk"."""
    return int(ref[1:] or 1) - 1


def panel_rows(columns: list[np.ndarray], boxes: list[dict], lassos: list[dict]) -> np.ndarray | None:
    """Rows inside the boxes and lassos drawn on a grid of panels (a scatter matrix) whose axes
    "x", "x2", ... and "y", "y2", ... show `columns` in that order; None when a selection does not
    say which panel it was drawn on."""
    chosen = np.zeros(len(columns[0]), dtype=bool)
    for box, shapes in ((True, boxes), (False, lassos)):
        for shape in shapes:
            if not shape.get("xref") or not shape.get("yref"):
                return None
            chosen |= inside_shape(columns[axis_index(shape["xref"])], columns[axis_index(shape["yref"])], shape, box)
    return np.flatnonzero(chosen)
