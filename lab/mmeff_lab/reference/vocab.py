"""Vocabulary of the procedural scenes: categories, co-occurrence groups, colour palette, glyph specs.

Category names are the canonical (first) words of the CHAIR synonym list, so CHAIR's synonym machinery
and COCO category ids apply unchanged. Glyphs are designed so that categories of *different* groups differ
by outline shape (easy), while categories of the *same* group share a shape family and differ only by fill
pattern, accent mark and aspect ratio (hard). In the default style ("twins-accent") the two most popular
categories of a group, the next two, and so on, differ only by their accent mark, as a fork and a knife differ
in a detail: where the detail is hard to see the model leans on the group co-occurrence prior, which is what
makes it answer "yes" to absent co-occurring objects the way real VLMs do (POPE's adversarial split).
"""

from __future__ import annotations

from dataclasses import dataclass

# Palette: "orange" is left out on purpose, because CHAIR would read the colour word as the fruit.
PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (214, 38, 38),
    "green": (36, 160, 58),
    "blue": (38, 78, 214),
    "yellow": (240, 206, 36),
    "white": (246, 246, 246),
    "black": (22, 22, 22),
    "purple": (132, 52, 178),
    "pink": (244, 134, 188),
}
COLORS: tuple[str, ...] = tuple(PALETTE)

# Group -> categories, most popular first (within-group sampling weights decay with the index).
GROUPS: dict[str, tuple[str, ...]] = {
    "kitchen": ("cup", "bowl", "bottle", "fork", "knife", "spoon", "wine glass", "microwave", "toaster",
                "oven"),
    "street": ("car", "bus", "truck", "traffic light", "bicycle", "motorcycle", "fire hydrant", "stop sign",
               "parking meter"),
    "living room": ("couch", "chair", "tv", "dining table", "potted plant", "remote", "clock", "vase"),
    "office": ("laptop", "keyboard", "mouse", "cell phone", "book", "scissors", "backpack", "handbag"),
    "animals": ("dog", "cat", "horse", "sheep", "cow", "bird"),
    "sports": ("sports ball", "tennis racket", "baseball bat", "baseball glove", "frisbee", "kite",
               "skateboard", "surfboard"),
    "food": ("pizza", "donut", "cake", "sandwich", "banana", "apple", "orange", "broccoli", "carrot",
             "hot dog"),
    "bed and bath": ("toilet", "sink", "toothbrush", "hair drier", "bed", "teddy bear"),
}
CATEGORIES: tuple[str, ...] = tuple(c for cats in GROUPS.values() for c in cats)
GROUP_OF: dict[str, str] = {c: g for g, cats in GROUPS.items() for c in cats}

# The 80 COCO categories in annotation order with their official (non-contiguous) ids; the order is the
# order of the CHAIR synonym list, so instances files we write use the ids real COCO tools expect.
COCO_NAMES: tuple[str, ...] = (
    "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat", "traffic light",
    "fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat", "dog", "horse", "sheep", "cow",
    "elephant", "bear", "zebra", "giraffe", "backpack", "umbrella", "handbag", "tie", "suitcase",
    "frisbee", "skis", "snowboard", "sports ball", "kite", "baseball bat", "baseball glove", "skateboard",
    "surfboard", "tennis racket", "bottle", "wine glass", "cup", "fork", "knife", "spoon", "bowl",
    "banana", "apple", "sandwich", "orange", "broccoli", "carrot", "hot dog", "pizza", "donut", "cake",
    "chair", "couch", "potted plant", "bed", "dining table", "toilet", "tv", "laptop", "mouse", "remote",
    "keyboard", "cell phone", "microwave", "oven", "toaster", "sink", "refrigerator", "book", "clock",
    "vase", "scissors", "teddy bear", "hair drier", "toothbrush",
)
_COCO_IDS = (list(range(1, 12)) + list(range(13, 26)) + [27, 28] + list(range(31, 45)) + list(range(46, 66))
             + [67, 70] + list(range(72, 83)) + list(range(84, 91)))
COCO_IDS: dict[str, int] = dict(zip(COCO_NAMES, _COCO_IDS, strict=True))

# Typical colours (first = most typical); an object takes a random palette colour with small probability.
TYPICAL_COLORS: dict[str, tuple[str, ...]] = {
    "cup": ("white", "red", "blue"), "bowl": ("white", "blue", "green"), "bottle": ("green", "blue", "white"),
    "fork": ("black", "white"), "knife": ("black", "white"), "spoon": ("white", "black"),
    "wine glass": ("purple", "white", "red"), "microwave": ("white", "black"), "toaster": ("red", "black"),
    "oven": ("black", "white"),
    "car": ("red", "blue", "black", "white"), "bus": ("yellow", "red", "blue"), "truck": ("white", "red"),
    "traffic light": ("black", "yellow"), "bicycle": ("red", "blue", "black"), "motorcycle": ("black", "red"),
    "fire hydrant": ("red", "yellow"), "stop sign": ("red",), "parking meter": ("black", "green"),
    "couch": ("blue", "red", "purple", "green"), "chair": ("black", "white", "red"), "tv": ("black",),
    "dining table": ("white", "black"), "potted plant": ("green",), "remote": ("black", "white"),
    "clock": ("white", "black"), "vase": ("blue", "purple", "pink"),
    "laptop": ("black", "white"), "keyboard": ("black", "white"), "mouse": ("black", "white"),
    "cell phone": ("black", "white", "pink"), "book": ("red", "blue", "green", "yellow"),
    "scissors": ("red", "blue", "black"), "backpack": ("blue", "black", "red"), "handbag": ("pink", "black"),
    "dog": ("black", "white", "yellow"), "cat": ("black", "white"), "horse": ("black", "white"),
    "sheep": ("white",), "cow": ("black", "white"), "bird": ("blue", "yellow", "red"),
    "sports ball": ("white", "red", "yellow"), "tennis racket": ("black", "red", "yellow"),
    "baseball bat": ("black", "white"), "baseball glove": ("black", "red"),
    "frisbee": ("red", "blue", "yellow", "pink"), "kite": ("red", "yellow", "purple", "blue"),
    "skateboard": ("black", "red", "green"), "surfboard": ("white", "blue", "yellow"),
    "pizza": ("red", "yellow"), "donut": ("pink", "yellow"), "cake": ("white", "pink"),
    "sandwich": ("yellow", "green"), "banana": ("yellow", "green"), "apple": ("red", "green"),
    "orange": ("yellow", "red"), "broccoli": ("green",), "carrot": ("red", "yellow"), "hot dog": ("red", "yellow"),
    "toilet": ("white",), "sink": ("white",), "toothbrush": ("blue", "green", "pink", "red"),
    "hair drier": ("black", "pink", "white"), "bed": ("white", "blue", "purple"),
    "teddy bear": ("yellow", "pink", "white"),
}

# Size class -> range of the glyph's half-extent as a fraction of the image side.
SIZE_RANGES: dict[str, tuple[float, float]] = {"S": (0.045, 0.07), "M": (0.065, 0.1), "L": (0.09, 0.13)}
_LARGE = {"bus", "truck", "couch", "dining table", "bed", "oven", "horse", "cow", "surfboard", "car",
          "toilet", "tv", "microwave", "pizza"}
_SMALL = {"fork", "knife", "spoon", "remote", "mouse", "cell phone", "scissors", "toothbrush", "sports ball",
          "apple", "orange", "donut", "carrot", "banana", "wine glass", "clock", "bird", "traffic light"}

# Shape families (two per group), fill patterns and accent marks; names are rendered in scenes.py.
SHAPES_BY_GROUP: dict[str, tuple[str, str]] = {
    "kitchen": ("ellipse", "capsule"), "street": ("rect", "trapezoid"), "living room": ("rounded", "house"),
    "office": ("diamond", "parallelogram"), "animals": ("triangle", "semicircle"), "sports": ("star", "cross"),
    "food": ("hexagon", "octagon"), "bed and bath": ("arch", "tee"),
}
PATTERNS: tuple[str, ...] = ("solid", "hstripes", "vstripes", "diag", "dots", "checker", "grid", "antidiag")
ACCENTS: tuple[str, ...] = ("none", "dot", "topbar", "feet", "knob", "spike")
_ASPECTS = (1.0, 1.5, 0.7, 1.25, 0.85)


@dataclass(frozen=True)
class GlyphSpec:
    """How one category is drawn: outline shape, fill pattern, accent mark, aspect (w/h) and size class."""

    shape: str
    pattern: str
    accent: str
    aspect: float
    size: str


def _size(cat: str) -> str:
    return "L" if cat in _LARGE else "S" if cat in _SMALL else "M"


def _glyph_specs() -> dict[str, GlyphSpec]:
    specs: dict[str, GlyphSpec] = {}
    for g, (group, cats) in enumerate(GROUPS.items()):
        for j, cat in enumerate(cats):
            # Index arithmetic makes (shape, pattern, accent) unique within a group (checked in tests).
            specs[cat] = GlyphSpec(
                shape=SHAPES_BY_GROUP[group][j % 2],
                pattern=PATTERNS[(3 * j + g) % len(PATTERNS)],
                accent=ACCENTS[(j // 2 + g) % len(ACCENTS)],
                aspect=_ASPECTS[(j + 2 * g) % len(_ASPECTS)],
                size=_size(cat),
            )
    return specs


def twin_of(category: str) -> str | None:
    """The category drawn as ``category``'s twin in the twin glyph styles (2k <-> 2k+1 in its group), if any."""
    cats = GROUPS[GROUP_OF[category]]
    j = cats.index(category) ^ 1
    return cats[j] if j < len(cats) else None


def _twin_specs(differ: str) -> dict[str, GlyphSpec]:
    """Glyphs in twins: categories 2k and 2k+1 of a group (neighbours in popularity, so they co-occur most)
    share shape and aspect and differ only by their accent mark (``differ="accent"``) or fill pattern
    (``differ="pattern"``), as a fork and a knife differ only in a detail."""
    specs: dict[str, GlyphSpec] = {}
    for g, (group, cats) in enumerate(GROUPS.items()):
        for j, cat in enumerate(cats):
            k, m = divmod(j, 2)  # twin pair k, member m
            pattern = PATTERNS[(3 * (j if differ == "pattern" else 2 * k) + g) % len(PATTERNS)]
            accent = ACCENTS[(k + g + (3 * m if differ == "accent" else 0)) % len(ACCENTS)]
            specs[cat] = GlyphSpec(shape=SHAPES_BY_GROUP[group][k % 2], pattern=pattern, accent=accent,
                                   aspect=_ASPECTS[(k + 2 * g) % len(_ASPECTS)], size=_size(cat))
    return specs


# Glyph styles: "v1" (benchmarks v1; within-group siblings share one of two shapes and differ by pattern, accent
# and aspect) and the twin styles; "twins-accent" is the default since benchmarks v2 (docs/reference-model.md).
GLYPH_STYLES: dict[str, dict[str, GlyphSpec]] = {
    "v1": _glyph_specs(), "twins-accent": _twin_specs("accent"), "twins-pattern": _twin_specs("pattern")}
DEFAULT_GLYPHS = "twins-accent"

_IRREGULAR_PLURALS = {"knife": "knives", "mouse": "mice", "sheep": "sheep", "scissors": "scissors"}
NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten")


def plural(name: str) -> str:
    """English plural of a category name (only the last word inflects: "wine glasses")."""
    if name in _IRREGULAR_PLURALS:
        return _IRREGULAR_PLURALS[name]
    if name.endswith(("s", "sh", "ch", "x")):
        return name + "es"
    return name + "s"


def article(word: str) -> str:
    """'a' or 'an' by the first letter, the rule POPE's question writer uses."""
    return "an" if word[0] in "aeiou" else "a"
