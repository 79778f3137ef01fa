"""Prompt-faithfulness score of a world video, from its frames alone.

1. Background: the median colour of the frame border over all frames (the world's shapes never touch it).
2. Segmentation: each pixel's coverage ``alpha`` is its distance from the background colour as a fraction
   ``c`` of the shape colour's distance, through the ramp ``clip((c - 0.2) / 0.6, 0, 1)``; the shape
   colour is the median of the pixels that differ most from the background. The ramp leaves the area of
   anti-aliased edges unchanged on average (coverage uniform over [0, 1] keeps its mean 1/2) but gives
   no area to faint noise: a decoder's background ripple of 0.05 over 4,000 pixels would otherwise add
   the area of a second shape.
3. Colour: the nearest palette entry to that median colour (Euclidean in sRGB).
4. Shape: the fill ratio ``area / bounding-box area`` (area = sum of alpha, box from alpha > 0.5) in the
   frames where the shape is visible: circle pi/4, square 1, upward triangle 1/2; nearest wins, except
   that a centroid low in the box (the triangle's sits at 2/3 of its height) means triangle.
5. Motion: the alpha-weighted centroid's displacement from the first frames to the last; under 20% of
   the frame is ``still``, otherwise the dominant axis and sign.
"""

from __future__ import annotations

import math

import numpy as np

from .world import BACKGROUNDS, COLOURS, MOTIONS, SHAPES

FILL_RATIO = {"circle": math.pi / 4, "square": 1.0, "triangle": 0.5}
TRIANGLE_OFFSET = 0.59
ALPHA_FLOOR = 0.2  # fraction of the shape's contrast below which a pixel counts as background
STILL_THRESHOLD = 0.2  # fraction of the frame; moving shapes in the world cross >= 0.45
ATTRIBUTES = ("colour", "shape", "motion")


def _nearest(value: np.ndarray, palette: dict) -> str:
    names = list(palette)
    ref = np.asarray([palette[n] for n in names], np.float64) / 255
    return names[int(np.argmin(np.linalg.norm(ref - value[None], axis=1)))]


def analyse(frames: np.ndarray) -> dict:
    """Frames ``[F, H, W, 3]`` in [0, 1] -> predicted ``colour``, ``shape``, ``motion``, ``background`` and
    the features they came from. An attribute that cannot be measured (no shape found) is ``None``."""
    frames = np.asarray(frames, np.float64)
    if frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"frames must be [F, H, W, 3], got {frames.shape}")
    f, h, w, _ = frames.shape
    border = np.concatenate([frames[:, 0], frames[:, -1], frames[:, :, 0], frames[:, :, -1]], axis=1)
    bg = np.median(border.reshape(-1, 3), axis=0)
    dist = np.linalg.norm(frames - bg, axis=-1)  # [F, H, W]
    out = {"background": _nearest(bg, BACKGROUNDS), "background_rgb": bg.tolist(), "colour": None, "shape": None,
           "motion": None}
    peak = dist.reshape(f, -1).max(axis=1)
    visible = peak > 0.15
    if not visible.any():
        return out
    strong = dist > 0.7 * peak[:, None, None]
    core = frames[strong & visible[:, None, None]]
    fg = np.median(core, axis=0)
    out["colour"], out["colour_rgb"] = _nearest(fg, COLOURS), fg.tolist()
    contrast = max(float(np.linalg.norm(fg - bg)), 1e-3)
    alpha = np.clip((dist / contrast - ALPHA_FLOOR) / (1 - 2 * ALPHA_FLOOR), 0.0, 1.0)
    ys, xs = np.arange(h) + 0.5, np.arange(w) + 0.5
    ratios, offsets, centres = [], [], []
    for k in range(f):
        a = alpha[k]
        mass = a.sum()
        if not visible[k] or mass < 2.0:
            centres.append(None)
            continue
        centres.append(((a.sum(0) * xs).sum() / mass / w, (a.sum(1) * ys).sum() / mass / h))
        rows, cols = np.nonzero(a > 0.5)
        if rows.size:
            box = (rows.max() - rows.min() + 1) * (cols.max() - cols.min() + 1)
            ratios.append(mass / box)
            top, height = rows.min(), rows.max() - rows.min() + 1
            offsets.append(((a.sum(1) * (np.arange(h) - top + 0.5)).sum() / mass) / height)
    if ratios:
        ratio = float(np.median(ratios))
        offset = float(np.median(offsets))
        out["fill_ratio"], out["centroid_offset"] = ratio, offset
        # An upward triangle's mass sits low in its box (centroid at 2/3 of the height, 1/2 for the others).
        out["shape"] = "triangle" if offset > TRIANGLE_OFFSET else min(SHAPES, key=lambda s: abs(FILL_RATIO[s] - ratio))
    seen = [c for c in centres if c is not None]
    if len(seen) >= 2:
        n = max(1, len(seen) // 5)
        first, last = np.mean(seen[:n], axis=0), np.mean(seen[-n:], axis=0)
        dx, dy = last - first
        out["displacement"] = [float(dx), float(dy)]
        if max(abs(dx), abs(dy)) < STILL_THRESHOLD:
            out["motion"] = "still"
        elif abs(dx) >= abs(dy):
            out["motion"] = "right" if dx > 0 else "left"
        else:
            out["motion"] = "down" if dy > 0 else "up"
    elif len(seen) == 1:
        out["motion"] = "still"
    return out


def consistency(frames: np.ndarray) -> dict:
    """Frame-to-frame consistency: background flicker (mean |change| of pixels far from the shape in both
    frames, 0-1 scale) and the relative spread of the shape's area over the clip (std / mean)."""
    frames = np.asarray(frames, np.float64)
    if frames.shape[0] < 2:
        return {"background_flicker": 0.0, "area_spread": 0.0}
    border = np.concatenate([frames[:, 0], frames[:, -1], frames[:, :, 0], frames[:, :, -1]], axis=1)
    bg = np.median(border.reshape(-1, 3), axis=0)
    dist = np.linalg.norm(frames - bg, axis=-1)
    far = dist < 0.1
    both = far[1:] & far[:-1]
    change = np.abs(np.diff(frames, axis=0)).mean(-1)
    flicker = float(change[both].mean()) if both.any() else 0.0
    areas = (dist > 0.15).reshape(frames.shape[0], -1).sum(1).astype(np.float64)
    spread = float(areas.std() / areas.mean()) if areas.mean() > 0 else 1.0
    return {"background_flicker": flicker, "area_spread": spread}


def score(predicted: dict, expected: dict) -> dict:
    """Per-attribute correctness (bool) and ``all`` for one video."""
    result = {a: predicted.get(a) == expected[a] for a in ATTRIBUTES}
    result["all"] = all(result.values())
    return result


def summarise(rows: list[dict]) -> dict:
    """Accuracy per attribute and all-correct over rows of :func:`score` results."""
    n = max(1, len(rows))
    return {k: sum(bool(r[k]) for r in rows) / n for k in (*ATTRIBUTES, "all")} | {"videos": len(rows)}


def chance_levels() -> dict:
    """Accuracy of uniform guessing (what noise should score near)."""
    c, s, m = 1 / len(COLOURS), 1 / len(SHAPES), 1 / len(MOTIONS)
    return {"colour": c, "shape": s, "motion": m, "all": c * s * m}
