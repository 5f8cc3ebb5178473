"""Procedural scenes: deterministic sampling of objects from a seed, and fast PIL rendering.

A scene mostly draws from one co-occurrence group (sometimes a second), so objects co-occur with real
structure; ground truth (category, colour, bbox, position words, counts) comes with every scene. Geometry is
stored in normalised image units ([0, 1]) so a scene renders at any size; `render` is a pure function of the
scene (its clutter is seeded by `scene.seed`), hence the same seed always gives the same pixels.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
from PIL import Image, ImageDraw

from .vocab import CATEGORIES, DEFAULT_GLYPHS, GLYPH_STYLES, GROUPS, PALETTE, SIZE_RANGES, TYPICAL_COLORS, GlyphSpec

__all__ = ["CATEGORIES", "DEFAULT_GLYPHS", "GROUPS", "Scene", "SceneObject", "make_scene", "position_words", "render"]

# Scene sampling parameters (see module docstring of vocab.py for why groups matter).
_N_OBJECT_WEIGHTS = np.array([0.08, 0.14, 0.17, 0.17, 0.15, 0.12, 0.10, 0.07])  # for 1..8 objects
P_SECOND_GROUP = 0.3  # a scene draws from a second group this often
P_FROM_SECOND = 0.3  # share of objects from the second group when there is one
P_ANY_CATEGORY = 0.04  # an object ignores the groups altogether
P_DUPLICATE = 0.25  # an object repeats a category already drawn (gives counts > 1)
P_ATYPICAL_COLOR = 0.15
MAX_OCCLUDED = 0.4  # largest share of an object's bbox that later objects may cover
_GROUP_NAMES = tuple(GROUPS)
_GROUP_WEIGHTS = {g: np.array([1.0 / (1.0 + 0.4 * j) for j in range(len(c))]) for g, c in GROUPS.items()}
for _w in _GROUP_WEIGHTS.values():
    _w /= _w.sum()


@dataclass(frozen=True)
class SceneObject:
    """One drawn object; coordinates are fractions of the image side (x right, y down)."""

    category: str
    color: str
    rgb: tuple[int, int, int]
    cx: float
    cy: float
    half: float  # half-extent of the glyph before aspect stretch
    aspect: float  # width / height
    angle: float  # degrees, counter-clockwise
    bbox: tuple[float, float, float, float]  # x0, y0, x1, y1 of the drawn pixels' extent, clipped to [0, 1]
    glyph: GlyphSpec  # how the category is drawn (the scene's glyph style)

    @property
    def position(self) -> tuple[str, str]:
        """Coarse position words (horizontal, vertical) of the bbox centre."""
        return position_words((self.bbox[0] + self.bbox[2]) / 2, (self.bbox[1] + self.bbox[3]) / 2)

    def bbox_xywh(self, size: int) -> tuple[float, float, float, float]:
        """COCO-style [x, y, w, h] in pixels for an image of side `size`."""
        x0, y0, x1, y1 = (v * size for v in self.bbox)
        return (x0, y0, x1 - x0, y1 - y0)


@dataclass(frozen=True)
class Scene:
    """A sampled scene: its seed, the co-occurrence groups it drew from and its objects in drawing order."""

    seed: int
    groups: tuple[str, ...]
    objects: tuple[SceneObject, ...]

    @property
    def categories(self) -> tuple[str, ...]:
        """Distinct categories present, in vocabulary order."""
        present = {o.category for o in self.objects}
        return tuple(c for c in CATEGORIES if c in present)

    @property
    def counts(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for o in self.objects:
            counts[o.category] = counts.get(o.category, 0) + 1
        return {c: counts[c] for c in self.categories}

    def objects_of(self, category: str) -> tuple[SceneObject, ...]:
        return tuple(o for o in self.objects if o.category == category)


def position_words(x: float, y: float) -> tuple[str, str]:
    """Thirds of the image: ('left'|'center'|'right', 'top'|'center'|'bottom')."""
    h = "left" if x < 1 / 3 else "right" if x > 2 / 3 else "center"
    v = "top" if y < 1 / 3 else "bottom" if y > 2 / 3 else "center"
    return h, v


# ---------------------------------------------------------------- glyph geometry (unit square [-1, 1]^2)


def _circle(n: int, r: float = 1.0, a0: float = 0.0, a1: float = 2 * math.pi) -> list[tuple[float, float]]:
    return [(r * math.cos(a0 + (a1 - a0) * i / n), r * math.sin(a0 + (a1 - a0) * i / n)) for i in range(n)]


def _star() -> list[tuple[float, float]]:
    return [((1.0 if i % 2 == 0 else 0.45) * math.cos(-math.pi / 2 + i * math.pi / 5),
             (1.0 if i % 2 == 0 else 0.45) * math.sin(-math.pi / 2 + i * math.pi / 5)) for i in range(10)]


def _rounded(r: float = 0.4, n: int = 4) -> list[tuple[float, float]]:
    pts: list[tuple[float, float]] = []
    for cx, cy, a in ((1 - r, 1 - r, 0.0), (-1 + r, 1 - r, 0.5), (-1 + r, -1 + r, 1.0), (1 - r, -1 + r, 1.5)):
        pts += [(cx + r * math.cos(math.pi * (a + 0.5 * i / n)), cy + r * math.sin(math.pi * (a + 0.5 * i / n)))
                for i in range(n + 1)]
    return pts


SHAPES: dict[str, list[tuple[float, float]]] = {
    "ellipse": _circle(20),
    "capsule": [(x * 0.45 + 0.55, y) for x, y in _circle(8, 1, -math.pi / 2, math.pi / 2)]
    + [(0.55, 1.0), (-0.55, 1.0)]
    + [(x * 0.45 - 0.55, y) for x, y in _circle(8, 1, math.pi / 2, 3 * math.pi / 2)] + [(-0.55, -1.0)],
    "rect": [(-1, -1), (1, -1), (1, 1), (-1, 1)],
    "trapezoid": [(-0.55, -1), (0.55, -1), (1, 1), (-1, 1)],
    "rounded": _rounded(),
    "house": [(0, -1), (1, -0.25), (1, 1), (-1, 1), (-1, -0.25)],
    "diamond": [(0, -1), (1, 0), (0, 1), (-1, 0)],
    "parallelogram": [(-0.45, -1), (1, -1), (0.45, 1), (-1, 1)],
    "triangle": [(0, -1), (1, 1), (-1, 1)],
    "semicircle": [(x, 2 * y + 1) for x, y in _circle(12, 1, math.pi, 2 * math.pi)] + [(1, 1)],
    "star": _star(),
    "cross": [(-0.3, -1), (0.3, -1), (0.3, -0.3), (1, -0.3), (1, 0.3), (0.3, 0.3), (0.3, 1), (-0.3, 1),
              (-0.3, 0.3), (-1, 0.3), (-1, -0.3), (-0.3, -0.3)],
    "hexagon": _circle(6),
    "octagon": _circle(8, 1, math.pi / 8, 2 * math.pi + math.pi / 8),
    "arch": [(1, 1), (-1, 1)] + [(x, 0.9 * y) for x, y in _circle(10, 1, math.pi, 2 * math.pi)] + [(1, 0)],
    "tee": [(-1, -1), (1, -1), (1, -0.4), (0.3, -0.4), (0.3, 1), (-0.3, 1), (-0.3, -0.4), (-1, -0.4)],
}
ACCENT_SHAPES: dict[str, list[list[tuple[float, float]]]] = {
    "none": [],
    "dot": [[(0.28 * x, 0.28 * y) for x, y in _circle(10)]],
    "topbar": [[(-0.8, -1.35), (0.8, -1.35), (0.8, -1.05), (-0.8, -1.05)]],
    "feet": [[(cx + 0.24 * x, 1.12 + 0.24 * y) for x, y in _circle(8)] for cx in (-0.55, 0.55)],
    "knob": [[(0.95, -0.25), (1.35, -0.25), (1.35, 0.25), (0.95, 0.25)]],
    "spike": [[(0.0, -1.55), (0.3, -0.95), (-0.3, -0.95)]],
}


def _glyph_polygons(spec: GlyphSpec, cx: float, cy: float, half: float, aspect: float, angle: float
                    ) -> list[np.ndarray]:
    """Body polygon first, then accent polygons; each an (n, 2) array in normalised image coordinates."""
    sx, sy = half * math.sqrt(aspect), half / math.sqrt(aspect)
    c, s = math.cos(math.radians(angle)), math.sin(math.radians(angle))
    rot = np.array([[c * sx, s * sx], [-s * sy, c * sy]])  # scale then rotate (y down => sign flip)
    polys = [SHAPES[spec.shape], *ACCENT_SHAPES[spec.accent]]
    return [np.asarray(p, dtype=np.float64) @ rot + (cx, cy) for p in polys]


# ---------------------------------------------------------------- scene sampling


def _pick_category(rng: np.random.Generator, groups: tuple[str, ...], drawn: list[str]) -> str:
    if drawn and rng.random() < P_DUPLICATE:
        return drawn[int(rng.integers(len(drawn)))]
    r = rng.random()
    if r < P_ANY_CATEGORY:
        return CATEGORIES[int(rng.integers(len(CATEGORIES)))]
    group = groups[1] if len(groups) > 1 and r < P_ANY_CATEGORY + P_FROM_SECOND else groups[0]
    cats = GROUPS[group]
    return cats[int(rng.choice(len(cats), p=_GROUP_WEIGHTS[group]))]


def _pick_color(rng: np.random.Generator, category: str, previous: list[SceneObject]) -> str:
    same = [o for o in previous if o.category == category]
    if same and rng.random() < 0.6:  # duplicates often share a colour ("two red cups")
        return same[0].color
    if rng.random() < P_ATYPICAL_COLOR:
        return tuple(PALETTE)[int(rng.integers(len(PALETTE)))]
    typical = TYPICAL_COLORS[category]
    return typical[int(rng.integers(len(typical)))]


def _shade(rng: np.random.Generator, color: str) -> tuple[int, int, int]:
    base = np.asarray(PALETTE[color], dtype=np.float64)
    if color == "black":
        out = base + rng.uniform(0, 30)
    elif color == "white":
        out = base - rng.uniform(0, 28)
    else:
        out = base * rng.uniform(0.82, 1.1) + rng.uniform(-10, 10, size=3)
    return tuple(int(v) for v in np.clip(np.rint(out), 0, 255))  # type: ignore[return-value]


def _overlap(a: tuple[float, float, float, float], b: tuple[float, float, float, float]) -> float:
    w = min(a[2], b[2]) - max(a[0], b[0])
    h = min(a[3], b[3]) - max(a[1], b[1])
    return max(w, 0.0) * max(h, 0.0)


def _area(b: tuple[float, float, float, float]) -> float:
    return max(b[2] - b[0], 1e-9) * max(b[3] - b[1], 1e-9)


def make_scene(seed: int, glyphs: str = DEFAULT_GLYPHS) -> Scene:
    """Sample a scene deterministically from `seed` (objects that cannot be placed visibly are dropped), its
    categories drawn in the glyph style `glyphs` (a key of `vocab.GLYPH_STYLES`)."""
    if seed < 0:
        raise ValueError(f"scene seed must be non-negative, got {seed}")
    if glyphs not in GLYPH_STYLES:
        raise ValueError(f"unknown glyph style {glyphs!r}; known: {sorted(GLYPH_STYLES)}")
    rng = np.random.default_rng(seed)
    groups: tuple[str, ...] = (_GROUP_NAMES[int(rng.integers(len(_GROUP_NAMES)))],)
    if rng.random() < P_SECOND_GROUP:
        others = [g for g in _GROUP_NAMES if g != groups[0]]
        groups += (others[int(rng.integers(len(others)))],)
    n = 1 + int(rng.choice(len(_N_OBJECT_WEIGHTS), p=_N_OBJECT_WEIGHTS / _N_OBJECT_WEIGHTS.sum()))
    objects: list[SceneObject] = []
    occluded: list[float] = []  # covered bbox area per placed object
    for _ in range(n):
        category = _pick_category(rng, groups, [o.category for o in objects])
        color = _pick_color(rng, category, objects)
        rgb = _shade(rng, color)
        spec = GLYPH_STYLES[glyphs][category]
        lo, hi = SIZE_RANGES[spec.size]
        half = float(rng.uniform(lo, hi))
        aspect = spec.aspect * float(rng.uniform(0.9, 1.1))
        angle = float(rng.uniform(-25, 25))
        for _try in range(8):  # rejection sampling keeps every object mostly visible
            cx, cy = (float(v) for v in rng.uniform(0.08, 0.92, size=2))
            pts = np.concatenate(_glyph_polygons(spec, cx, cy, half, aspect, angle))
            lo_xy, hi_xy = np.clip(pts.min(0), 0, 1), np.clip(pts.max(0), 0, 1)
            bbox = (float(lo_xy[0]), float(lo_xy[1]), float(hi_xy[0]), float(hi_xy[1]))
            covers = [_overlap(bbox, o.bbox) for o in objects]
            if all((occ + cov) / _area(o.bbox) <= MAX_OCCLUDED for o, occ, cov in zip(objects, occluded, covers)):
                occluded = [occ + cov for occ, cov in zip(occluded, covers)]
                objects.append(SceneObject(category, color, rgb, cx, cy, half, aspect, angle, bbox, spec))
                occluded.append(0.0)
                break
    return Scene(seed=seed, groups=groups, objects=tuple(objects))


# ---------------------------------------------------------------- rendering


@lru_cache(maxsize=4)
def _patterns(size: int) -> dict[str, np.ndarray]:
    """Boolean fill masks (True = primary colour) in image coordinates, periods scaled with the image."""
    k = size / 224.0
    y, x = np.mgrid[0:size, 0:size]
    x, y = (x / k).astype(np.int64), (y / k).astype(np.int64)
    return {
        "solid": np.ones((size, size), dtype=bool),
        "hstripes": (y % 6) < 4,
        "vstripes": (x % 6) < 4,
        "diag": ((x + y) % 7) < 4,
        "antidiag": ((x - y) % 7) < 4,
        "dots": ~(((x % 6) >= 2) & ((x % 6) < 4) & ((y % 6) >= 2) & ((y % 6) < 4)),
        "checker": ((x // 4 + y // 4) % 2) == 0,
        "grid": ((x % 7) != 0) & ((y % 7) != 0),
    }


@lru_cache(maxsize=4)
def _noise_bank(size: int) -> np.ndarray:
    """A fixed smooth-noise texture twice the image side; scenes take random crops of it."""
    rng = np.random.default_rng(20240917)
    noise = rng.normal(0.0, 1.0, size=(2 * size + 4, 2 * size + 4))
    noise = (noise[:-4, :-4] + noise[2:-2, 2:-2] + noise[4:, 4:] + noise[:-4, 4:] + noise[4:, :-4]) / math.sqrt(5)
    return (noise * 7.0).astype(np.float32)


def _secondary(rgb: tuple[int, int, int]) -> tuple[int, int, int]:
    """Second tone of a patterned fill: a darker shade of light colours, a lighter one of dark colours."""
    r, g, b = rgb
    if 0.299 * r + 0.587 * g + 0.114 * b > 110:
        return (int(r * 0.6), int(g * 0.6), int(b * 0.6))
    return (int(r + (255 - r) * 0.4), int(g + (255 - g) * 0.4), int(b + (255 - b) * 0.4))


def _accent_color(rgb: tuple[int, int, int]) -> tuple[int, int, int]:
    r, g, b = rgb
    return (25, 25, 25) if 0.299 * r + 0.587 * g + 0.114 * b > 140 else (232, 232, 232)


def _background(rng: np.random.Generator, size: int) -> Image.Image:
    # Muted mid-tone base so that both white and black objects stand out.
    hue = rng.uniform(0, 2 * math.pi)
    val, sat = rng.uniform(105, 170), rng.uniform(8, 30)
    base = np.array([val + sat * math.cos(hue + k * 2 * math.pi / 3) for k in range(3)], dtype=np.float32)
    ramp = np.linspace(-1.0, 1.0, size, dtype=np.float32) * np.float32(rng.uniform(-18, 18))
    grad = ramp[None, :] if rng.random() < 0.5 else ramp[:, None]
    ox, oy = (int(v) for v in rng.integers(0, size, size=2))
    noise = _noise_bank(size)[oy:oy + size, ox:ox + size]
    arr = base[None, None, :] + (grad + noise)[:, :, None]
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8), "RGB")


def _clutter(draw: ImageDraw.ImageDraw, rng: np.random.Generator, size: int, pats: dict[str, np.ndarray],
             img: Image.Image) -> None:
    """Distractor texture: low-contrast textured patches, strokes and rings that are no category's glyph."""
    mean = np.asarray(img.resize((1, 1)).getpixel((0, 0)), dtype=np.float64)
    for _ in range(int(rng.integers(1, 4))):  # faint patterned patches (texture without an outline)
        x0, y0 = (int(v) for v in rng.integers(0, size - size // 6, size=2))
        w, h = (int(v) for v in rng.integers(size // 8, size // 3, size=2))
        x1, y1 = min(x0 + w, size), min(y0 + h, size)
        pat = pats[tuple(pats)[1 + int(rng.integers(len(pats) - 1))]][y0:y1, x0:x1]
        tone = np.clip(mean + rng.uniform(-28, 28, size=3), 0, 255)
        patch = np.asarray(img.crop((x0, y0, x1, y1)), dtype=np.float64)
        patch = np.where(pat[:, :, None], 0.55 * patch + 0.45 * tone, patch)
        img.paste(Image.fromarray(patch.astype(np.uint8), "RGB"), (x0, y0))
    for _ in range(int(rng.integers(8, 22))):
        col = tuple(int(v) for v in np.clip(mean + rng.uniform(-45, 45, size=3), 0, 255))
        x0, y0, dx, dy = (float(v) for v in rng.uniform(0, size, size=4))
        kind = rng.random()
        if kind < 0.55:
            draw.line([(x0, y0), (x0 + (dx - size / 2) * 0.3, y0 + (dy - size / 2) * 0.3)], fill=col,
                      width=int(rng.integers(1, 3)))
        elif kind < 0.85:
            r = float(rng.uniform(2, size / 18))
            draw.ellipse([x0 - r, y0 - r, x0 + r, y0 + r], outline=col, width=1)
        else:
            r = float(rng.uniform(1, 2.5))
            draw.ellipse([x0 - r, y0 - r, x0 + r, y0 + r], fill=col)


def render(scene: Scene, size: int = 224) -> Image.Image:
    """Draw the scene as an RGB image of side `size` (pixels are a pure function of the scene)."""
    if size < 32:
        raise ValueError(f"render size must be >= 32 pixels, got {size}")
    rng = np.random.default_rng([scene.seed, 7])  # separate stream: clutter never changes the objects
    pats = _patterns(size)
    img = _background(rng, size)
    draw = ImageDraw.Draw(img)
    _clutter(draw, rng, size, pats, img)
    for obj in scene.objects:
        body, *accents = (p * size for p in
                          _glyph_polygons(obj.glyph, obj.cx, obj.cy, obj.half, obj.aspect, obj.angle))
        pattern = obj.glyph.pattern
        body_pts = [tuple(p) for p in body.tolist()]
        if pattern == "solid":
            draw.polygon(body_pts, fill=obj.rgb)
        else:
            x0, y0 = (max(int(v), 0) for v in np.floor(body.min(0)))
            x1, y1 = (min(int(v), size) for v in np.ceil(body.max(0)) + 1)
            if x1 > x0 and y1 > y0:
                mask = Image.new("L", (x1 - x0, y1 - y0), 0)
                ImageDraw.Draw(mask).polygon([(x - x0, y - y0) for x, y in body_pts], fill=255)
                fill = np.where(pats[pattern][y0:y1, x0:x1, None], np.uint8(obj.rgb),
                                np.uint8(_secondary(obj.rgb)))
                img.paste(Image.fromarray(fill, "RGB"), (x0, y0), mask)
        draw.polygon(body_pts, outline=_secondary(obj.rgb))
        acc = _accent_color(obj.rgb)
        for a in accents:
            draw.polygon([tuple(p) for p in a.tolist()], fill=acc)
    return img
