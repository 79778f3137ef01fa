"""The synthetic captioned video world: one coloured shape moving over a plain background.

Everything is deterministic by seed and rendered on the fly with numpy (nothing is stored on disk).
Shapes are anti-aliased analytically: each pixel's coverage is ``clip(0.5 - d, 0, 1)`` where ``d`` is
the signed distance (in pixels) from the pixel centre to the shape's edge. The vocabulary is fixed so
that any scorer can use it (:data:`COLOURS`, :data:`SHAPES`, :data:`BACKGROUNDS`, :data:`MOTIONS`).
"""

from __future__ import annotations

import itertools
import re
from dataclasses import asdict, dataclass

import numpy as np

SHAPES = ("circle", "square", "triangle")
COLOURS = {  # sRGB, 0-255
    "red": (220, 40, 40), "green": (40, 190, 70), "blue": (50, 90, 230), "yellow": (235, 210, 40),
    "magenta": (210, 60, 200), "cyan": (40, 200, 210), "white": (240, 240, 240),
}
BACKGROUNDS = {"black": (16, 16, 16), "gray": (128, 128, 128)}
MOTIONS = ("left", "right", "up", "down", "still")
SIZES = ("small", "medium", "large")  # "medium" is the default size: no size word in the caption
# Shape half-extent as a fraction of the frame side (circle radius, half the square side, triangle circumradius).
SIZE_RADIUS = {"small": 0.09, "medium": 0.13, "large": 0.18}
TRAVEL = (0.45, 0.6)  # fraction of the frame a moving shape crosses over the clip (the issue asks >= 40%)
FRAMES, FPS, RESOLUTION = 17, 16, 64


@dataclass(frozen=True)
class Scene:
    shape: str
    colour: str
    background: str
    motion: str
    size: str
    start: tuple[float, float]  # centre (x, y) at the first frame, in fractions of the frame
    end: tuple[float, float]  # centre at the last frame

    def attributes(self) -> dict:
        return {"colour": self.colour, "shape": self.shape, "motion": self.motion, "background": self.background}

    def as_dict(self) -> dict:
        return asdict(self)


def sample_scene(rng: np.random.Generator, shape=None, colour=None, background=None, motion=None,
                 size=None) -> Scene:
    """A random scene; any attribute given is fixed. The shape stays fully inside the frame."""
    shape = shape or SHAPES[rng.integers(len(SHAPES))]
    colour = colour or list(COLOURS)[rng.integers(len(COLOURS))]
    background = background or list(BACKGROUNDS)[rng.integers(len(BACKGROUNDS))]
    motion = motion or MOTIONS[rng.integers(len(MOTIONS))]
    size = size or SIZES[rng.integers(len(SIZES))]
    margin = SIZE_RADIUS[size] + 0.03
    lo, hi = margin, 1.0 - margin
    if motion == "still":
        p = (float(rng.uniform(lo, hi)), float(rng.uniform(lo, hi)))
        return Scene(shape, colour, background, motion, size, p, p)
    travel = float(rng.uniform(*TRAVEL))
    travel = min(travel, hi - lo)
    a = float(rng.uniform(lo, max(lo, hi - travel)))  # start along the motion axis (before the sign)
    b = float(rng.uniform(lo, hi))  # position on the other axis
    along = {"right": (a, a + travel), "left": (1 - a, 1 - a - travel),
             "down": (a, a + travel), "up": (1 - a, 1 - a - travel)}[motion]
    if motion in ("left", "right"):
        return Scene(shape, colour, background, motion, size, (along[0], b), (along[1], b))
    return Scene(shape, colour, background, motion, size, (b, along[0]), (b, along[1]))


def _signed_distance(shape: str, px: np.ndarray, py: np.ndarray, cx: float, cy: float, r: float) -> np.ndarray:
    dx, dy = px - cx, py - cy
    if shape == "circle":
        return np.hypot(dx, dy) - r
    if shape == "square":
        return np.maximum(np.abs(dx), np.abs(dy)) - r
    # Upward equilateral triangle with circumradius r (apex at top; image y grows downwards):
    # the maximum of the distances to its three edge lines (exact inside, a close bound outside).
    inner = r / 2
    s3 = np.sqrt(3.0) / 2
    return np.maximum.reduce([dy - inner, -s3 * dx - 0.5 * dy - inner, s3 * dx - 0.5 * dy - inner])


def render_frame(scene: Scene, t: float, resolution: int = RESOLUTION) -> np.ndarray:
    """The frame at clip time ``t`` in [0, 1]: float32 ``[H, W, 3]`` sRGB in [0, 1]."""
    n = resolution
    cx = (scene.start[0] + (scene.end[0] - scene.start[0]) * t) * n
    cy = (scene.start[1] + (scene.end[1] - scene.start[1]) * t) * n
    centres = np.arange(n, dtype=np.float64) + 0.5
    px, py = np.meshgrid(centres, centres)
    coverage = np.clip(0.5 - _signed_distance(scene.shape, px, py, cx, cy, SIZE_RADIUS[scene.size] * n), 0.0, 1.0)
    bg = np.asarray(BACKGROUNDS[scene.background], np.float64) / 255
    fg = np.asarray(COLOURS[scene.colour], np.float64) / 255
    return (bg + coverage[..., None] * (fg - bg)).astype(np.float32)


def render_clip(scene: Scene, frames: int = FRAMES, resolution: int = RESOLUTION) -> np.ndarray:
    """``[frames, H, W, 3]`` float32 in [0, 1]; a single frame (an image) shows the clip's middle."""
    if frames == 1:
        return render_frame(scene, 0.5, resolution)[None]
    return np.stack([render_frame(scene, k / (frames - 1), resolution) for k in range(frames)])


# --------------------------------------------------------------------------------------------------
# Captions
# --------------------------------------------------------------------------------------------------

_MOVING = [
    "a {size}{colour} {shape} moving {motion} on a {background} background",  # canonical (index 0)
    "a {size}{colour} {shape} moves {to}{motion}",
    "{colour} {shape}, moving {motion}, {background} background",
    "a {size}{colour} {shape} sliding {motion} across a {background} background",
    "a {colour} {shape} goes {motion} over a {background} background",
    "{size}{colour} {shape} moving {motion}",
]
_STILL = [
    "a {size}{colour} {shape} standing still on a {background} background",  # canonical (index 0)
    "a {size}{colour} {shape} that does not move",
    "{colour} {shape}, still, {background} background",
    "a motionless {size}{colour} {shape} on a {background} background",
    "a {colour} {shape} resting on a {background} background",
    "{size}{colour} {shape} standing still",
]
_IMAGE = [
    "an image of a {size}{colour} {shape} on a {background} background",
    "a picture of a {colour} {shape}",
    "{colour} {shape}, {background} background, photo",
]


def _fill(template: str, scene: Scene) -> str:
    return template.format(size="" if scene.size == "medium" else scene.size + " ", colour=scene.colour,
                           shape=scene.shape, motion=scene.motion, background=scene.background,
                           to="to the " if scene.motion in ("left", "right") else "")


def canonical_caption(scene: Scene) -> str:
    return _fill((_STILL if scene.motion == "still" else _MOVING)[0], scene)


def caption(scene: Scene, rng: np.random.Generator, canonical_prob: float = 0.5, image: bool = False) -> str:
    """A training caption: the canonical form with probability ``canonical_prob``, else a paraphrase."""
    if image:
        templates = _IMAGE
    else:
        templates = _STILL if scene.motion == "still" else _MOVING
        if rng.uniform() < canonical_prob:
            return _fill(templates[0], scene)
    return _fill(templates[int(rng.integers(len(templates)))], scene)


def scene_captions(scene: Scene) -> list[str]:
    """Every caption :func:`caption` can give ``scene`` (clip and image forms)."""
    return [_fill(t, scene) for t in (_STILL if scene.motion == "still" else _MOVING) + _IMAGE]


def all_captions() -> list[str]:
    """Every caption the world can produce (the sentencepiece training corpus)."""
    out = []
    for shape, colour, bg, motion, size in itertools.product(SHAPES, COLOURS, BACKGROUNDS, MOTIONS, SIZES):
        out += scene_captions(Scene(shape, colour, bg, motion, size, (0.5, 0.5), (0.5, 0.5)))
    return sorted(set(out))


# What a caption says, word by word (paraphrases included); what it leaves out is "unsaid". The text
# encoder's pre-training predicts these from every token (recipe/stages.py), so that each position of its
# output carries the whole prompt, not only its own word.
CAPTION_ATTRIBUTES = {"colour": tuple(COLOURS), "shape": SHAPES, "motion": (*MOTIONS, "unsaid"),
                      "background": (*BACKGROUNDS, "unsaid"), "size": ("small", "large", "unsaid")}
_STILL_WORDS = ("still", "motionless", "does not move", "resting")


def caption_attributes(text: str) -> dict[str, str]:
    """The attributes a (canonical or paraphrased) caption states: {name: value or "unsaid"}."""
    words = re.findall(r"[a-z]+", text.lower())
    joined = " ".join(words)

    def first(values, default="unsaid"):
        return next((v for v in values if v in words), default)

    motion = "still" if any(w in joined for w in _STILL_WORDS) else first(MOTIONS[:4])
    background = next((b for b in BACKGROUNDS if f"{b} background" in joined), "unsaid")
    return {"colour": first(COLOURS), "shape": first(SHAPES), "motion": motion, "background": background,
            "size": first(("small", "large"))}


_CANONICAL = re.compile(r"a (?:(small|large) )?(\w+) (\w+) (?:moving (\w+)|standing still) on a (\w+) background")


def parse_caption(text: str) -> dict:
    """Attributes of a canonical caption (``ValueError`` for anything else)."""
    m = _CANONICAL.fullmatch(text.strip().lower())
    if not m or m.group(2) not in COLOURS or m.group(3) not in SHAPES or m.group(5) not in BACKGROUNDS \
            or (m.group(4) is not None and m.group(4) not in MOTIONS[:4]):
        raise ValueError(f"not a canonical world caption: {text!r} (expected e.g. 'a red circle moving left on a "
                         f"black background' or 'a small blue square standing still on a gray background')")
    return {"colour": m.group(2), "shape": m.group(3), "motion": m.group(4) or "still", "background": m.group(5),
            "size": m.group(1) or "medium"}


def eval_prompts() -> list[str]:
    """The fixed evaluation set: every colour x shape x motion once (105), backgrounds alternating."""
    out = []
    for i, (colour, shape, motion) in enumerate(itertools.product(COLOURS, SHAPES, MOTIONS)):
        bg = list(BACKGROUNDS)[i % len(BACKGROUNDS)]
        out.append(canonical_caption(Scene(shape, colour, bg, motion, "medium", (0.5, 0.5), (0.5, 0.5))))
    return out


def batch(seed: int, step: int, size: int, frames: int = FRAMES, resolution: int = RESOLUTION,
          image_fraction: float = 0.0, canonical_prob: float = 0.5) -> tuple[np.ndarray, list[str], list[Scene]]:
    """Training batch ``step`` of a run with ``seed``: clips ``[size, frames, H, W, 3]``, captions, scenes.

    Depends only on (seed, step), so a resumed run sees exactly the batches an uninterrupted one does.
    With ``image_fraction`` > 0 the whole batch is single images (``frames`` = 1) that often.
    """
    rng = np.random.default_rng([int(seed), int(step)])
    image = bool(rng.uniform() < image_fraction)
    scenes = [sample_scene(rng) for _ in range(size)]
    clips = np.stack([render_clip(s, 1 if image else frames, resolution) for s in scenes])
    captions = [caption(s, rng, canonical_prob, image=image) for s in scenes]
    return clips, captions, scenes
