"""COCO benchmarks and their captions: which captions a protocol run generates from.

:data:`BENCHMARKS` names the protocols (COCO-2014 val 30k, the papers' FID-30k;
COCO-2017 val 5k) and the split their captions and reference images come from.
Caption selection from the official annotations is seeded and documented in
:func:`select_coco_captions`; a prompts file (one caption a line, e.g. the 30k
list DMD2 and SiD-LSG publish) replaces it when given (:func:`read_prompts_file`).

The rest of the protocol lives beside this module: the image transform and the
feature streaming in :mod:`~diffdistill.eval.protocol`, the reference statistics
of the COCO split in :mod:`~diffdistill.eval.reference_stats`, and resumable
generation in :mod:`~diffdistill.eval.generation`.
"""

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np


@dataclass(frozen=True)
class Benchmark:
    name: str
    split: str  # the COCO split the captions come from and the reference images are
    num: int  # the protocol's sample count
    title: str


BENCHMARKS = {
    "coco2014-30k": Benchmark("coco2014-30k", "val2014", 30_000, "COCO-2014 val"),
    "coco2017-5k": Benchmark("coco2017-5k", "val2017", 5_000, "COCO-2017 val"),
}
REFERENCE_SPLITS = {"coco2014": "val2014", "coco2017": "val2017"}


@dataclass
class CaptionSet:
    captions: list[str]
    source: str  # how they were chosen, for the report
    image_ids: list[int] | None = None

    @property
    def sha256(self) -> str:
        return hashlib.sha256("\n".join(self.captions).encode()).hexdigest()


def annotation_path(coco_dir: str | Path, split: str) -> Path:
    return Path(coco_dir) / "annotations" / f"captions_{split}.json"


def read_coco_annotations(coco_dir: str | Path, split: str) -> dict:
    path = annotation_path(coco_dir, split)
    if not path.is_file():
        raise FileNotFoundError(
            f"COCO caption annotations not found: {path}\n"
            f"Expected the official layout: COCO_DIR/annotations/captions_{split}.json and COCO_DIR/{split}/*.jpg "
            "(annotations_trainval2014.zip / annotations_trainval2017.zip and the val image zips from cocodataset.org)."
        )
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def _one_line(caption: str) -> str:
    # A few official captions carry newlines or doubled spaces; a caption is one line of text.
    return " ".join(caption.split())


def select_coco_captions(annotations: dict, num: int, seed: int = 0) -> CaptionSet:
    """One caption for each of ``num`` distinct images, reproducibly.

    1. Images are ordered by image id, each image's captions by annotation id.
    2. ``rng = numpy.random.default_rng(seed)``; if ``num`` is below the number of
       images, ``rng.choice(n_images, num, replace=False)`` picks the images, kept in
       image-id order; otherwise every image is used.
    3. For each chosen image in that order, ``rng.integers(len(captions))`` picks its caption.
    """
    by_image: dict[int, list[tuple[int, str]]] = {}
    for ann in annotations["annotations"]:
        by_image.setdefault(int(ann["image_id"]), []).append((int(ann["id"]), _one_line(ann["caption"])))
    image_ids = sorted(by_image)
    check_num(num, len(image_ids), "captioned images of the split (one caption each)")
    rng = np.random.default_rng(seed)
    if num < len(image_ids):
        image_ids = [image_ids[i] for i in np.sort(rng.choice(len(image_ids), size=num, replace=False))]
    captions = []
    for image_id in image_ids:
        options = [text for _, text in sorted(by_image[image_id])]
        captions.append(options[int(rng.integers(len(options)))])
    return CaptionSet(captions, f"one caption each for {num} images, seed {seed}", image_ids)


def read_prompts_file(path: str | Path, num: int | None = None) -> CaptionSet:
    """Captions from a UTF-8 text file, one a line (blank lines skipped); the first ``num`` if given."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"prompts file not found: {path}")
    try:
        with open(path, encoding="utf-8") as f:
            captions = [line.strip() for line in f if line.strip()]
    except UnicodeDecodeError as e:
        raise ValueError(f"prompts file {path} is not UTF-8 text (byte 0x{e.object[e.start]:02x} at offset {e.start}); save it as UTF-8") from None
    if num is not None:
        check_num(num, len(captions), f"prompts in {path}")
        captions = captions[:num]
    return CaptionSet(captions, f"the first {len(captions)} lines of {path.name}")


def check_num(num: int, available: int, what: str) -> None:
    """``--num`` must name at least one caption and no more than there are (never 0 for 'all', never -1 for 'all but one')."""
    if num < 1:
        raise ValueError(f"--num {num}: must be at least 1 (and at most the {available} {what})")
    if num > available:
        raise ValueError(f"--num {num} is more than the {available} {what}; pass --num {available} or fewer")
