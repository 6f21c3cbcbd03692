"""Procedural Shapes data: seeded 64x64 RGB renders of one shape, captions from a small grammar, exact labels.

Every image carries five ground-truth attributes (indices into :data:`ATTRIBUTES`): ``shape`` (5 kinds),
``colour`` (8), ``size`` (2), ``position`` (5) and ``background`` (3) — 1,200 combinations. About 10% of the
combinations (:func:`is_heldout`) and two caption templates are never used for training; evaluation prompts
(:func:`eval_prompts`) use only those, so accuracy on them measures composition, not memorisation.

Rendering draws at 4x resolution and box-filters down (anti-aliased edges) with a small seeded jitter of
position (+-2 px), size (+-1 px), rotation (+-8 degrees) and colour (+-8 per channel).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image, ImageDraw

RESOLUTION = 64
SUPERSAMPLE = 4

SHAPES = ("circle", "square", "triangle", "star", "cross")
COLOURS = ("red", "orange", "yellow", "green", "cyan", "blue", "purple", "pink")
SIZES = ("small", "large")
POSITIONS = ("left", "right", "top", "bottom", "center")
BACKGROUNDS = ("black", "white", "gray")
ATTRIBUTES: dict[str, tuple[str, ...]] = {
    "shape": SHAPES,
    "colour": COLOURS,
    "size": SIZES,
    "position": POSITIONS,
    "background": BACKGROUNDS,
}
ATTRIBUTE_KEYS = tuple(ATTRIBUTES)
NUM_CLASSES = tuple(len(v) for v in ATTRIBUTES.values())

COLOUR_RGB = {
    "red": (220, 30, 30),
    "orange": (255, 140, 0),
    "yellow": (245, 220, 30),
    "green": (40, 170, 60),
    "cyan": (0, 200, 210),
    "blue": (40, 70, 220),
    "purple": (140, 50, 190),
    "pink": (255, 105, 180),
}
BACKGROUND_RGB = {"black": (12, 12, 12), "white": (245, 245, 245), "gray": (128, 128, 128)}
SIZE_PX = {"small": 18, "large": 30}  # bounding extent (diameter) in output pixels
POSITION_XY = {"left": (18, 32), "right": (46, 32), "top": (32, 18), "bottom": (32, 46), "center": (32, 32)}

# Caption grammar: the first synonym is the canonical word.
SYNONYMS: dict[str, dict[str, tuple[str, ...]]] = {
    "shape": {
        "circle": ("circle", "disc"),
        "square": ("square", "box"),
        "triangle": ("triangle", "wedge"),
        "star": ("star", "pentagram"),
        "cross": ("cross", "plus"),
    },
    "colour": {
        "red": ("red", "crimson", "scarlet"),
        "orange": ("orange", "amber"),
        "yellow": ("yellow", "golden"),
        "green": ("green", "emerald"),
        "cyan": ("cyan", "turquoise"),
        "blue": ("blue", "azure"),
        "purple": ("purple", "violet"),
        "pink": ("pink", "magenta"),
    },
    "size": {"small": ("small", "little", "tiny"), "large": ("large", "big", "huge")},
    "position": {
        "left": ("on the left", "at left", "to the left"),
        "right": ("on the right", "at right", "to the right"),
        "top": ("at the top", "on top", "up top"),
        "bottom": ("at the bottom", "down below", "at bottom"),
        "center": ("in the center", "in the middle", "centered"),
    },
    "background": {
        "black": ("on a black background", "on black", "against a dark background"),
        "white": ("on a white background", "on white", "against a light background"),
        "gray": ("on a gray background", "on grey", "against a gray background"),
    },
}
TRAIN_TEMPLATES = (
    "a {size} {colour} {shape} {position} {background}",
    "{size} {colour} {shape} {position} {background}",
    "a {size} {colour} {shape} {position}",
    "one {size} {colour} {shape} {position} {background}",
    "{position} , a {size} {colour} {shape} {background}",
    "a {colour} {shape} , {size} , {position} {background}",
)
HELDOUT_TEMPLATES = (
    "there is a {size} {colour} {shape} {position} {background}",
    "a picture of a {size} {colour} {shape} {position} {background}",
)


@dataclass(frozen=True)
class Attributes:
    """Ground-truth attributes of one render as class indices (see :data:`ATTRIBUTES`)."""

    shape: int
    colour: int
    size: int
    position: int
    background: int

    def as_tuple(self) -> tuple[int, int, int, int, int]:
        return (self.shape, self.colour, self.size, self.position, self.background)

    def names(self) -> dict[str, str]:
        return {k: ATTRIBUTES[k][i] for k, i in zip(ATTRIBUTE_KEYS, self.as_tuple())}


def is_heldout(a: Attributes) -> bool:
    """True for the ~10% of attribute combinations reserved for evaluation (every attribute pair is still seen)."""
    return (a.shape * 3 + a.colour * 5 + a.size * 2 + a.position * 7 + a.background * 11) % 10 == 3


def all_combinations(split: str = "all") -> list[Attributes]:
    """All 1,200 combinations, or only the ``"train"`` / ``"heldout"`` ones."""
    out = []
    for idx in np.ndindex(*NUM_CLASSES):
        a = Attributes(*(int(i) for i in idx))
        if split == "all" or (split == "heldout") == is_heldout(a):
            out.append(a)
    return out


def sample_attributes(rng: np.random.Generator, split: str = "train") -> Attributes:
    """Uniformly sample a combination from ``split`` (``"train"``, ``"heldout"`` or ``"all"``)."""
    while True:
        a = Attributes(*(int(rng.integers(n)) for n in NUM_CLASSES))
        if split == "all" or (split == "heldout") == is_heldout(a):
            return a


def _polygon(kind: str, cx: float, cy: float, r: float, angle: float) -> list[tuple[float, float]]:
    """Vertices of a shape of radius ``r`` centred at (cx, cy), rotated by ``angle`` radians."""
    if kind == "square":
        pts = [(-0.85, -0.85), (0.85, -0.85), (0.85, 0.85), (-0.85, 0.85)]
    elif kind == "triangle":
        pts = [
            (math.cos(-math.pi / 2 + k * 2 * math.pi / 3), math.sin(-math.pi / 2 + k * 2 * math.pi / 3) + 0.2)
            for k in range(3)
        ]
        pts = [(1.1 * x, 1.1 * y) for x, y in pts]
    elif kind == "star":
        pts = [
            (
                (1.0 if k % 2 == 0 else 0.42) * math.cos(-math.pi / 2 + k * math.pi / 5),
                (1.0 if k % 2 == 0 else 0.42) * math.sin(-math.pi / 2 + k * math.pi / 5) + 0.1,
            )
            for k in range(10)
        ]
    elif kind == "cross":
        w = 0.33
        pts = [
            (-w, -1),
            (w, -1),
            (w, -w),
            (1, -w),
            (1, w),
            (w, w),
            (w, 1),
            (-w, 1),
            (-w, w),
            (-1, w),
            (-1, -w),
            (-w, -w),
        ]
    else:
        raise ValueError(kind)
    ca, sa = math.cos(angle), math.sin(angle)
    return [(cx + r * (x * ca - y * sa), cy + r * (x * sa + y * ca)) for x, y in pts]


def render(a: Attributes, rng: np.random.Generator | None = None, jitter: bool = True) -> np.ndarray:
    """Render one image. Returns uint8 array (64, 64, 3). ``rng`` drives the jitter (none if ``jitter=False``)."""
    rng = rng if rng is not None else np.random.default_rng(0)
    n = a.names()
    s = SUPERSAMPLE
    j = (lambda lo, hi: float(rng.uniform(lo, hi))) if jitter else (lambda lo, hi: 0.0)
    bg = BACKGROUND_RGB[n["background"]]
    col = tuple(int(np.clip(c + j(-8, 8), 0, 255)) for c in COLOUR_RGB[n["colour"]])
    cx, cy = POSITION_XY[n["position"]]
    cx, cy = (cx + j(-2, 2)) * s, (cy + j(-2, 2)) * s
    r = (SIZE_PX[n["size"]] + j(-1, 1)) * s / 2
    angle = math.radians(j(-8, 8))
    img = Image.new("RGB", (RESOLUTION * s, RESOLUTION * s), bg)
    draw = ImageDraw.Draw(img)
    if n["shape"] == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=col)
    else:
        draw.polygon(_polygon(n["shape"], cx, cy, r, angle), fill=col)
    img = img.resize((RESOLUTION, RESOLUTION), Image.Resampling.BOX)
    return np.asarray(img, dtype=np.uint8)


def caption(a: Attributes, rng: np.random.Generator, templates: tuple[str, ...] = TRAIN_TEMPLATES) -> str:
    """A caption for ``a`` from a random template and random synonyms (lower case, words separated by spaces)."""
    n = a.names()
    tpl = templates[int(rng.integers(len(templates)))]
    words = {k: SYNONYMS[k][n[k]][int(rng.integers(len(SYNONYMS[k][n[k]])))] for k in ATTRIBUTE_KEYS}
    return " ".join(tpl.format(**words).split())


def canonical_caption(a: Attributes) -> str:
    """The canonical caption, e.g. ``"a large red circle on the left on a black background"``."""
    words = {k: SYNONYMS[k][v][0] for k, v in a.names().items()}
    return " ".join(TRAIN_TEMPLATES[0].format(**words).split())


def grammar_words() -> list[str]:
    """Every word the grammar can produce (sorted), including template words and punctuation."""
    words: set[str] = set()
    for tpl in TRAIN_TEMPLATES + HELDOUT_TEMPLATES:
        words.update(w for w in re.sub(r"\{\w+\}", " ", tpl).split())
    for table in SYNONYMS.values():
        for phrases in table.values():
            for p in phrases:
                words.update(p.split())
    return sorted(words)


def _phrase_index() -> list[tuple[list[str], str, int]]:
    out = []
    for key, table in SYNONYMS.items():
        for name, phrases in table.items():
            for p in phrases:
                out.append((p.split(), key, ATTRIBUTES[key].index(name)))
    return sorted(out, key=lambda t: -len(t[0]))  # longest phrases first


_PHRASES = _phrase_index()


def parse_caption(text: str) -> dict[str, int]:
    """Attributes named in a caption (attribute key -> class index); attributes not mentioned are absent."""
    words = text.lower().replace(",", " , ").split()
    found: dict[str, int] = {}
    i = 0
    while i < len(words):
        for phrase, key, idx in _PHRASES:
            if words[i : i + len(phrase)] == phrase and key not in found:
                found[key] = idx
                i += len(phrase) - 1
                break
        i += 1
    return found


def _template_patterns() -> tuple[re.Pattern[str], ...]:
    def alternatives(key: str) -> str:
        phrases = sorted((p for ps in SYNONYMS[key].values() for p in ps), key=len, reverse=True)
        return "(?:" + "|".join(re.escape(p) for p in phrases) + ")"

    out = []
    for tpl in TRAIN_TEMPLATES + HELDOUT_TEMPLATES:
        parts = re.split(r"(\{\w+\})", " ".join(tpl.split()))
        out.append(re.compile("".join(alternatives(p[1:-1]) if p.startswith("{") else re.escape(p) for p in parts)))
    return tuple(out)


_TEMPLATES = _template_patterns()


def caption_template(text: str) -> int | None:
    """Index into ``TRAIN_TEMPLATES + HELDOUT_TEMPLATES`` of the template a caption was written with, or None."""
    words = " ".join(text.lower().split())
    return next((i for i, pattern in enumerate(_TEMPLATES) if pattern.fullmatch(words)), None)


def make_batch(
    n: int, seed: int, split: str = "train", templates: tuple[str, ...] | None = None
) -> tuple[torch.Tensor, list[str], torch.Tensor]:
    """``n`` seeded samples: images float (n, 3, 64, 64) in [-1, 1], captions, labels long (n, 5).

    ``split="heldout"`` uses held-out combinations and (unless ``templates`` is given) held-out templates.
    """
    rng = np.random.default_rng(seed)
    if templates is None:
        templates = HELDOUT_TEMPLATES if split == "heldout" else TRAIN_TEMPLATES
    imgs, caps, labels = [], [], []
    for _ in range(n):
        a = sample_attributes(rng, split)
        imgs.append(render(a, rng))
        caps.append(caption(a, rng, templates))
        labels.append(a.as_tuple())
    x = torch.from_numpy(np.stack(imgs)).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)
    return x, caps, torch.tensor(labels, dtype=torch.long)


def calibration_prompts(n: int = 64, seed: int = 2026) -> list[str]:
    """``n`` calibration captions: training combinations with training templates (never the held-out ones)."""
    rng = np.random.default_rng(seed)
    return [caption(sample_attributes(rng, "train"), rng) for _ in range(n)]


def eval_prompts(n: int = 256, seed: int = 1234) -> list[tuple[str, Attributes]]:
    """``n`` evaluation prompts: held-out combinations (cycled in a seeded order) and held-out templates."""
    rng = np.random.default_rng(seed)
    combos = all_combinations("heldout")
    order = rng.permutation(len(combos))
    return [
        (caption(combos[order[i % len(combos)]], rng, HELDOUT_TEMPLATES), combos[order[i % len(combos)]])
        for i in range(n)
    ]


def to_uint8(x: torch.Tensor) -> np.ndarray:
    """Images in [-1, 1] (n, 3, H, W) -> uint8 (n, H, W, 3)."""
    return x.clamp(-1, 1).add(1).mul(127.5).round().byte().permute(0, 2, 3, 1).cpu().numpy()
