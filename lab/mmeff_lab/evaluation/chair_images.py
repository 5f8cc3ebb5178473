"""Which images ``mmeff eval`` captions for CHAIR (``--chair-images``) and the samples for them.

``pope`` (default) is the benchmark's own CHAIR set: on real data the 500 POPE images (as the papers use), on
the synthetic benchmark its CHAIR images. A file of image ids picks others: COCO val2014 ids on real data (each
must have ground truth and an image in ``val2014/``), benchmark ids on synthetic data.
"""

from __future__ import annotations

from pathlib import Path

from mmeff.errors import MmeffError

from . import chair
from ._io import check_image
from .errors import DataError
from .tasks import CHAIR_PROMPT, DataSource, Sample, load_samples

DEFAULT_IMAGE_SET = "pope"


def describe(spec: str, data: DataSource) -> str:
    """The image-set label recorded in results."""
    if spec == DEFAULT_IMAGE_SET:
        return "synthetic" if data.kind == "synthetic" else "pope"
    return str(spec)


def check_spec(spec: str) -> None:
    if spec != DEFAULT_IMAGE_SET and not Path(spec).is_file():
        raise DataError(spec, "--chair-images is neither 'pope' nor a file of image ids")


def chair_samples(spec: str, data: DataSource, limit: int | None, max_new_tokens: int) -> list[Sample]:
    """The CHAIR samples of image set ``spec`` (the first ``limit`` of them)."""
    if spec == DEFAULT_IMAGE_SET:
        return load_samples("chair", data, limit, max_new_tokens)
    if limit is not None and limit < 1:
        raise MmeffError(f"--limit must be >= 1, got {limit}")
    _, ids = chair.image_set(spec)
    gt = data.chair_ground_truth
    unknown = [i for i in ids if i not in gt]
    if unknown:
        raise DataError(spec, f"{len(unknown)} image id(s) without CHAIR ground truth in {data.describe()} "
                        f"(first: {', '.join(map(str, unknown[:5]))})")
    if data.kind == "synthetic":
        from mmeff_lab.reference.synthetic import image_name
    else:
        def image_name(i: int) -> str:
            return f"COCO_val2014_{i:012d}.jpg"
    ids = ids[:limit] if limit is not None else ids
    out = []
    for i in ids:
        path = data.image_dir / image_name(i)
        check_image(path, spec)
        out.append(Sample("chair", str(i), path, CHAIR_PROMPT, max_new_tokens, {"image_id": i}))
    return out


__all__ = ["DEFAULT_IMAGE_SET", "chair_samples", "check_spec", "describe"]
