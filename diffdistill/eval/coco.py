"""COCO captions, the protocol's image transform, reference statistics and resumable generation.

The protocol is GigaGAN's (Kang et al., 2023, evaluation code), which DMD2 reuses:
every image, generated or real, is centre-cropped to a square on its long edge,
resized with PIL LANCZOS to 256x256, and only then handed to clean-fid's clean
mode. The reference set is every image of the COCO validation split under the
same transform: 40,504 images of val2014, 5,000 of val2017.

Caption selection from the official annotations is seeded and documented in
:func:`select_coco_captions`; a prompts file (one caption a line, e.g. the 30k
list DMD2 and SiD-LSG publish) replaces it when given.
"""

import hashlib
import inspect
import json
import os
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from diffdistill.eval.fid import FeatureStatistics, clean_resize, load_statistics

PROTOCOL_RESOLUTION = 256


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


# ---------------------------------------------------------------- captions


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
    if num > len(image_ids):
        raise ValueError(f"asked for {num} captions of distinct images, the split has {len(image_ids)} images")
    rng = np.random.default_rng(seed)
    if num < len(image_ids):
        image_ids = [image_ids[i] for i in np.sort(rng.choice(len(image_ids), size=num, replace=False))]
    captions = []
    for image_id in image_ids:
        options = [text for _, text in sorted(by_image[image_id])]
        captions.append(options[int(rng.integers(len(options)))])
    return CaptionSet(captions, f"one caption each for {num} images, seed {seed}", image_ids)


def read_prompts_file(path: str | Path, num: int | None = None) -> CaptionSet:
    """Captions from a text file, one a line (blank lines skipped); the first ``num`` if given."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"prompts file not found: {path}")
    with open(path, encoding="utf-8") as f:
        captions = [line.strip() for line in f if line.strip()]
    if num is not None:
        if num > len(captions):
            raise ValueError(f"asked for {num} prompts, {path} has {len(captions)}")
        captions = captions[:num]
    return CaptionSet(captions, f"the first {len(captions)} lines of {path.name}")


# ---------------------------------------------------------------- the protocol's image transform


def centre_crop_long_edge(image: Image.Image) -> Image.Image:
    """Crop the long edge to the short one, centred, with torchvision's ``center_crop`` rounding
    (``int(round(margin / 2))``, Python's round-half-to-even), as GigaGAN's ``CenterCropLongEdge``."""
    width, height = image.size
    side = min(width, height)
    left, top = int(round((width - side) / 2.0)), int(round((height - side) / 2.0))
    return image.crop((left, top, left + side, top + side))


def protocol_image(image: Image.Image, resolution: int = PROTOCOL_RESOLUTION) -> np.ndarray:
    """GigaGAN's evaluation transform: RGB, centre crop on the long edge, PIL LANCZOS to ``resolution``, uint8."""
    square = centre_crop_long_edge(image.convert("RGB"))
    return np.asarray(square.resize((resolution, resolution), resample=Image.LANCZOS))


class ProtocolImages:
    """A map-style dataset: file -> (clean-resized float tensor 3x299x299, protocol uint8 image HxWx3)."""

    def __init__(self, paths: list[Path], resolution: int = PROTOCOL_RESOLUTION):
        self.paths, self.resolution = list(paths), resolution

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int):
        import torch

        with Image.open(self.paths[index]) as image:
            small = protocol_image(image, self.resolution)
        clean = torch.from_numpy(clean_resize(small).transpose(2, 0, 1).copy())
        return clean, torch.from_numpy(small.copy())


def extract_features(
    paths: list[Path],
    extractor,
    *,
    batch_size: int = 64,
    workers: int = 0,
    features_path: Path | None = None,
    on_batch=None,
    resolution: int = PROTOCOL_RESOLUTION,
    desc: str = "features",
) -> FeatureStatistics:
    """Stream ``paths`` through the protocol transform and the extractor into float64 statistics.

    With ``features_path``, the float32 features are also written to a ``.npy``
    memory map (KID draws subsets from it) instead of being kept in memory.
    ``on_batch(start_index, protocol_images)`` sees each batch of 256 px uint8
    images (the CLIP score uses them).
    """
    import torch
    from numpy.lib.format import open_memmap
    from tqdm.auto import tqdm

    stats = FeatureStatistics(extractor.dim)
    store = None
    if features_path is not None:
        partial = features_path.with_name(features_path.name + ".partial.npy")
        store = open_memmap(partial, mode="w+", dtype=np.float32, shape=(len(paths), extractor.dim))
    loader = torch.utils.data.DataLoader(
        ProtocolImages(paths, resolution), batch_size=batch_size, shuffle=False, num_workers=workers
    )
    start = 0
    for clean, small in tqdm(loader, desc=desc, unit="batch"):
        features = extractor(clean)
        stats.update(features)
        if store is not None:
            store[start : start + len(features)] = features
        if on_batch is not None:
            on_batch(start, small.numpy())
        start += len(features)
    if store is not None:
        store.flush()
        del store
        os.replace(partial, features_path)
    return stats


# ---------------------------------------------------------------- reference statistics


def reference_image_paths(coco_dir: str | Path, split: str, annotations: dict) -> list[Path]:
    """Every image listed in the split's annotations, in image-id order; all must exist."""
    folder = Path(coco_dir) / split
    images = sorted(annotations["images"], key=lambda im: int(im["id"]))
    paths = [folder / im["file_name"] for im in images]
    missing = [p for p in paths if not p.is_file()]
    if missing:
        raise FileNotFoundError(
            f"{len(missing)} of {len(paths)} COCO {split} images are missing (first: {missing[0]}). "
            f"The reference statistics need the whole split under {folder}."
        )
    return paths


@dataclass
class ReferenceStatistics:
    mu: np.ndarray
    sigma: np.ndarray
    count: int
    features_path: Path
    stats_path: Path
    from_cache: bool
    metadata: dict = field(default_factory=dict)

    def features(self) -> np.ndarray:
        return np.load(self.features_path, mmap_mode="r")


def reference_cache_key(split: str, paths: list[Path], extractor_key: str, resolution: int) -> str:
    """Protocol, split, image list, resolution and extractor weights: change any and the cache misses."""
    listing = hashlib.sha256("\n".join(p.name for p in paths).encode()).hexdigest()[:10]
    return f"coco-{split}-n{len(paths)}-{listing}_crop-lanczos{resolution}-clean299_{extractor_key}"


def reference_statistics(
    coco_dir: str | Path,
    split: str,
    annotations: dict,
    extractor,
    cache_dir: str | Path,
    *,
    batch_size: int = 64,
    workers: int = 0,
    resolution: int = PROTOCOL_RESOLUTION,
) -> ReferenceStatistics:
    """The COCO reference Gaussian (and features, for KID), computed once and cached as ``.npz`` + ``.npy``."""
    paths = reference_image_paths(coco_dir, split, annotations)
    key = reference_cache_key(split, paths, extractor.key, resolution)
    stats_path = Path(cache_dir) / f"{key}.npz"
    features_path = Path(cache_dir) / f"{key}.features.npy"
    if stats_path.is_file() and features_path.is_file():
        mu, sigma, count, metadata = load_statistics(stats_path)
        return ReferenceStatistics(mu, sigma, count, features_path, stats_path, True, metadata)
    features_path.parent.mkdir(parents=True, exist_ok=True)
    stats = extract_features(
        paths,
        extractor,
        batch_size=batch_size,
        workers=workers,
        features_path=features_path,
        resolution=resolution,
        desc=f"reference COCO {split}",
    )
    metadata = {
        "split": split,
        "images": len(paths),
        "transform": f"centre crop on the long edge, PIL LANCZOS {resolution}, clean-fid clean mode 299",
        "extractor": extractor.describe(),
    }
    stats.save(stats_path, **metadata)
    return ReferenceStatistics(stats.mean, stats.covariance, stats.count, features_path, stats_path, False, metadata)


# ---------------------------------------------------------------- generation


def image_path(image_dir: Path, index: int) -> Path:
    return Path(image_dir) / f"{index:06d}.png"


def pipeline_call_kwargs(pipeline, steps=None, guidance=None, resolution=None) -> dict:
    """The keyword arguments for ``pipeline(...)``, refusing settings the pipeline does not take."""
    accepted = inspect.signature(pipeline.__call__).parameters
    wanted = {"num_inference_steps": steps, "guidance_scale": guidance, "height": resolution, "width": resolution}
    kwargs = {}
    for name, value in wanted.items():
        if value is None:
            continue
        if name not in accepted:
            raise ValueError(f"{type(pipeline).__name__} takes no '{name}' argument")
        kwargs[name] = value
    return kwargs


def _denoiser(pipeline):
    for name in ("unet", "transformer", "prior"):
        module = getattr(pipeline, name, None)
        if module is not None and hasattr(module, "register_forward_pre_hook"):
            return module
    return None


@contextmanager
def count_denoiser_rows(pipeline):
    """Counts the sample rows the denoiser processes: a classifier-free-guided step on B
    images runs 2B rows, so rows / images is the NFE with guidance counted twice."""
    counter = {"rows": 0}
    denoiser = _denoiser(pipeline)
    if denoiser is None:
        counter["rows"] = None
        yield counter
        return

    def hook(module, args, kwargs):
        sample = args[0] if args else kwargs.get("sample", kwargs.get("hidden_states"))
        if sample is not None:
            counter["rows"] += int(sample.shape[0])

    handle = denoiser.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        yield counter
    finally:
        handle.remove()


def _to_uint8(images) -> list[np.ndarray]:
    """Pipeline output -> uint8 HxWx3, rounding as diffusers' own ``numpy_to_pil`` does."""
    if isinstance(images, np.ndarray):
        return list((images * 255).round().clip(0, 255).astype(np.uint8))
    return [np.asarray(im.convert("RGB")) for im in images]


def _save_png(array: np.ndarray, path: Path) -> None:
    partial = path.with_name(path.stem + ".partial.png")  # an interrupted write never looks finished
    Image.fromarray(array).save(partial)
    os.replace(partial, path)


@dataclass
class GenerationReport:
    total: int
    found_on_disk: int
    generated: int
    seconds: float = 0.0  # pipeline time over the batches timed (the first is warm-up when there are others)
    timed_images: int = 0
    nfe: float | None = None  # denoiser rows per image, guidance counted twice

    @property
    def images_per_second(self) -> float | None:
        return self.timed_images / self.seconds if self.seconds > 0 else None

    @property
    def seconds_per_image(self) -> float | None:
        return self.seconds / self.timed_images if self.timed_images else None


def _synchronize():
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def generate_images(
    pipeline,
    captions: list[str],
    image_dir: str | Path,
    *,
    batch_size: int = 16,
    seed: int = 0,
    call_kwargs: dict | None = None,
) -> GenerationReport:
    """One PNG per caption, ``image_dir/000123.png``, skipping the ones already there.

    Image ``i`` is drawn from its own CPU ``torch.Generator`` seeded ``seed + i``,
    so it does not depend on the batch it falls in, the device, or where a
    previous run stopped: an interrupted evaluation resumes where it stopped.
    """
    import torch
    from tqdm.auto import tqdm

    image_dir = Path(image_dir)
    image_dir.mkdir(parents=True, exist_ok=True)
    pending = [i for i in range(len(captions)) if not image_path(image_dir, i).is_file()]
    report = GenerationReport(len(captions), len(captions) - len(pending), 0)
    batches = [pending[k : k + batch_size] for k in range(0, len(pending), batch_size)]
    rows = 0
    with count_denoiser_rows(pipeline) as counter, tqdm(total=len(pending), desc="generate", unit="img") as bar:
        for number, batch in enumerate(batches):
            generators = [torch.Generator("cpu").manual_seed(seed + i) for i in batch]
            _synchronize()
            started = time.perf_counter()
            output = pipeline(
                prompt=[captions[i] for i in batch], generator=generators, output_type="np", **(call_kwargs or {})
            )
            _synchronize()
            elapsed = time.perf_counter() - started
            if number > 0 or len(batches) == 1:  # the first of several batches pays warm-up costs
                report.seconds += elapsed
                report.timed_images += len(batch)
            for i, array in zip(batch, _to_uint8(output.images)):
                _save_png(array, image_path(image_dir, i))
            report.generated += len(batch)
            bar.update(len(batch))
        rows = counter["rows"]
    if rows is not None and report.generated:
        report.nfe = rows / report.generated
    return report
