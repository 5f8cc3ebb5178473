"""Text about scenes: detailed and short captions, and the training question/answer pairs.

Captions only use category names, palette colours, numbers and position words, none of which is a CHAIR
synonym of another category (the palette has no "orange" for that reason), so CHAIR scores captions
written in this style exactly. Training captions mention a co-occurring but absent object with
probability `p_halluc`, as human captions sometimes do; reference captions never do.
"""

from __future__ import annotations

import numpy as np

from .scenes import Scene, SceneObject
from .vocab import CATEGORIES, COLORS, GROUPS, NUMBER_WORDS, TYPICAL_COLORS, article, plural

__all__ = [
    "CAPTION_PROMPTS",
    "YES_NO_SUFFIXES",
    "detailed_caption",
    "position_phrase",
    "short_caption",
    "training_examples",
]

CAPTION_PROMPTS = ("Please describe this image in detail.", "Describe the image in detail.",
                   "What is in this image? Describe it in detail.")
SHORT_PROMPTS = ("Briefly describe the image.", "Give a short caption of the image.")
# Answer-format instructions the benchmarks append, so a trained model has seen each of them.
YES_NO_SUFFIXES = ("", "\nAnswer the question using a single word or phrase.", " Please answer yes or no.")
SIDE_WORD = {"left": "on the left side", "right": "on the right side", "top": "at the top",
             "bottom": "at the bottom"}


def position_phrase(obj: SceneObject) -> str:
    """'in the top left corner', 'on the right side', 'in the center', ..."""
    return _place_phrase(*obj.position)


def _place_phrase(h: str, v: str) -> str:
    if h == "center" and v == "center":
        return "in the center"
    if h == "center":
        return SIDE_WORD[v]
    if v == "center":
        return SIDE_WORD[h]
    return f"in the {v} {h} corner"


def _num(n: int) -> str:
    return NUMBER_WORDS[n] if n < len(NUMBER_WORDS) else str(n)


def _join(parts: list[str]) -> str:
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]


def _category_sentence(scene: Scene, category: str) -> str:
    objs = scene.objects_of(category)
    if len(objs) == 1:
        o = objs[0]
        return f"{article(o.color).capitalize()} {o.color} {category} is {position_phrase(o)}."
    colors = [o.color for o in objs]
    if len(set(colors)) == 1:
        return f"There are {_num(len(objs))} {colors[0]} {plural(category)}."
    by_color = [f"{_num(colors.count(c))} {c}" for c in dict.fromkeys(colors)]
    return f"There are {_num(len(objs))} {plural(category)}, {_join(by_color)}."


def detailed_caption(scene: Scene, extra: str | None = None, rng: np.random.Generator | None = None) -> str:
    """Mentions every drawn object with count, colour and position; `extra` adds an (absent) object: a closing
    "There is also a ... nearby." sentence, or, given `rng`, an ordinary object sentence (typical colour, random
    place, counted in the first sentence, in left-to-right order), worded exactly like the true ones."""
    inline = extra is not None and rng is not None
    n = len(scene.objects) + inline
    head = f"The image shows {_num(n)} {'object' if n == 1 else 'objects'} on a cluttered background."
    # Left-to-right order of each category's first instance reads naturally.
    first_x = {c: min(o.cx for o in scene.objects_of(c)) for c in scene.categories}
    sentences = [_category_sentence(scene, c) for c in sorted(first_x, key=first_x.get)]
    if inline:
        typical = TYPICAL_COLORS[extra]
        color = typical[int(rng.integers(len(typical)))]
        h, v = int(rng.integers(3)), int(rng.integers(3))
        place = _place_phrase(("left", "center", "right")[h], ("top", "center", "bottom")[v])
        x = (h + 0.5) / 3  # keeps the left-to-right order of the sentences
        sentences.insert(sum(x0 < x for x0 in first_x.values()),
                         f"{article(color).capitalize()} {color} {extra} is {place}.")
    elif extra is not None:
        sentences.append(f"There is also {article(extra)} {extra} nearby.")
    return " ".join([head, *sentences])


def short_caption(scene: Scene) -> str:
    parts = [f"{article(c)} {c}" if k == 1 else f"{_num(k)} {plural(c)}" for c, k in scene.counts.items()]
    return f"A picture of {_join(parts)}."


def _co_occurring_absent(scene: Scene, rng: np.random.Generator) -> str | None:
    pool = [c for g in scene.groups for c in GROUPS[g] if c not in scene.counts]
    return pool[int(rng.integers(len(pool)))] if pool else None


def _yes_no(question: str, yes: bool, rng: np.random.Generator) -> tuple[str, str]:
    suffix = YES_NO_SUFFIXES[int(rng.integers(len(YES_NO_SUFFIXES)))]
    return question + suffix, "Yes" if yes else "No"


def training_examples(scene: Scene, rng: np.random.Generator, *, p_halluc: float = 0.15,
                      n_existence: int = 2, balanced_sides: bool = False, inline_halluc: bool = False
                      ) -> list[tuple[str, str]]:
    """(question, answer) pairs about `scene`: captions, existence, count, colour and position questions.

    Existence negatives are drawn uniformly from ALL absent categories, never biased towards co-occurring
    ones, so the only co-occurrence prior a model can pick up is the one in the images and captions.
    The yes/no side question asks a uniformly random side by default, which is true for at most half the
    objects (none in the centre): "No" is the better guess. ``balanced_sides`` asks a true side with
    probability 1/2 when the object has one, as the MME position pairs (one yes, one no) do.
    ``inline_halluc`` words a hallucinated mention like a drawn object (:func:`detailed_caption`), so a model
    cannot tell it from a true one by its wording.
    """
    ex: list[tuple[str, str]] = []
    extra = _co_occurring_absent(scene, rng) if rng.random() < p_halluc else None
    ex.append((CAPTION_PROMPTS[int(rng.integers(len(CAPTION_PROMPTS)))],
               detailed_caption(scene, extra, rng if inline_halluc else None)))
    ex.append((SHORT_PROMPTS[int(rng.integers(len(SHORT_PROMPTS)))], short_caption(scene)))
    present = list(scene.counts)
    absent = [c for c in CATEGORIES if c not in scene.counts]
    for c in rng.permutation(present)[:n_existence].tolist():
        ex.append(_yes_no(f"Is there {article(c)} {c} in the image?", True, rng))
    for c in rng.choice(absent, size=min(n_existence, len(absent)), replace=False).tolist():
        ex.append(_yes_no(f"Is there {article(c)} {c} in the image?", False, rng))
    c = present[int(rng.integers(len(present)))]
    k = scene.counts[c]
    ex.append((f"How many {plural(c)} are there?", str(k)))
    wrong = k + 1 if k == 1 or rng.random() < 0.5 else k - 1
    for n, truth in ((k, True), (wrong, False)):
        q = f"Is there only one {c} in the image?" if n == 1 else f"Are there {_num(n)} {plural(c)} in the image?"
        ex.append(_yes_no(q, truth, rng))
    # Colour and position questions need an unambiguous referent: a category with a single instance.
    singles = [o for o in scene.objects if scene.counts[o.category] == 1]
    if singles:
        o = singles[int(rng.integers(len(singles)))]
        ex.append((f"What color is the {o.category}?", o.color.capitalize()))
        other = [x for x in COLORS if x != o.color][int(rng.integers(len(COLORS) - 1))]
        truth = bool(rng.random() < 0.5)
        ex.append(_yes_no(f"Is the {o.category} {o.color if truth else other}?", truth, rng))
        h, v = o.position
        sides = ["left", "right", "top", "bottom"]
        true_sides = [x for x in (h, v) if x != "center"]
        if balanced_sides and true_sides:
            sides = true_sides if rng.random() < 0.5 else [x for x in sides if x not in true_sides]
        side = sides[int(rng.integers(len(sides)))]
        truth = side in (h, v)
        ex.append(_yes_no(f"Is the {o.category} {SIDE_WORD[side]} of the image?", truth, rng))
        ex.append((f"Where is the {o.category}?", position_phrase(o).capitalize() + " of the image."))
    return ex
